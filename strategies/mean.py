"""The example-weighted mean (FedAvg) and its proximal variant (FedProx)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrategyConfig


class FedAvg(StrategyConfig):
    """Data owners honest and alike: the example-weighted mean of the uploads."""

    name: Literal["fedavg"] = "fedavg"
    flower_class = "FedAvg"


class FedProx(StrategyConfig):
    """Non-IID data: each data owner adds mu/2 ||w - w_global||^2 to its loss."""

    name: Literal["fedprox"] = "fedprox"
    proximal_mu: float = Field(0.01, ge=0.0)
    flower_class = "FedProx"

    def flower_arguments(self) -> dict:
        return {"proximal_mu": self.proximal_mu}
