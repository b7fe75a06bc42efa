"""MLP channel pruning (GradOT's MLP half): each kept middle block ships only its most
important MLP channels, as smaller layers of the same kind (``channels_layers.py``).

A channel's importance is its mean |activation| entering the output projection on public
text times that column's norm (``importance: activations``, Wanda-style), or, with no public
data, the product of its row and column norms (``importance: weights``). The share kept is
``keep_ratio`` in every block (``allocation: uniform``) but those given in ``block_ratios``,
or per block as the parameter budget of ``keep_ratio`` is best spent on preserving the
adapter's gradient (``allocation: gradient``, as the low-rank method does:
``gradient_scores.py``). Blocks without a separate MLP input/output pair (fused gate+up
layers, MoE experts) are shipped unpruned and listed.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PrivateAttr

from .base import AllocatedCompression

MLP_SHARE = 2 / 3  # of a block's weights (LLaMA: 8h^2 of 12h^2), for memory estimates


class ChannelPruning(AllocatedCompression):
    trainable: ClassVar[bool] = True  # its layers are plain (smaller) parameters
    budget_field: ClassVar[str] = "keep_ratio"
    name: Literal["channels"] = "channels"
    keep_ratio: float = Field(0.5, gt=0.0, le=1.0, description="share of each MLP's channels "
                              "kept (the mean, with gradient allocation)")
    importance: Literal["activations", "weights"] = Field(
        "activations", description="activations: |activation| x column norm on the public "
        "data; weights: row norm x column norm (no data needed)")
    candidates: list[float] = Field([0.125, 0.25, 0.5, 0.75, 1.0], description="ratios "
                                    "gradient allocation chooses among (1: unpruned)")

    _width: int | None = PrivateAttr(None)
    _importance: dict = PrivateAttr(default_factory=dict)
    _unpruned: set = PrivateAttr(default_factory=set)

    @property
    def needs_public_data(self) -> bool:
        return self.importance == "activations" or self.allocation == "gradient"

    def weight_bytes(self, dtype_bytes: int) -> float:
        return dtype_bytes * (1 - MLP_SHARE * (1 - self.keep_ratio))

    def fit(self, model, arch, plan, emulator, public_items, pad_id, log=None) -> dict:
        from .channels_layers import (activation_importance, mlp_layers, mlp_width,
                                      kept_channels, zeroed_block)

        self._width = mlp_width(model.config)
        record = {"keep_ratio": self.keep_ratio, "importance": self.importance,
                  **self.given_ratios(plan)}
        if not self.needs_public_data:
            return record
        from .distill import emulated_from_full
        from .gradient_scores import allocate, gradient_scores

        student = emulated_from_full(model, arch, plan, emulator)
        blocks = arch.blocks(student)
        kept = dict.fromkeys(plan.emulator)
        positions = {i: plan.order.index(i) for i in kept
                     if mlp_layers(blocks[plan.order.index(i)], self._width)[0]}
        if self.importance == "activations":
            self._importance = activation_importance(student, blocks, positions, self._width,
                                                     public_items, pad_id, self.score_batches)
        if self.allocation == "uniform":
            return record

        def change(index, block, state, ratio):
            if index not in positions:  # no MLP to prune
                return state
            keep = kept_channels(self._channel_scores(block, state, index), ratio)
            return zeroed_block(block, state, self._width, keep)

        mlp = {i: sum(blocks[p].get_submodule(name).weight.numel()
                      for name in sum(mlp_layers(blocks[p], self._width), []))
               for i, p in positions.items()}
        scores = gradient_scores(model, arch, plan, emulator, public_items, pad_id,
                                 sorted(self.candidates), change, self.score_batches, log)
        scores = {i: by for i, by in scores.items() if i in positions}
        costs = {i: {r: round(r * self._width) / self._width * mlp[i] for r in self.candidates}
                 for i in positions}
        self._ratios = allocate(scores, costs, self.keep_ratio * sum(mlp.values()))
        return {**record, "ratios": {str(i): r for i, r in self._ratios.items()},
                "gradient_cosine": {str(i): {str(r): round(c, 5) for r, c in by.items()}
                                    for i, by in scores.items()}}

    def _channel_scores(self, block, state, index):
        from .channels_layers import weight_importance
        if index in self._importance:
            return self._importance[index]
        return weight_importance(block, state, self._width)

    def compress_block(self, block, state, index=None):
        from .channels_layers import kept_channels, mlp_layers, pruned_block

        width = self._width  # set by fit, which the model owner's pipeline always runs first
        if not mlp_layers(block, width)[0]:
            self._unpruned.update(k for k, v in state.items() if v.dim() >= 2)
            return dict(state)
        return pruned_block(block, state, width, kept_channels(
            self._channel_scores(block, state, index), self.ratio(index)))

    def left_uncompressed(self, state: dict) -> list[str]:
        """The weights of blocks that had no MLP to prune."""
        return sorted(k for k in state if k in self._unpruned)

    @classmethod
    def prepare_block(cls, block, state):
        from .channels_layers import use_pruned_layers
        use_pruned_layers(block, state)
