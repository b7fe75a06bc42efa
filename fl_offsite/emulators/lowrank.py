"""Low-rank emulator: every linear layer of the kept middle blocks shipped and held as two SVD
factors, with per-block ranks chosen by how well they preserve the adapter's gradient.

The factors and the layer that holds them are in ``lowrank_layers.py``: the emulator is
smaller on the wire, on disk and in memory. A layer whose factors would not be smaller stays
dense (and is listed under ``emulator.uncompressed``).

The rank of a layer is ``ratio * min(out, in)``. With ``allocation: uniform`` every block gets
``rank_ratio`` (or its own from ``block_ratios``). With ``allocation: gradient`` (GradOT-style,
training-free) the model owner measures, on public text, the cosine between the adapter's
gradient through the emulator and through the emulator with one block factorised at each of
``candidates``; a greedy allocation then spends the parameter budget of ``rank_ratio``
everywhere where it buys the most gradient agreement per parameter: blocks the adapter's
training is sensitive to keep more rank.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .base import AllocatedCompression

FACTORS = ("lowrank_a", "lowrank_b")


class LowRankCompression(AllocatedCompression):
    trainable: ClassVar[bool] = True  # its layers are plain (smaller) parameters
    budget_field: ClassVar[str] = "rank_ratio"
    name: Literal["lowrank"] = "lowrank"
    rank_ratio: float = Field(0.25, gt=0.0, le=1.0, description="rank kept, as a fraction of "
                              "min(out, in) of each linear layer (the mean, with gradient "
                              "allocation)")
    candidates: list[float] = Field([0.0625, 0.125, 0.25, 0.375, 1.0], description="ratios "
                                    "gradient allocation chooses among (1: dense)")

    own_suffixes: ClassVar[tuple[str, ...]] = FACTORS

    @property
    def needs_public_data(self) -> bool:
        return self.allocation == "gradient"

    def weight_bytes(self, dtype_bytes: int) -> float:
        return dtype_bytes * min(1.0, 2 * self.rank_ratio)  # square layers; dense past 0.5

    def fit(self, model, arch, plan, emulator, public_items, pad_id, log=None) -> dict:
        if self.allocation == "uniform":
            return {"rank_ratio": self.rank_ratio, **self.given_ratios(plan)}
        from .gradient_scores import allocate, gradient_scores
        from .lowrank_layers import (linear_layers, approximated_block, as_linear_weight,
                                     factor_cost)

        layers = {i: [tuple(as_linear_weight(m, m.weight).shape)
                      for _, m in linear_layers(arch.blocks(model)[i])]
                  for i in dict.fromkeys(plan.emulator)}

        def change(index, block, state, ratio):
            return approximated_block(block, state, ratio)

        scores = gradient_scores(model, arch, plan, emulator, public_items, pad_id,
                                 sorted(self.candidates), change, self.score_batches, log)
        costs = {i: {r: sum(factor_cost(s, r) for s in shapes) for r in self.candidates}
                 for i, shapes in layers.items()}
        budget = sum(factor_cost(s, self.rank_ratio) for shapes in layers.values()
                     for s in shapes)
        self._ratios = allocate(scores, costs, budget)
        return {"rank_ratio": self.rank_ratio, "ratios": {str(i): r for i, r in
                                                          self._ratios.items()},
                "gradient_cosine": {str(i): {str(r): round(c, 5) for r, c in by.items()}
                                    for i, by in scores.items()}}

    def compress_block(self, block, state, index=None):
        from .lowrank_layers import factorize_block
        return factorize_block(block, state, self.ratio(index))

    @classmethod
    def prepare_block(cls, block, state):
        from .lowrank_layers import use_lowrank_layers
        use_lowrank_layers(block, state)

