"""Aggregates that tolerate faulty or hostile uploads. Each needs every upload on its own, so
none can run on secure aggregation's sum."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fl_offsite.errors import UserError

from .base import StrategyConfig


class Median(StrategyConfig):
    """Coordinate-wise median."""

    name: Literal["median"] = "median"
    flower_class = "FedMedian"
    weighted_mean = False


class TrimmedMean(StrategyConfig):
    """Drop ``trim_beta`` of the values at each end of every coordinate, average the rest."""

    name: Literal["trimmed_mean"] = "trimmed_mean"
    trim_beta: float = Field(0.2, gt=0.0, lt=0.5)
    flower_class = "FedTrimmedAvg"
    weighted_mean = False

    def flower_arguments(self) -> dict:
        return {"beta": self.trim_beta}


class Krum(StrategyConfig):
    """Keep the upload(s) closest to their neighbours (1 = Krum, more = multi-Krum)."""

    name: Literal["krum"] = "krum"
    num_malicious: int = Field(0, ge=0)
    krum_keep: int = Field(1, ge=1)
    flower_class = "MultiKrum"
    weighted_mean = False

    def check(self, clients_per_round: int) -> None:
        if clients_per_round < 2 * self.num_malicious + 3:
            raise UserError(f"strategy.num_malicious: Krum needs clients_per_round >= "
                            f"2 * num_malicious + 3 = {2 * self.num_malicious + 3}")

    def flower_arguments(self) -> dict:
        return {"num_malicious_nodes": self.num_malicious, "num_nodes_to_select": self.krum_keep}
