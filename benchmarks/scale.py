"""Scale: many virtual data owners, few sampled per round.

    python benchmarks/scale.py [--sizes 10 1000] [--per-round 10] [--rounds 3] [--out FILE.json]

For each federation size, a Flower + Ray simulation of the packaged tiny model in which
``--per-round`` data owners train per round. Reports seconds per warm round, the first
round (cold start: Ray, the hello to every data owner, the bundle), and the peak resident
memory of the whole process tree (driver + Ray workers), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil


class PeakMemory:
    """Peak total RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_data(folder: Path, rows: int) -> str:
    """A language-modelling set big enough for ``rows`` data owners (pydoc, regrouped)."""
    from fl_offsite.training import data

    docs = data.load_split("fl-offsite/pydoc", "train")["text"]
    folder.mkdir()
    lines = [" ".join(docs[(3 * i + j) % len(docs)] for j in range(3)) for i in range(rows)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:20]))
    return str(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from fl_offsite import config as configs
    from fl_offsite.federation.runtime import new_run_dir
    from fl_offsite.federation.simulation import simulate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_data(Path(tmp) / "data", 2 * max(args.sizes))
        for n in args.sizes:
            cfg = configs.load(None, {
                "name": f"scale-{n}", "model": "fl-offsite/tiny-opt", "num_clients": n,
                "clients_per_round": args.per_round, "rounds": args.rounds,
                "evaluate_emulator": False, "split": {"emulator_layers": 2},
                "data": {"path": data_dir, "block_size": 32, "max_eval_examples": 5},
                "train": {"max_steps": 1, "batch_size": 2}})
            started = time.perf_counter()
            with PeakMemory() as memory:
                summary = simulate(cfg, new_run_dir(cfg, Path(tmp) / f"run-{n}"))
            seconds = [r["seconds"] for r in summary["rounds"]]
            rows.append({"data_owners": n, "per_round": args.per_round,
                         "total_s": time.perf_counter() - started,
                         "first_round_s": seconds[0],
                         "warm_round_s": sum(seconds[1:]) / max(1, len(seconds) - 1),
                         "peak_rss_bytes": memory.peak})
    print(f"{'owners':>7}{'per round':>10}{'total s':>9}{'round 1 s':>10}{'warm round s':>13}"
          f"{'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['data_owners']:>7}{r['per_round']:>10}{r['total_s']:>9.1f}"
              f"{r['first_round_s']:>10.1f}{r['warm_round_s']:>13.2f}"
              f"{r['peak_rss_bytes'] / 2**20:>12.0f}")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
