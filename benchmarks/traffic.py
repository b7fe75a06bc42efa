"""Traffic of a federated run: bytes down / up per round and in total, against the size of the
full model and of the bundle.

    python benchmarks/traffic.py [--config configs/demo.yaml] [--set key=value ...] [--out FILE.json]

Runs the simulation (a real Flower + Ray run, in a temporary run directory) and reads its
summary.json. The bundle moves once per data owner; after that only adapters move.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from fl_offsite import config as configs
    from fl_offsite.fileio import tensor_bytes
    from fl_offsite.federation.runtime import new_run_dir, preflight
    from fl_offsite.federation.simulation import simulate
    from fl_offsite.models.loading import load_model

    cfg = configs.load(args.config, dict(configs.parse_override(o) for o in args.set))
    preflight(cfg)
    full_bytes = tensor_bytes(dict(load_model(cfg.model, cfg.dtype).state_dict()))
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(cfg, new_run_dir(cfg, Path(tmp) / "run"))
    bundle, adapter = summary["bundle"]["bytes"], summary["bundle"]["adapter_bytes"]
    rounds = [{k: r[k] for k in ("round", "clients_sampled", "bundles_sent", "bytes_down",
                                  "bytes_up")} for r in summary["rounds"]]
    total_down = sum(r["bytes_down"] for r in rounds)
    total_up = sum(r["bytes_up"] for r in rounds)
    print(f"full model {full_bytes / 1e6:.2f} MB | bundle {bundle / 1e6:.2f} MB "
          f"({bundle / full_bytes:.0%} of the model) | adapter {adapter / 1e6:.3f} MB")
    print(f"{'round':>5}{'sampled':>9}{'bundles':>9}{'down MB':>10}{'up MB':>9}"
          f"{'down = bundles + adapters':>28}")
    for r in rounds:
        check = r["bundles_sent"] * bundle + r["clients_sampled"] * adapter == r["bytes_down"]
        print(f"{r['round']:>5}{r['clients_sampled']:>9}{r['bundles_sent']:>9}"
              f"{r['bytes_down'] / 1e6:>10.2f}{r['bytes_up'] / 1e6:>9.2f}{str(check):>28}")
    print(f"total: {total_down / 1e6:.2f} MB down, {total_up / 1e6:.2f} MB up "
          f"({cfg.num_clients} data owners, {cfg.rounds} rounds)")
    if args.out:
        args.out.write_text(json.dumps({
            "config": cfg.model_dump(mode="json"), "full_model_bytes": full_bytes,
            "bundle_bytes": bundle, "adapter_bytes": adapter, "rounds": rounds,
            "total_bytes_down": total_down, "total_bytes_up": total_up}, indent=2) + "\n")


if __name__ == "__main__":
    main()
