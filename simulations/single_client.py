"""Single-client offsite-tuning (the paper's setting): one data owner holds all the data, on
the same Flower apps (same as ``fl-offsite offsite --config configs/demo.yaml``).

    python simulations/single_client.py [--config configs/demo.yaml] [--rounds N]
"""

import argparse

from _run import final, run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="configs/demo.yaml")
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()
summary = run(args.config, {"rounds": args.rounds, "num_clients": 1, "clients_per_round": 1,
                            "min_clients": 1, "partition.name": "iid"})
metric, plugin, zero_shot = final(summary)
print(f"plug-in {metric} {plugin:.4g} vs zero-shot {zero_shot:.4g}: {summary['run_dir']}")
