"""Emulator methods side by side (the frontier table): privacy, plug-in quality and bytes.

    python benchmarks/emulators.py [--model fl-offsite/ref-opt] [--data fl-offsite/devil]
        [--public fl-offsite/pydoc] [--distill-steps 200] [--epochs 2] [--out FILE.json]
        [--methods NAME ...] [--update]

For each method the model owner builds a bundle (uniform drop, similarity choice, similarity
with shared blocks, distilled, int8, low-rank factors with uniform or gradient-allocated
ranks, alone or on top of the drop, MLP channel pruning, distillation with a margin, with
harmonizers or matching the bottom adapter's gradient), the data owner fine-tunes the adapter on the task's
training split with the same budget, and the adapter is plugged into the full model; a data
owner who tries harder trains every weight of the bundle with the same budget (the "every
weight" attack of ``fl_offsite.offsite.attack``). Printed per method: emulator alone,
emulator fine-tuned (adapter only), the best attack, plug-in, the margin (best attack / plug-in
- 1), bundle MB, emulator MB held in memory, and the model owner's seconds to build it; once:
full fine-tuning with the same budget. The goal: plug-in close to full fine-tuning while the
best attack stays well behind plug-in. ``--update`` reruns only ``--methods`` and keeps the
other rows of ``--out`` (which must have been made with the same settings).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

METHODS = {
    "uniform": {},
    "uniform + int8": {"compression": {"name": "int8"}},
    "similarity": {"selection": {"name": "similarity"}},
    "similarity + shared": {"selection": {"name": "similarity", "repeat_blocks": True}},
    "distilled": {"distill": True},
    "distilled + int8": {"distill": True, "compression": {"name": "int8"}},
    "uniform + lowrank": {"compression": {"name": "lowrank", "rank_ratio": 0.25}},
    "lowrank (all middle)": {"drop_ratio": 0.0,
                             "compression": {"name": "lowrank", "rank_ratio": 0.125}},
    "lowrank gradient (all middle)": {"drop_ratio": 0.0, "compression": {
        "name": "lowrank", "rank_ratio": 0.125, "allocation": "gradient"}},
    "channels (all middle)": {"drop_ratio": 0.0, "compression": {
        "name": "channels", "keep_ratio": 0.25}},
    "channels gradient (all middle)": {"drop_ratio": 0.0, "compression": {
        "name": "channels", "keep_ratio": 0.25, "allocation": "gradient"}},
    "distilled + margin": {"distill": {"margin_weight": 1.0}},
    "distilled + harmonizers": {"distill": {}, "harmonizer": {"width": 32}},
    "distilled + gradient": {"distill": {"grad_weight": 10.0}},
}


SETTINGS = ("model", "data", "public", "emulator_layers", "distill_steps", "epochs", "lr",
            "max_eval")


def previous_rows(args) -> list[dict]:
    """The rows of ``--out`` for the methods not rerun (refused if its settings differ)."""
    if args.out is None or not args.out.is_file():
        raise SystemExit("--update: needs an existing --out file")
    previous = json.loads(args.out.read_text())
    differ = [k for k in SETTINGS if previous.get("settings", {}).get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--update: {args.out} was made with other {', '.join(differ)}; "
                         "rerun every method without --update")
    return [r for r in previous["methods"] if r["method"] not in args.methods]


def emulator_memory(emulated) -> int:
    """Bytes the data owner holds for the emulator blocks (parameters and buffers)."""
    blocks = emulated.arch.blocks(emulated.model)
    positions = {emulated.order.index(i) for i in emulated.info.plan.emulator}
    return sum(t.numel() * t.element_size() for p in positions
               for t in [*blocks[p].parameters(), *blocks[p].buffers()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fl-offsite/ref-opt")
    p.add_argument("--data", default="fl-offsite/devil", help="the data owner's task")
    p.add_argument("--public", default="fl-offsite/pydoc", help="the model owner's public text")
    p.add_argument("--emulator-layers", type=int, default=4)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-eval", type=int, default=300)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path)
    p.add_argument("--update", action="store_true", help="keep --out's rows of other methods")
    args = p.parse_args()
    kept = previous_rows(args) if args.update else []

    import torch

    from fl_offsite.training import data
    from fl_offsite.emulators.pipeline import DistillConfig, SplitConfig
    from fl_offsite.offsite.emulated import EmulatedModel
    from fl_offsite.training.evaluate import evaluate
    from fl_offsite.models.loading import load_model, load_processor
    from fl_offsite.offsite.owner import build_bundle
    from fl_offsite.quiet import quiet_libraries
    from fl_offsite.offsite.attack import every_weight
    from fl_offsite.reference.reproduce import offsite_finetune
    from fl_offsite.training.config import TrainConfig
    from fl_offsite.training.loop import train

    quiet_libraries()
    torch.set_num_threads(1)
    processor = load_processor(args.model)
    train_data = data.prepare(args.data, "train", processor, 128)
    test_data = data.prepare(args.data, "test", processor, 128, args.max_eval)
    cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=8)
    full_zero_shot = evaluate(load_model(args.model), test_data, processor)["ppl"]
    pad_id = getattr(processor, "pad_token_id", 0) or 0
    full = load_model(args.model).requires_grad_(True)
    train(full, train_data.train_items, cfg, pad_id)
    full_ft = evaluate(full, test_data, processor)["ppl"]
    del full
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            options = dict(METHODS[name])
            extra = options.pop("distill", None)
            distill = DistillConfig(data=args.public, steps=args.distill_steps
                                    if extra is not None else 0, **(extra or {}))
            size = {} if "drop_ratio" in options else {"emulator_layers": args.emulator_layers}
            split = SplitConfig.model_validate({**size, "distill": distill, **options})
            started = time.time()
            info = build_bundle(args.model, Path(tmp) / name.replace(" ", ""), split)
            build_seconds = time.time() - started
            emulated = EmulatedModel(info.path)
            alone = evaluate(emulated.model, test_data, processor)["ppl"]
            tuned, plugged = offsite_finetune(emulated, args.model, train_data, test_data,
                                              processor, cfg)
            attacked = evaluate(every_weight(EmulatedModel(info.path), train_data.train_items,
                                             cfg, pad_id, 0), test_data, processor)["ppl"]
            best_attack = min(tuned["ppl"], attacked)
            sizes = {f.name: f.stat().st_size for f in info.path.iterdir() if f.is_file()}
            rows.append({"method": name, "plan": info.plan.notation(),
                         "emulator": list(info.plan.emulator),
                         "emulator_zero_shot_ppl": alone, "emulator_ft_ppl": tuned["ppl"],
                         "every_weight_attack_ppl": attacked, "best_attack_ppl": best_attack,
                         "plugin_ppl": plugged["ppl"],
                         "margin": best_attack / plugged["ppl"] - 1.0,
                         "plugin_vs_full_ft": plugged["ppl"] / full_ft - 1.0,
                         "bundle_bytes": sum(sizes.values()),
                         "emulator_bytes": sizes["emulator.safetensors"],
                         "emulator_bytes_in_memory": emulator_memory(emulated),
                         "build_seconds": round(build_seconds, 1)})
            print(f"{name}: done in {time.time() - started:.0f} s", flush=True)
    rows = sorted(kept + rows, key=lambda r: list(METHODS).index(r["method"]))

    print(f"\n{args.model} on {args.data} (test ppl; full model zero-shot {full_zero_shot:.1f}, "
          f"full fine-tuning {full_ft:.1f}); {args.epochs:g} epochs, lr {args.lr}")
    columns = ["method", "plan", "emulator alone", "emulator FT", "every-weight attack",
               "plug-in", "margin", "plug-in vs full FT", "bundle MB", "emulator MB in memory",
               "build s"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print(f"| {r['method']} | {r['plan']} | {r['emulator_zero_shot_ppl']:.1f} | "
              f"{r['emulator_ft_ppl']:.1f} | {r['every_weight_attack_ppl']:.1f} | "
              f"{r['plugin_ppl']:.1f} | {r['margin']:+.1%} | {r['plugin_vs_full_ft']:+.1%} | "
              f"{r['bundle_bytes'] / 1e6:.2f} | {r['emulator_bytes_in_memory'] / 1e6:.2f} | "
              f"{r['build_seconds']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "model": args.model, "data": args.data, "public_data": args.public,
            "distill_steps": args.distill_steps, "epochs": args.epochs, "lr": args.lr,
            "settings": {k: getattr(args, k) for k in SETTINGS},
            "full_zero_shot_ppl": full_zero_shot, "full_ft_ppl": full_ft, "methods": rows,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
