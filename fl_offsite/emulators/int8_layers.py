"""The int8 emulator's tensors and layers (``int8.py`` is its config): per-output-channel
symmetric quantisation of the emulator's linear layers.

The model owner quantises the kept middle blocks when writing the bundle; the data owner keeps
them as int8 in memory (``Int8Linear``) and dequantises one layer at a time inside forward and
backward, so the emulator is about 4x smaller on the wire, on disk and at rest in memory. Only
the emulator is quantised: the adapter stays in full precision because it is trained, and the
shared parts (embeddings, head) stay too because the adapter is plugged back next to them.

In the bundle a quantised weight ``<block>.<path>.weight`` is int8 of shape (out, in) with a
float32 ``<block>.<path>.weight_scale`` of shape (out,). GPT-2's ``Conv1D`` stores its weight
as (in, out); it is transposed once on the way in, so every quantised layer is a plain linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .int8 import SCALE_SUFFIX


def is_quantizable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, Conv1D))


def as_linear_weight(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s weight in (out, in) layout (Conv1D stores (in, out))."""
    return weight.t() if isinstance(module, Conv1D) else weight


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-row scale) with ``weight ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def quantize_block(block: torch.nn.Module, state: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """``state`` (the tensors of a block shaped like ``block``) with every linear weight
    quantised; other tensors unchanged."""
    state = dict(state)
    for name, module in block.named_modules():
        if is_quantizable(module):
            key = f"{name}.weight"
            q, scale = quantize_weight(as_linear_weight(module, state[key]))
            state[key] = q
            state[key + SCALE_SUFFIX] = scale
    return state


class _Int8Matmul(torch.autograd.Function):
    """``x @ W.T`` that saves the int8 weight, not a float copy, for the backward pass."""

    @staticmethod
    def forward(ctx, x, q, scale):
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize(q, scale, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        return grad @ dequantize(q, scale, grad.dtype), None, None


class Int8Linear(torch.nn.Module):
    """A frozen linear layer stored as int8 + per-output-channel scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight" + SCALE_SUFFIX, torch.ones(out_features, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device),
                                       requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Int8Matmul.apply(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def use_int8_layers(block: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Swap the linear layers whose weights ``state`` holds quantised for ``Int8Linear``
    (before the state is loaded into ``block``)."""
    for name, module in list(block.named_modules()):
        if is_quantizable(module) and f"{name}.weight{SCALE_SUFFIX}" in state:
            out_features, in_features = state[f"{name}.weight"].shape
            replacement = Int8Linear(in_features, out_features, module.bias is not None,
                                     device=module.weight.device)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child,
                    replacement)
