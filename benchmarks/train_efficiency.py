"""Training-step efficiency: full fine-tuning vs offsite-tuning, with and without LoRA.

Same model, same data, same batch and sequence length. Every (configuration, repeat) runs in
a fresh process so its peak memory is its own: the peak from the first training step on
(CUDA max allocated on GPU; on CPU the peak RSS above the RSS of the loaded libraries, so
neither the Python + torch runtime nor loading the model counts), and the configurations are interleaved (full, full_lora, offsite, offsite_lora, full, ...) so
that load drifting over the run hits them all alike:

    python benchmarks/train_efficiency.py [--out FILE.json] [--model NAME] [--l 2 --k 8 --r 2]
                                          [--repeats 3] [--autocast bf16]

Default model: a 24-block OPT-shaped model built from a config (no download), 2-8-2, batch 1,
sequence 512, as in the reference implementation's efficiency runs. Each worker measures, on
its first (warm-up) step, the step's FLOPs (``torch.utils.flop_counter``: the forward and the
backward that autograd actually runs) and the bytes a step keeps (weights, gradients,
optimizer state, activations saved for the backward). ``flop_bound_speedup`` is full's FLOPs
over the configuration's; ``memory_bound_bytes`` the sum of the four. Prints a table and
writes JSON: {"configs": {name: {"tokens_per_s" (median), "tokens_per_s_runs",
"speedup_vs_full" (median of per-repeat ratios), "speedup_spread" ([min, max]), ...}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
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


def _rss_bytes(field: str = "VmRSS") -> int:
    """This process's RSS now (``VmRSS``) or its peak (``VmHWM``), on Linux; elsewhere the
    peak so far (which Linux would carry over from the parent)."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Start the peak (VmHWM) again from now, as ``torch.cuda.reset_peak_memory_stats`` does
    on a GPU: loading the model (a file mapped while its tensors are copied) is not training."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def first_step_accounting(model, step, opt) -> dict:
    """Run ``step`` once, counting its FLOPs and the bytes a training step keeps."""
    from torch.utils.flop_counter import FlopCounterMode

    params = list(model.parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"flops_per_step": counter.get_total_flops(),
            "weights_bytes": sum(p.numel() * p.element_size() for p in params),
            "gradients_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "optimizer_bytes": sum(t.numel() * t.element_size() for t in state),
            "activations_bytes": sum(saved.values())}


def worker(name: str, args) -> dict:
    """One configuration in this (fresh) process."""
    import peft  # noqa: F401  the runtime (libraries) is in the baseline, not in the peak
    import transformers  # noqa: F401

    from fl_offsite.offsite import emulated  # noqa: F401

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runtime = _rss_bytes()
    model = prepared_model(name, args.workdir).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.vocab_size
    batch = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    accounting = first_step_accounting(model, step, opt)
    for _ in range(args.warmup - 1):
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
        peak = _rss_bytes("VmHWM") - runtime
    seconds = time.perf_counter() - start
    bound = sum(accounting[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                                        "activations_bytes"))
    return {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "peak_mem_bytes": peak,
            "runtime_rss_bytes": runtime if device == "cpu" else None,
            "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()), "device": device,
            **accounting, "memory_bound_bytes": bound}


def run_child(argv: list[str]) -> str:
    """This script in a fresh process; its last line of output."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[:2])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def run_interleaved(args, workdir: str, argv: list[str]) -> dict[str, list[dict]]:
    """``args.repeats`` rounds of every configuration, each run in its own process."""
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        for name in CONFIGS:
            runs[name].append(json.loads(run_child(["--worker", name, "--workdir", workdir,
                                                    *argv])))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: "
                  f"{runs[name][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    return runs


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians per configuration. Ratios to full are taken per repeat (runs next to each
    other in time) and reported as their median and [min, max]."""
    median = statistics.median
    full = runs["full"]
    out = {}
    for name, rs in runs.items():
        speed = [r["tokens_per_s"] / f["tokens_per_s"] for r, f in zip(rs, full)]
        memory = [f["peak_mem_bytes"] / r["peak_mem_bytes"] for r, f in zip(rs, full)]
        row = {k: v for k, v in rs[0].items() if k not in ("tokens_per_s", "peak_mem_bytes")}
        row.update(tokens_per_s=median(r["tokens_per_s"] for r in rs),
                   tokens_per_s_runs=[r["tokens_per_s"] for r in rs],
                   peak_mem_bytes=median(r["peak_mem_bytes"] for r in rs),
                   speedup_vs_full=median(speed), speedup_spread=[min(speed), max(speed)],
                   memory_reduction_vs_full=median(memory),
                   memory_reduction_bound=full[0]["memory_bound_bytes"] / rs[0]["memory_bound_bytes"],
                   flop_bound_speedup=full[0]["flops_per_step"] / rs[0]["flops_per_step"])
        row["fraction_of_flop_bound"] = row["speedup_vs_full"] / row["flop_bound_speedup"]
        out[name] = row
    return out


def print_table(results: dict[str, dict], title: str) -> None:
    print(title)
    print(f"{'config':<14}{'tokens/s':>9}{'speedup [min-max]':>21}{'FLOP bound':>11}"
          f"{'of bound':>9}{'peak MB':>9}{'bound MB':>9}{'mem red.':>9}{'bound red.':>11}")
    for name, r in results.items():
        lo, hi = r["speedup_spread"]
        print(f"{name:<14}{r['tokens_per_s']:>9.0f}{r['speedup_vs_full']:>8.2f}x [{lo:.2f}-{hi:.2f}]"
              f"{r['flop_bound_speedup']:>10.2f}x{100 * r['fraction_of_flop_bound']:>8.0f}%"
              f"{r['peak_mem_bytes'] / 2**20:>9.0f}{r['memory_bound_bytes'] / 2**20:>9.0f}"
              f"{r['memory_reduction_vs_full']:>8.2f}x{r['memory_reduction_bound']:>10.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--model", help="HF name or path (default: OPT-shaped model from a config)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--autocast", choices=["no", "bf16"], default="no",
                   help="bfloat16 autocast over float32 weights (mixed precision, as the paper's "
                        "GPU runs)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--l", type=int, default=2)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first is counted)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every configuration")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.prepare:
        print(prepare_workdir(args, args.workdir))
        return
    argv = sys.argv[1:]
    if "--out" in argv:
        i = argv.index("--out")
        argv = argv[:i] + argv[i + 2:]
    with tempfile.TemporaryDirectory() as tmp:
        depth = int(run_child(["--prepare", "--workdir", tmp, *argv]))
        results = summarise(run_interleaved(args, tmp, argv))
    shape = args.model or f"OPT-shaped {depth} blocks, hidden {args.hidden}"
    print_table(results, f"model {shape}, {args.l}-{args.k}-{args.r}, batch {args.batch}, "
                f"seq {args.seq}, device {results['full']['device']}, autocast {args.autocast}, "
                f"{args.repeats} interleaved "
                f"repeats of {args.steps} steps (medians)")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in {"out", "worker", "workdir"}}
        args.out.write_text(json.dumps({
            "configs": results, "settings": settings,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "torch": torch.__version__,
                        "cuda": torch.cuda.is_available()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
