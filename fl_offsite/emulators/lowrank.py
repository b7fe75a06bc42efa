"""Low-rank emulator: every linear layer of the kept middle blocks shipped and held as two SVD
factors, with per-block ranks chosen by how well they preserve the adapter's gradient.

A weight ``W`` (out, in) becomes ``A = U_r S_r`` (out, r) and ``B = V_r^T`` (r, in), its best
rank-r approximation; the bundle stores ``<path>.lowrank_a`` / ``<path>.lowrank_b`` instead of
``<path>.weight``, and the data owner computes ``(x B^T) A^T`` (``LowRankLinear``), so the
emulator is smaller on the wire, on disk and in memory. A layer whose factors would not be
smaller stays dense (and is listed under ``emulator.uncompressed``).

The rank of a layer is ``ratio * min(out, in)``. With ``allocation: uniform`` every block gets
``rank_ratio``. With ``allocation: gradient`` (GradOT-style, training-free) the model owner
measures, on public text, the cosine between the adapter's gradient through the emulator and
through the emulator with one block factorised at each of ``candidates``; a greedy allocation
then spends the parameter budget of ``rank_ratio`` everywhere where it buys the most gradient
agreement per parameter: blocks the adapter's training is sensitive to keep more rank.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, model_validator

from .base import Compression
from .int8 import as_linear_weight, is_quantizable

FACTORS = ("lowrank_a", "lowrank_b")


def rank_for(shape: tuple[int, int], ratio: float) -> int:
    return max(1, round(ratio * min(shape)))


def factor_cost(shape: tuple[int, int], ratio: float) -> int:
    """Parameters a layer of ``shape`` costs at ``ratio`` (dense when factors are not smaller)."""
    out, inp = shape
    return min(rank_for(shape, ratio) * (out + inp), out * inp)


def factorize(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``A @ B`` the best rank-``rank`` approximation of ``weight`` (out, in)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(weight.dtype), vh[:rank].to(weight.dtype)


def _linear_layers(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The block's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``) by name."""
    return [(name, m) for name, m in block.named_modules() if is_quantizable(m)]


def factorize_block(block: torch.nn.Module, state: dict[str, torch.Tensor], ratio: float
                    ) -> dict[str, torch.Tensor]:
    """``state`` with every linear weight that shrinks replaced by its two factors."""
    state = dict(state)
    for name, module in _linear_layers(block):
        weight = as_linear_weight(module, state[f"{name}.weight"])
        rank = rank_for(tuple(weight.shape), ratio)
        if rank * sum(weight.shape) < weight.numel():
            del state[f"{name}.weight"]
            state[f"{name}.lowrank_a"], state[f"{name}.lowrank_b"] = factorize(weight, rank)
    return state


def approximated_block(block: torch.nn.Module, state: dict[str, torch.Tensor], ratio: float
                       ) -> dict[str, torch.Tensor]:
    """``state`` with each weight that would be factorised replaced by ``A @ B`` (same shapes:
    what the factors compute, for measuring their effect in the block as it is)."""
    state = dict(state)
    for name, module in _linear_layers(block):
        weight = as_linear_weight(module, state[f"{name}.weight"])
        rank = rank_for(tuple(weight.shape), ratio)
        if rank * sum(weight.shape) < weight.numel():
            a, b = factorize(weight, rank)
            state[f"{name}.weight"] = as_linear_weight(module, a @ b)
    return state


class LowRankLinear(torch.nn.Module):
    """A frozen linear layer held as ``A`` (out, r) and ``B`` (r, in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.lowrank_a = torch.nn.Parameter(torch.zeros(out_features, rank, device=device),
                                            requires_grad=False)
        self.lowrank_b = torch.nn.Parameter(torch.zeros(rank, in_features, device=device),
                                            requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device),
                                       requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lowrank_b),
                                         self.lowrank_a)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.lowrank_a.shape[1]}")


def use_lowrank_layers(block: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Swap the linear layers ``state`` holds as factors for ``LowRankLinear``."""
    for name, module in _linear_layers(block):
        if f"{name}.lowrank_a" in state:
            out_features, rank = state[f"{name}.lowrank_a"].shape
            in_features = state[f"{name}.lowrank_b"].shape[1]
            replacement = LowRankLinear(in_features, out_features, rank,
                                        module.bias is not None, device=module.weight.device)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child,
                    replacement)


class LowRankCompression(Compression):
    name: Literal["lowrank"] = "lowrank"
    rank_ratio: float = Field(0.25, gt=0.0, le=1.0, description="rank kept, as a fraction of "
                              "min(out, in) of each linear layer (the mean, with gradient "
                              "allocation)")
    allocation: Literal["uniform", "gradient"] = Field(
        "uniform", description="uniform: rank_ratio everywhere; gradient: per-block ratios "
        "chosen by adapter-gradient preservation on the public data")
    candidates: list[float] = Field([0.0625, 0.125, 0.25, 0.375, 1.0], description="ratios "
                                    "gradient allocation chooses among (1: dense)")
    score_batches: int = Field(4, ge=1, description="public batches per gradient measurement")

    own_suffixes: ClassVar[tuple[str, ...]] = FACTORS
    _ratios: dict[int, float] = PrivateAttr(default_factory=dict)

    @property
    def needs_public_data(self) -> bool:
        return self.allocation == "gradient"

    @model_validator(mode="after")
    def _budget_reachable(self):
        if self.allocation == "gradient" and not (
                min(self.candidates) <= self.rank_ratio <= max(self.candidates)):
            raise ValueError(f"rank_ratio: {self.rank_ratio} is outside the candidates "
                             f"{sorted(self.candidates)}; widen split.compression.candidates")
        return self

    def weight_bytes(self, dtype_bytes: int) -> float:
        return dtype_bytes * min(1.0, 2 * self.rank_ratio)  # square layers; dense past 0.5

    def fit(self, model, arch, plan, emulator, public_items, pad_id, log=None) -> dict:
        if self.allocation == "uniform":
            return {"rank_ratio": self.rank_ratio}
        from .gradient_scores import allocate, gradient_scores

        layers = {i: [tuple(as_linear_weight(m, m.weight).shape)
                      for _, m in _linear_layers(arch.blocks(model)[i])]
                  for i in dict.fromkeys(plan.emulator)}
        scores = gradient_scores(model, arch, plan, emulator, public_items, pad_id,
                                 sorted(self.candidates), approximated_block,
                                 self.score_batches, log)
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
        return factorize_block(block, state, self._ratios.get(index, self.rank_ratio))

    @classmethod
    def prepare_block(cls, block, state):
        use_lowrank_layers(block, state)

