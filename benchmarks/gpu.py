"""The GPU path in one run, one table: training efficiency on the paper's OPT-1.3B shape in
bfloat16 mixed precision, and a federated simulation of 4 data owners sharing one GPU
(``resources.num_gpus: 0.25``, the model owner's model on the GPU too), beside the paper's
efficiency figures (../shared/reference-results.md: one GPU, bf16, batch 1, sequence 512).

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--repeats 2]

About 5 minutes on one recent CUDA GPU. The model is built from OPT-1.3B's config (24 blocks,
hidden 2048, vocabulary 50,272; nothing downloaded), split 2-8-2 as in the paper; the simulation
is the demo's federation (``configs/demo.yaml``: the packaged reference model, 2 rounds) with
every data owner sampled each round. Without a CUDA device it stops with one line;
``--allow-cpu`` runs the same steps at a tiny shape on the CPU (it checks the script, not the
GPU). Prints the table and writes JSON: {"efficiency": {config: {...}}, "paper": {...},
"simulation": {...}, "machine": {...}}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("full", "full_lora", "offsite", "offsite_lora")
# The paper's OPT-1.3B 2-8-2 row: (tokens/s, peak memory MB) per configuration.
PAPER_OPT_1_3B = {"full": (1316, 30458), "full_lora": (3379, 12470),
                  "offsite": (5207, 9336), "offsite_lora": (8525, 6192)}
OPT_1_3B = ["--layers", "24", "--hidden", "2048", "--vocab", "50272", "--l", "2", "--k", "8",
            "--r", "2", "--batch", "1", "--seq", "512", "--steps", "10"]
TINY = ["--layers", "6", "--hidden", "64", "--vocab", "512", "--l", "1", "--k", "2", "--r", "1",
        "--batch", "1", "--seq", "64", "--steps", "2"]


def efficiency(shape: list[str], repeats: int, folder: Path) -> dict:
    """``train_efficiency.py`` at ``shape`` with bf16 autocast; its per-configuration rows."""
    out = folder / "efficiency.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_efficiency.py"), *shape,
               "--autocast", "bf16", "--repeats", str(repeats), "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"gpu: the efficiency run failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())["configs"]


def simulation(device: str, num_gpus: float, folder: Path) -> dict:
    """The demo's federation, 4 data owners all sampled, 2 rounds, sharing ``device``."""
    from fl_offsite import config as configs
    from fl_offsite.federation.runtime import new_run_dir, preflight
    from fl_offsite.federation.simulation import simulate

    cfg = configs.load(ROOT / "configs" / "demo.yaml", {
        "name": "gpu-benchmark", "num_clients": 4, "clients_per_round": 4, "rounds": 2,
        "owner_device": device, "resources": {"num_cpus": 1, "num_gpus": num_gpus}})
    preflight(cfg)
    started = time.time()
    summary = simulate(cfg, new_run_dir(cfg, folder / "run"))
    rounds = [r["seconds"] for r in summary["rounds"]]
    return {"data_owners": 4, "num_gpus_each": num_gpus, "owner_device": device,
            "total_s": time.time() - started, "round_s": rounds,
            "zero_shot_ppl": summary["zero_shot"]["ppl"],
            "plugin_ppl": summary["rounds"][-1]["plugin"]["ppl"]}


def print_table(eff: dict, sim: dict, title: str) -> None:
    print(title)
    print(f"{'config':<14}{'tokens/s':>10}{'speedup':>9}{'peak MB':>9}{'mem red.':>9}"
          f"{'paper tok/s':>12}{'paper MB':>9}{'paper speedup':>14}{'paper mem red.':>15}")
    paper_full = PAPER_OPT_1_3B["full"]
    for name in CONFIGS:
        r, (tok, mb) = eff[name], PAPER_OPT_1_3B[name]
        print(f"{name:<14}{r['tokens_per_s']:>10.0f}{r['speedup_vs_full']:>8.2f}x"
              f"{r['peak_mem_bytes'] / 2**20:>9.0f}{r['memory_reduction_vs_full']:>8.2f}x"
              f"{tok:>12}{mb:>9}{tok / paper_full[0]:>13.2f}x{paper_full[1] / mb:>14.2f}x")
    print(f"simulation: {sim['data_owners']} data owners x {sim['num_gpus_each']} GPU, owner on "
          f"{sim['owner_device']}: {sim['total_s']:.0f} s in all, rounds "
          + ", ".join(f"{s:.1f} s" for s in sim["round_s"])
          + f"; plug-in ppl {sim['plugin_ppl']:.1f} (zero-shot {sim['zero_shot_ppl']:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every configuration")
    p.add_argument("--allow-cpu", action="store_true",
                   help="no CUDA device: run the same steps on the CPU at a tiny shape")
    args = p.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        sys.exit("gpu: no CUDA device visible (torch.cuda.is_available() is False); run it on a "
                 "machine with one, or pass --allow-cpu to check the script on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        eff = efficiency(OPT_1_3B if cuda else TINY, args.repeats, Path(tmp))
        sim = simulation("cuda" if cuda else "cpu", 0.25 if cuda else 0.0, Path(tmp))
    device = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    shape = "OPT-1.3B shape (24 x 2048), 2-8-2" if cuda else "tiny OPT shape (6 x 64), 1-2-1"
    print_table(eff, sim, f"{shape}, batch 1, seq 512 on GPU, bf16 autocast, {device}; the "
                f"paper: OPT-1.3B 2-8-2, one GPU, bf16")
    if args.out:
        args.out.write_text(json.dumps({
            "efficiency": eff, "simulation": sim,
            "paper": {k: {"tokens_per_s": t, "peak_mem_mb": m} for k, (t, m) in PAPER_OPT_1_3B.items()},
            "machine": {"device": device, "platform": platform.platform(),
                        "torch": torch.__version__, "cuda": cuda}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
