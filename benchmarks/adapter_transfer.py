"""Where plug-in loses: which half of an adapter transfers from the emulator to the full model.

    python benchmarks/adapter_transfer.py --model M --adapter A.safetensors
        [--reference R.safetensors] --data D [--block-size 128] [--max-eval N] [--out FILE.json]

``--adapter`` was trained on an emulator; ``--reference`` (optional) on the exact middle (a
bundle keeping every middle block uncompressed: the adapter's ceiling). Each variant is plugged
into the full model and evaluated on the test split:

- the adapter as trained, its bottom half only, its top half only (the other half pristine);
- its update scaled by 0.5 and 0.75 (is the step too long, or in the wrong direction?);
- with ``--reference``: the reference, and each half of the adapter beside the other half of
  the reference (does each half transfer on its own, and what do they lose together?).

"Bottom" is the adapter blocks below the emulator, "top" the ones above it. Prints a table and
writes the rows to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def variants(pristine: dict, adapter: dict, bottom: set[int], reference: dict | None) -> dict:
    """Named adapter tensors to plug in (``"<block>.<name>"`` keys, as in an adapter file)."""
    def block(key: str) -> int:
        return int(key.split(".", 1)[0])

    def halves(low: dict, high: dict) -> dict:
        return {k: (low if block(k) in bottom else high)[k] for k in pristine}

    def scaled(alpha: float) -> dict:
        return {k: pristine[k] + alpha * (adapter[k] - pristine[k]) for k in pristine}

    out = {"adapter": adapter, "adapter bottom only": halves(adapter, pristine),
           "adapter top only": halves(pristine, adapter),
           "adapter update x0.5": scaled(0.5), "adapter update x0.75": scaled(0.75)}
    if reference is not None:
        out.update({"reference": reference,
                    "adapter bottom + reference top": halves(adapter, reference),
                    "reference bottom + adapter top": halves(reference, adapter)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True, type=Path, help="trained on an emulator")
    p.add_argument("--reference", type=Path, help="trained on the exact middle (the ceiling)")
    p.add_argument("--data", required=True)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch

    from fl_offsite.models.families import resolve
    from fl_offsite.models.loading import load_model, load_processor
    from fl_offsite.offsite.adapter import plug
    from fl_offsite.offsite.bundle import keyed, split_state
    from fl_offsite.offsite.emulated import load_adapter
    from fl_offsite.quiet import quiet_libraries
    from fl_offsite.training import data
    from fl_offsite.training.evaluate import evaluate

    quiet_libraries()
    torch.set_num_threads(1)
    processor = load_processor(args.model)
    test = data.prepare(args.data, "test", processor, args.block_size, args.max_eval)
    model = load_model(args.model)
    arch = resolve(model)
    adapter = load_adapter(args.adapter)
    reference = load_adapter(args.reference).tensors if args.reference else None
    pristine = {k: v.clone() for k, v in
                keyed(split_state(model, arch)[1], adapter.indices).items()}
    top_start = len(arch.blocks(model))  # the top half: the run of adapter blocks at the end
    while top_start - 1 in adapter.indices:
        top_start -= 1
    bottom = {i for i in adapter.indices if i < top_start}
    zero_shot = evaluate(model, test, processor)
    rows = [{"variant": "zero-shot", **zero_shot}]
    print(f"{'variant':34} {'metric':>10}")
    metric = "ppl" if "ppl" in zero_shot else "acc"
    print(f"{'zero-shot':34} {zero_shot[metric]:10.4g}")
    for name, tensors in variants(pristine, adapter.tensors, bottom, reference).items():
        plug(model, arch, adapter.with_tensors(tensors))
        scores = evaluate(model, test, processor)
        rows.append({"variant": name, **scores})
        print(f"{name:34} {scores[metric]:10.4g}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
            "bottom_blocks": sorted(bottom), "metric": metric, "rows": rows,
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
