"""Can a different way of training the adapter through the emulator transfer better to the full
model? Each variant trains the adapter of a bundle, then reports the emulator fine-tuned and
the plug-in.

    python benchmarks/adapter_training.py --bundle B --model M --data D [--max-examples 400]
        [--block-size 128] [--batch-size 8] [--max-eval N] [--variants control,hold-0.5,...]
        [--out FILE.json]

adapter_transfer.py found that an adapter's two halves co-adapt through the emulator (each
half beside the other half of an adapter trained on the exact middle transfers better than
both together). The variants test remedies at the same data budget:

- ``control``: what ``fl-offsite train`` does (AdamW, constant lr, clipping at 1.0, the same
  seeded order), so its plug-in is the CLI's;
- ``hold-P``: each step, with probability P, one half (bottom or top, at random) runs with its
  pristine weights and is not updated, so neither half can lean on the other's change;
- ``average``: the iterates of the second half of training averaged (SWA-style);
- ``cosine``: warm-up over a tenth of the steps, then cosine decay;
- ``lr-X`` / ``epochs-N`` suffixes, e.g. ``average-lr-6e-4``, ``control-epochs-2``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import time
from pathlib import Path


VARIANT = re.compile(r"(?P<kind>control|average|cosine|hold-(?P<hold>[0-9.]+))"
                     r"(?P<suffixes>(?:-(?:lr|epochs)-[0-9.]+(?:e-?[0-9]+)?)*)")
SUFFIX = re.compile(r"-(lr|epochs)-([0-9.]+(?:e-?[0-9]+)?)")


def parse_variant(name: str, lr: float) -> dict:
    """``"hold-0.5-lr-6e-4"`` -> {"hold": 0.5, "average": False, "cosine": False, "lr": 6e-4,
    "epochs": 1.0}."""
    match = VARIANT.fullmatch(name)
    if not match:
        raise SystemExit(f"--variants: unknown variant {name!r}; use control, average, cosine "
                         "or hold-P, optionally followed by -lr-X and -epochs-N")
    kind = match["kind"]
    settings = {"hold": float(match["hold"] or 0.0), "average": kind == "average",
                "cosine": kind == "cosine", "lr": lr, "epochs": 1.0}
    settings.update({key: float(value) for key, value in SUFFIX.findall(match["suffixes"])})
    return settings


def train_adapter(emulated, items, batch_size: int, pad_id: int, hold: float, average: bool,
                  cosine: bool, lr: float, epochs: float, seed: int = 0) -> dict:
    """Train ``emulated``'s adapter in place; returns loss statistics."""
    import torch
    from torch.utils.data import DataLoader

    from fl_offsite.training.config import TrainConfig
    from fl_offsite.training.data import collate

    clip = TrainConfig().max_grad_norm  # as `fl-offsite train` clips by default
    emulated.prepare("blocks")
    blocks = emulated.arch.blocks(emulated.model)
    positions = sorted(emulated.order.index(i) for i in emulated.info.plan.adapter)
    bottom = len(emulated.info.plan.bottom)
    halves = [positions[:bottom], positions[bottom:]]
    params = {p: list(blocks[p].parameters()) for p in positions}
    pristine = {p: [t.detach().clone() for t in params[p]] for p in positions}
    trainable = [t for p in positions for t in params[p]]
    torch.manual_seed(seed)
    coin = random.Random(seed)
    loader = DataLoader(items, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed),
                        collate_fn=lambda b: collate(b, pad_id))
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    total = math.ceil(epochs * len(loader))
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if not cosine else
                                                 min(1.0, (s + 1) / warmup) * 0.5 *
                                                 (1 + math.cos(math.pi * s / total)))
    mean, averaged, losses = None, 0, []
    emulated.model.train()
    while len(losses) < total:
        for batch in loader:
            held = halves[coin.randrange(2)] if hold and coin.random() < hold else []
            live = {p: [t.data for t in params[p]] for p in held}
            for p in held:
                for t, q in zip(params[p], pristine[p]):
                    t.data = q
                    t.requires_grad_(False)
            loss = emulated.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([t for t in trainable if t.grad is not None], clip)
            optimizer.step()  # AdamW skips tensors without a gradient: the held half
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            for p in held:
                for t, d in zip(params[p], live[p]):
                    t.data = d
                    t.requires_grad_(True)
            losses.append(loss.item())
            if average and len(losses) > total / 2:
                averaged += 1
                if mean is None:
                    mean = [t.detach().clone() for t in trainable]
                for m, t in zip(mean, trainable):
                    m.add_(t.detach() - m, alpha=1 / averaged)
            if len(losses) == total:
                break
    if mean is not None:
        for t, m in zip(trainable, mean):
            t.data.copy_(m)
    emulated.model.eval()
    return {"steps": total, "train_loss": sum(losses) / len(losses)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--model", required=True, help="the full model the adapter is plugged into")
    p.add_argument("--data", required=True)
    p.add_argument("--max-examples", type=int, default=400)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--variants", default="control,hold-0.5,hold-1.0,average,cosine-lr-6e-4")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    variants = {name: parse_variant(name, args.lr) for name in args.variants.split(",")}

    import torch

    from fl_offsite.models.families import resolve
    from fl_offsite.models.loading import load_model, load_processor
    from fl_offsite.offsite.adapter import plug
    from fl_offsite.offsite.emulated import EmulatedModel
    from fl_offsite.quiet import quiet_libraries
    from fl_offsite.training import data
    from fl_offsite.training.evaluate import evaluate

    quiet_libraries()
    torch.set_num_threads(1)
    processor = load_processor(args.model)
    pad_id = processor.pad_token_id or 0
    items = data.prepare(args.data, "train", processor, args.block_size,
                         args.max_examples).train_items
    test = data.prepare(args.data, "test", processor, args.block_size, args.max_eval)
    full = load_model(args.model)
    arch = resolve(full)
    rows = []
    print(f"{'variant':24} {'emulator ft':>12} {'plug-in':>10}")
    for name, settings in variants.items():
        started = time.time()
        emulated = EmulatedModel(args.bundle)
        stats = train_adapter(emulated, items, args.batch_size, pad_id, **settings)
        tuned = evaluate(emulated.model, test, processor)
        plug(full, arch, emulated.adapter())
        plugged = evaluate(full, test, processor)
        metric = "ppl" if "ppl" in plugged else "acc"
        rows.append({"variant": name, **settings, **stats, "emulator_ft": tuned,
                     "plugin": plugged, "wall_s": round(time.time() - started)})
        print(f"{name:24} {tuned[metric]:12.4g} {plugged[metric]:10.4g}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
            "rows": rows, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
