"""The embedded demo: 8 data owners, 4 a round, 3 rounds of FedAvg on the packaged reference
model (same as ``fl-offsite simulate --config configs/demo.yaml``).

    python simulations/demo.py [--rounds N]
"""

import argparse

from _run import final, run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()
summary = run("configs/demo.yaml", {"rounds": args.rounds})
metric, plugin, zero_shot = final(summary)
print(f"plug-in {metric} {plugin:.4g} vs zero-shot {zero_shot:.4g}: {summary['run_dir']}")
