"""The model owner's protection, measured: what a data owner holding the bundle can reach
without the full model, with the same data and training budget as the honest adapter.

Offsite-Tuning's privacy claim is that the emulator alone is clearly worse than plug-in. The
usual check trains only the adapter on the emulator ("emulator fine-tuned"); a data owner who
tries harder trains every weight the bundle gives them, or adds the emulator's own writing to
their data. Each attack is a function from a loaded bundle to the model it leaves the data
owner with, registered by name; ``margin`` says how far plug-in stays ahead of the best of them.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.generation import generate
from ..training.config import TrainConfig
from ..training.loop import train
from .emulated import EmulatedModel


def adapter_only(emulated: EmulatedModel, items: list[dict], cfg: TrainConfig, pad_id: int,
                 seed: int):
    """The honest recipe, kept by the data owner: the adapter tuned on the emulator."""
    emulated.prepare("blocks", seed=seed)
    train(emulated.model, items, cfg, pad_id, seed=seed)
    return emulated.model


def every_weight(emulated: EmulatedModel, items: list[dict], cfg: TrainConfig, pad_id: int,
                 seed: int):
    """Every floating-point weight of the bundle trained: adapter, emulator (factors
    included), embeddings and head (int8 weights are integers and stay)."""
    emulated.model.requires_grad_(False)
    for param in emulated.model.parameters():
        param.requires_grad_(param.is_floating_point())
    train(emulated.model, items, cfg, pad_id, seed=seed)
    return emulated.model


def own_generations(emulated: EmulatedModel, items: list[dict], cfg: TrainConfig, pad_id: int,
                    seed: int):
    """The emulator's own writing as more data: after the honest adapter training, the tuned
    emulator continues the opening of every training example (sampled), and every weight then
    trains on the real examples and those continuations. It costs the data owner about three
    times the honest training plus the generation, which is the point: more effort, no new
    access."""
    model = adapter_only(emulated, items, cfg, pad_id, seed)
    return every_weight(emulated, items + continuations(model, items, pad_id, seed, cfg.batch_size),
                        cfg, pad_id, seed)


@torch.no_grad()
def continuations(model, items: list[dict], pad_id: int, seed: int, batch_size: int
                  ) -> list[dict]:
    """One sampled rewrite per text example: its prompt (the context a multiple-choice item
    does not train on, else its first quarter) continued by ``model`` to the example's length;
    only the written tokens are trained on. Examples with equal prompt and total lengths are
    generated together, so no padding is needed."""
    torch.manual_seed(seed)
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for item in items:
        ids, labels = item["input_ids"], item["labels"]
        context = int((labels == -100).sum()) or max(1, len(ids) // 4)
        groups.setdefault((context, len(ids)), []).append(ids[:context])
    out = []
    for (context, length), prompts in groups.items():
        for start in range(0, len(prompts), batch_size):
            batch = torch.stack(prompts[start:start + batch_size])
            new = length - context
            written = generate(model, batch, max_new_tokens=new, min_new_tokens=new,
                               do_sample=True, top_k=50, pad_token_id=pad_id)
            for row in written:
                labels = row.clone()
                labels[:context] = -100
                out.append({"input_ids": row, "labels": labels})
    return out


ATTACKS: dict[str, Callable] = {
    "adapter only": adapter_only,
    "every weight": every_weight,
    "own generations": own_generations,
}
# attacks that write text: not run on an image task
TEXT_ONLY = {"own generations"}


def attacks_for(items: list[dict]) -> dict[str, Callable]:
    """The attacks that apply to a task whose training examples are ``items``."""
    text = "input_ids" in items[0]
    return {name: attack for name, attack in ATTACKS.items() if text or name not in TEXT_ONLY}


def margin(plugin: dict, attacks: dict[str, dict]) -> dict:
    """How far plug-in stays ahead of the best attack: for perplexity the best attack's
    relative excess (0.2: 20% worse than plug-in), for accuracy the points it is behind."""
    if "ppl" in plugin:
        best = min(attacks, key=lambda name: attacks[name]["ppl"])
        return {"best_attack": best, "metric": "ppl",
                "margin": attacks[best]["ppl"] / plugin["ppl"] - 1.0}
    best = max(attacks, key=lambda name: attacks[name]["acc"])
    return {"best_attack": best, "metric": "acc",
            "margin": plugin["acc"] - attacks[best]["acc"]}
