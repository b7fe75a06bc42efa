"""What every strategy's config has, and how it becomes a Flower strategy.

A strategy is a pydantic config class whose ``name`` is its tag in the run config's
``strategy:`` section; the keys it declares are the only ones it accepts. ``build`` turns it
into one of Flower's Message-API strategies (imported only then, so a config validates without
loading Flower).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class StrategyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_update_norm: float | None = Field(None, gt=0.0, description="reject larger updates")
    clip_norm: float | None = Field(None, gt=0.0, description="clip each update to this norm")
    max_weight: float | None = Field(3.0, gt=0.0, description="cap each upload's num-examples "
                                     "at this multiple of the round's median (null: as "
                                     "announced)")

    flower_class: ClassVar[str]  # class name in flwr.serverapp.strategy
    weighted_mean: ClassVar[bool] = True  # a function of the weighted mean: can run on SecAgg+

    def flower_arguments(self) -> dict:
        """Keyword arguments of the Flower class beyond sampling."""
        return {}

    def check(self, clients_per_round: int) -> None:
        """Refuse (``UserError``) settings that cannot work with this many uploads a round."""

    def flower_strategy_class(self) -> type:
        from flwr.serverapp import strategy as flwr_strategies

        return getattr(flwr_strategies, self.flower_class)

    def build(self, num_clients: int, clients_per_round: int):
        """The Flower strategy, sampling exactly ``clients_per_round`` of ``num_clients``."""
        self.check(clients_per_round)
        cls = self.flower_strategy_class()
        return cls(fraction_train=clients_per_round / num_clients, fraction_evaluate=0.0,
                   min_train_nodes=clients_per_round, min_evaluate_nodes=0,
                   min_available_nodes=clients_per_round, **self.flower_arguments())
