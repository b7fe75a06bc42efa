"""Emulator methods side by side: the privacy gap, the plug-in quality and the bundle bytes.

    python benchmarks/emulators.py [--model fl-offsite/ref-opt] [--data fl-offsite/devil]
        [--public fl-offsite/pydoc] [--distill-steps 200] [--epochs 2] [--out FILE.json]

For each method the model owner builds a bundle (uniform drop, similarity choice, similarity
with shared blocks, distilled, int8), the data owner fine-tunes the adapter on the task's
training split with the same budget, and the adapter is plugged into the full model. Printed per
method: emulator alone (zero-shot), emulator fine-tuned, plug-in, and bytes (bundle, emulator).
The goal is the best plug-in at the largest gap between the full model and the emulator alone.
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
}


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
    args = p.parse_args()

    import torch

    from fl_offsite.training import data
    from fl_offsite.emulators.pipeline import DistillConfig, SplitConfig
    from fl_offsite.offsite.emulated import EmulatedModel
    from fl_offsite.training.evaluate import evaluate
    from fl_offsite.models.loading import load_model, load_processor
    from fl_offsite.offsite.owner import build_bundle
    from fl_offsite.quiet import quiet_libraries
    from fl_offsite.reference.reproduce import offsite_finetune
    from fl_offsite.training.config import TrainConfig

    quiet_libraries()
    torch.set_num_threads(1)
    processor = load_processor(args.model)
    train_data = data.prepare(args.data, "train", processor, 128)
    test_data = data.prepare(args.data, "test", processor, 128, args.max_eval)
    cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=8)
    full_zero_shot = evaluate(load_model(args.model), test_data, processor)["ppl"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            options = dict(METHODS[name])
            distill = DistillConfig(data=args.public, steps=args.distill_steps if
                                    options.pop("distill", False) else 0)
            split = SplitConfig.model_validate({"emulator_layers": args.emulator_layers,
                                             "distill": distill, **options})
            started = time.time()
            info = build_bundle(args.model, Path(tmp) / name.replace(" ", ""), split)
            build_seconds = time.time() - started
            emulated = EmulatedModel(info.path)
            alone = evaluate(emulated.model, test_data, processor)["ppl"]
            tuned, plugged = offsite_finetune(emulated, args.model, train_data, test_data,
                                              processor, cfg)
            sizes = {f.name: f.stat().st_size for f in info.path.iterdir() if f.is_file()}
            rows.append({"method": name, "plan": info.plan.notation(),
                         "emulator": list(info.plan.emulator),
                         "emulator_zero_shot_ppl": alone, "emulator_ft_ppl": tuned["ppl"],
                         "plugin_ppl": plugged["ppl"], "bundle_bytes": sum(sizes.values()),
                         "emulator_bytes": sizes["emulator.safetensors"],
                         "build_seconds": round(build_seconds, 1)})
            print(f"{name}: done in {time.time() - started:.0f} s", flush=True)

    header = (f"{'method':<22}{'plan':<12}{'emulator alone':>15}{'emulator FT':>13}"
              f"{'plug-in':>10}{'bundle MB':>11}{'emulator MB':>13}")
    print(f"\n{args.model} on {args.data} (test ppl; full model zero-shot {full_zero_shot:.1f}); "
          f"{args.epochs:g} epochs of adapter tuning, lr {args.lr}")
    print(header)
    for r in rows:
        print(f"{r['method']:<22}{r['plan']:<12}{r['emulator_zero_shot_ppl']:>15.1f}"
              f"{r['emulator_ft_ppl']:>13.1f}{r['plugin_ppl']:>10.1f}"
              f"{r['bundle_bytes'] / 1e6:>11.2f}{r['emulator_bytes'] / 1e6:>13.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "model": args.model, "data": args.data, "public_data": args.public,
            "distill_steps": args.distill_steps, "epochs": args.epochs, "lr": args.lr,
            "full_zero_shot_ppl": full_zero_shot, "methods": rows,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
