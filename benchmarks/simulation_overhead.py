"""What Flower + Ray cost on top of the data owners' own work.

The same client work (same data partitions, same local steps, same seeds) runs
(a) as a plain sequential loop in one process (load the bundle once, then for every round and
    data owner: set the global adapter, train, read the adapter back; FedAvg), and
(b) through `fl-offsite simulate` (Flower simulation on Ray, every data owner every round).

    python benchmarks/simulation_overhead.py [--sizes 4 16 64] [--rounds 3] [--repeats 3]
        [--out FILE.json]

Reported per size: cold start (everything before and after the rounds: Ray's start and stop,
model loading, the hello to every data owner, zero-shot evaluation; plus the first round's
extra over a warm one), seconds per warm round for each path, their ratio, and the per-round
overhead. The simulation runs data owners in parallel (one per CPU); the loop runs them one
after another. The two paths alternate (sim, loop, sim, loop, ...) for ``--repeats`` rounds of
measurement, so a load that comes and goes on the machine hits both; each number is the
median over the repeats, and the ratio is also given as its [min, max] over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def settings(n: int, rounds: int) -> dict:
    return {"name": f"overhead-{n}", "model": "fl-offsite/tiny-opt", "num_clients": n,
            "clients_per_round": n, "rounds": rounds, "evaluate_emulator": False,
            "split": {"emulator_layers": 2},
            "data": {"path": "fl-offsite/pydoc", "block_size": 32, "max_eval_examples": 5},
            "train": {"lr": 0.002, "max_steps": 2, "batch_size": 4}}


def sequential_loop(cfg, bundle_dir: Path) -> list[float]:
    """Seconds of client work per round, one process, no Flower."""

    from fl_offsite.training import data
    from fl_offsite.offsite.emulated import EmulatedModel
    from fl_offsite.federation.partition import partition
    from fl_offsite.models.loading import load_processor
    from fl_offsite.training.config import TrainConfig
    from fl_offsite.training.loop import train

    emulated = EmulatedModel(bundle_dir)
    current = emulated.prepare("blocks", seed=cfg.seed)
    processor = load_processor(str(bundle_dir))
    raw = data.load_split(cfg.data.path, "train")
    items = [data.prepare_dataset(partition(raw, cfg.num_clients, pid), processor,
                                  cfg.data.block_size).train_items
             for pid in range(cfg.num_clients)]
    per_round = []
    for rnd in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        uploads = []
        for pid in range(cfg.num_clients):
            emulated.set_adapter(current)
            train(emulated.model, items[pid], TrainConfig(lr=cfg.train.lr, max_steps=2,
                                                          batch_size=4), seed=rnd * 1000 + pid)
            uploads.append((emulated.adapter().tensors, len(items[pid])))
        total = sum(n for _, n in uploads)
        current = current.with_tensors({k: sum(t[k] * n for t, n in uploads) / total
                                        for k in current.tensors})
        per_round.append(time.perf_counter() - start)
    return per_round


def one_repeat(cfg, simulate, new_run_dir) -> dict:
    """One simulation, then the loop on its bundle: warm-round seconds of each and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = simulate(cfg, new_run_dir(cfg, Path(tmp) / "run"))
        total = time.perf_counter() - started
        loop = sequential_loop(cfg, Path(tmp) / "run" / "bundle")
    sim = [r["seconds_clients"] for r in summary["rounds"]]
    warm_sim = sum(sim[1:]) / len(sim[1:])
    warm_loop = sum(loop[1:]) / len(loop[1:])
    rounds_s = sum(r["seconds"] for r in summary["rounds"])
    return {"simulation_total_s": total, "cold_start_s": total - rounds_s + sim[0] - warm_sim,
            "sim_round_s": warm_sim, "loop_round_s": warm_loop,
            "ratio_sim_over_loop": warm_sim / warm_loop,
            "overhead_per_round_s": warm_sim - warm_loop}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="sim/loop pairs per size")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from fl_offsite import config as configs
    from fl_offsite.federation.runtime import new_run_dir
    from fl_offsite.federation.simulation import simulate

    rows = []
    for n in args.sizes:
        cfg = configs.load(None, settings(n, args.rounds))
        repeats = [one_repeat(cfg, simulate, new_run_dir) for _ in range(args.repeats)]
        ratios = [r["ratio_sim_over_loop"] for r in repeats]
        median = {k: statistics.median(r[k] for r in repeats) for k in repeats[0]}
        rows.append({"data_owners": n, **median, "ratio_sim_over_loop_range": [min(ratios),
                                                                               max(ratios)],
                     "overhead_per_message_ms": 1000 * median["overhead_per_round_s"] / n,
                     "repeats": repeats})
    print(f"{'owners':>6}{'cold start s':>14}{'sim round s':>13}{'loop round s':>14}"
          f"{'ratio [min-max]':>20}{'overhead/round s':>18}")
    for r in rows:
        low, high = r["ratio_sim_over_loop_range"]
        print(f"{r['data_owners']:>6}{r['cold_start_s']:>14.1f}{r['sim_round_s']:>13.2f}"
              f"{r['loop_round_s']:>14.2f}{r['ratio_sim_over_loop']:>8.2f} [{low:.2f}-{high:.2f}]"
              f"{r['overhead_per_round_s']:>18.2f}")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "rounds": args.rounds,
                                        "repeats": args.repeats}, indent=2) + "\n")


if __name__ == "__main__":
    main()
