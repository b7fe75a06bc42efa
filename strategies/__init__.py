"""fl-offsite's aggregation strategies (this top-level package is fl-offsite's own; it is
installed with it and is not a general-purpose ``strategies`` library).

Each strategy is a config class (``base.StrategyConfig``) whose ``name`` is its tag in the run
config's ``strategy:`` section and whose fields are the keys it accepts; ``build`` makes the
Flower Message-API strategy. Adding one is a new module with its class and one line in
``REGISTRY``; ``Strategy`` (the config's type) is derived from the registry.
"""

from __future__ import annotations

from fl_offsite.registry import tagged_union

from .base import StrategyConfig
from .mean import FedAvg, FedProx
from .robust import Krum, Median, TrimmedMean
from .server_optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi

REGISTRY: dict[str, type[StrategyConfig]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
}

Strategy = tagged_union(REGISTRY, default="fedavg")
