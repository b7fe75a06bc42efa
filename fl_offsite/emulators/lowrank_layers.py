"""The low-rank emulator's factors and ``LowRankLinear`` (``lowrank.py`` is its config).

A weight ``W`` (out, in) becomes ``A = U_r S_r`` (out, r) and ``B = V_r^T`` (r, in), its best
rank-r approximation; the bundle stores ``<path>.lowrank_a`` / ``<path>.lowrank_b`` instead of
``<path>.weight``, and the data owner computes ``(x B^T) A^T``. A layer whose factors would not
be smaller stays dense.
"""


from __future__ import annotations

import torch

from .int8_layers import as_linear_weight, is_quantizable


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


def linear_layers(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The block's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``) by name."""
    return [(name, m) for name, m in block.named_modules() if is_quantizable(m)]


def factorize_block(block: torch.nn.Module, state: dict[str, torch.Tensor], ratio: float
                    ) -> dict[str, torch.Tensor]:
    """``state`` with every linear weight that shrinks replaced by its two factors."""
    state = dict(state)
    for name, module in linear_layers(block):
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
    factored = factorize_block(block, state, ratio)
    dense = dict(state)
    for name, module in linear_layers(block):
        if f"{name}.lowrank_a" in factored:
            dense[f"{name}.weight"] = as_linear_weight(
                module, factored[f"{name}.lowrank_a"] @ factored[f"{name}.lowrank_b"])
    return dense


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
    for name, module in linear_layers(block):
        if f"{name}.lowrank_a" in state:
            out_features, rank = state[f"{name}.lowrank_a"].shape
            in_features = state[f"{name}.lowrank_b"].shape[1]
            replacement = LowRankLinear(in_features, out_features, rank,
                                        module.bias is not None, device=module.weight.device)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child,
                    replacement)
