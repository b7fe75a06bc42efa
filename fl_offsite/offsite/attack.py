"""The model owner's protection, measured: what a data owner holding the bundle can reach
without the full model, with the same data and training budget as the honest adapter.

Offsite-Tuning's privacy claim is that the emulator alone is clearly worse than plug-in. The
usual check trains only the adapter on the emulator ("emulator fine-tuned"); a data owner who
tries harder trains every weight the bundle gives them. Each attack is a function from a
loaded bundle to the model it leaves the data owner with, registered by name; ``margin`` says
how far plug-in stays ahead of the best of them.
"""

from __future__ import annotations

from typing import Callable

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


ATTACKS: dict[str, Callable] = {
    "adapter only": adapter_only,
    "every weight": every_weight,
}


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
