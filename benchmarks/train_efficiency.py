"""Training-step efficiency: full fine-tuning vs offsite-tuning, with and without LoRA.

Same model, same data, same batch and sequence length; each configuration runs in a fresh
process so its peak memory is its own (CUDA max allocated on GPU, peak RSS on CPU):

    python benchmarks/train_efficiency.py [--out FILE.json] [--model NAME] [--l 2 --k 8 --r 2]

Default model: a 24-block OPT-shaped model built from a config (no download), 2-8-2, batch 1,
sequence 512, as in the reference implementation's efficiency runs. Prints a table and writes
JSON: {"configs": {"full"|"full_lora"|"offsite"|"offsite_lora": {"tokens_per_s",
"peak_mem_bytes", "speedup_vs_full", "memory_reduction_vs_full"}}, ...} with
``flop_bound_speedup`` for ``offsite`` (the ratio training FLOPs alone would give).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = ("full", "full_lora", "offsite", "offsite_lora")


def build_full_model(args):
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    if args.model:
        from fl_offsite.models.loading import load_model
        return load_model(args.model, args.dtype)
    config = OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       ffn_dim=4 * args.hidden, num_attention_heads=max(1, args.hidden // 64),
                       max_position_embeddings=max(2048, args.seq), word_embed_proj_dim=args.hidden,
                       use_cache=False)
    return AutoModelForCausalLM.from_config(config)


def prepare_workdir(args, workdir: Path) -> int:
    """Save the full model and its bundle once, so no worker pays for building them."""
    from fl_offsite.models.families import resolve
    from fl_offsite.offsite.bundle import write_bundle
    from fl_offsite.offsite.plan import make_plan

    full = build_full_model(args)
    depth = len(resolve(full).blocks(full))
    full.save_pretrained(workdir / "full")
    write_bundle(full, make_plan(depth, args.l, args.r, args.k), workdir / "bundle", "benchmark")
    return depth


def prepared_model(name: str, workdir: Path):
    """The model each configuration trains, with its trainable parameters marked."""
    from transformers import AutoModelForCausalLM

    from fl_offsite.offsite import adapter as adapters
    from fl_offsite.models.families import resolve
    from fl_offsite.offsite.emulated import EmulatedModel

    if name.startswith("full"):
        full = AutoModelForCausalLM.from_pretrained(workdir / "full")
        full.config.use_cache = False
        arch = resolve(full)
        order = tuple(range(len(arch.blocks(full))))
        if name == "full_lora":
            adapters.prepare(full, arch, order, order, "lora", adapters.lora_config(arch, r=4, alpha=32))
        else:
            full.requires_grad_(True)
        return full
    emulated = EmulatedModel(workdir / "bundle", verify=False)
    emulated.prepare("lora" if name == "offsite_lora" else "blocks",
                     adapters.lora_config(emulated.arch, r=4, alpha=32))
    return emulated.model


def worker(name: str, args) -> dict:
    """One configuration in this (fresh) process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = prepared_model(name, args.workdir).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size
    batch = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - start
    return {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "peak_mem_bytes": peak,
            "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()), "device": device}


def flop_bound_speedup(depth: int, l: int, k: int, r: int) -> float:
    """Training FLOPs of full fine-tuning over offsite-tuning, per token, blocks only.

    Full: forward 2N + backward 4N over all ``depth`` blocks (6 per block). Offsite: forward
    and activation gradients through the l + k + r emulated blocks (2 + 2 per block) plus
    weight gradients for the l + r adapter blocks (2 per block).
    """
    n = l + k + r
    return 6 * depth / (4 * n + 2 * (l + r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--model", help="HF name or path (default: OPT-shaped model from a config)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--l", type=int, default=2)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    argv = sys.argv[1:]
    if "--out" in argv:
        i = argv.index("--out")
        argv = argv[:i] + argv[i + 2:]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        depth = prepare_workdir(args, Path(tmp))
        for name in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--workdir", tmp,
                                   *argv], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    full = results["full"]
    for name in CONFIGS[1:]:
        results[name]["speedup_vs_full"] = results[name]["tokens_per_s"] / full["tokens_per_s"]
        results[name]["memory_reduction_vs_full"] = full["peak_mem_bytes"] / results[name]["peak_mem_bytes"]
    results["offsite"]["flop_bound_speedup"] = flop_bound_speedup(depth, args.l, args.k, args.r)
    print(f"model {args.model or f'OPT-shaped {depth} blocks, hidden {args.hidden}'}, "
          f"{args.l}-{args.k}-{args.r}, batch {args.batch}, seq {args.seq}, "
          f"device {full['device']}")
    print(f"{'config':<14}{'tokens/s':>10}{'peak MB':>10}{'speedup':>9}{'mem red.':>9}")
    for name in CONFIGS:
        r = results[name]
        print(f"{name:<14}{r['tokens_per_s']:>10.0f}{r['peak_mem_bytes'] / 2**20:>10.0f}"
              f"{r.get('speedup_vs_full', 1.0):>8.2f}x{r.get('memory_reduction_vs_full', 1.0):>8.2f}x")
    print(f"FLOP-bound speedup of offsite over full: {results['offsite']['flop_bound_speedup']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({
            "configs": results, "settings": {k: v for k, v in vars(args).items()
                                             if k not in {"out", "worker"}},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch": torch.__version__, "cuda": torch.cuda.is_available()}},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
