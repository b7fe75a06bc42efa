"""Server-side optimizers on the aggregated update: momentum (FedAvgM) and the adaptive
FedOpt family (FedAdam, FedYogi, FedAdagrad).

Adaptive optimizers take steps of about ``server_lr`` per coordinate, so their default is on
the scale of an adapter's weight updates; momentum's is the plain mean's 1.0.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrategyConfig


class FedAvgM(StrategyConfig):
    name: Literal["fedavgm"] = "fedavgm"
    server_lr: float = Field(1.0, gt=0.0)
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    flower_class = "FedAvgM"

    def flower_arguments(self) -> dict:
        return {"server_learning_rate": self.server_lr, "server_momentum": self.server_momentum}


class _FedOpt(StrategyConfig):
    server_lr: float = Field(1e-3, gt=0.0, description="eta")
    eta_l: float = Field(0.0316, gt=0.0)
    tau: float = Field(1e-3, gt=0.0)

    def flower_arguments(self) -> dict:
        return {"eta": self.server_lr, "eta_l": self.eta_l, "tau": self.tau}


class _WithMoments(_FedOpt):
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)

    def flower_arguments(self) -> dict:
        return {**super().flower_arguments(), "beta_1": self.beta_1, "beta_2": self.beta_2}


class FedAdam(_WithMoments):
    name: Literal["fedadam"] = "fedadam"
    flower_class = "FedAdam"


class FedYogi(_WithMoments):
    name: Literal["fedyogi"] = "fedyogi"
    flower_class = "FedYogi"


class FedAdagrad(_FedOpt):
    name: Literal["fedadagrad"] = "fedadagrad"
    flower_class = "FedAdagrad"
