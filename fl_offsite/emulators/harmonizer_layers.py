"""The harmonizer layer (``harmonizer.py`` is its config) and how a block carries it: as a
``harmonizer`` submodule plus a forward hook that passes the block's output through it, so
the block's own parameter names, and every tool that reads blocks by name, are unchanged."""

from __future__ import annotations

import math

import torch


class Harmonizer(torch.nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.reduce = torch.nn.Linear(hidden, width, bias=False)
        self.expand = torch.nn.Linear(width, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # normalised input: real LLMs put norms of ~10^4 on a few tokens (SmolLM2's first)
        x = torch.nn.functional.rms_norm(hidden_states, hidden_states.shape[-1:])
        return hidden_states + self.expand(torch.nn.functional.gelu(self.reduce(x)))


def initial_tensors(hidden: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(hidden)
    return {"reduce.weight": torch.empty(width, hidden).uniform_(-bound, bound,
                                                                 generator=generator),
            "expand.weight": torch.zeros(hidden, width)}


def _harmonize(block, args, output):
    if isinstance(output, tuple):
        return (block.harmonizer(output[0]),) + output[1:]
    return block.harmonizer(output)


def attach(block: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Add a harmonizer shaped like ``state`` (its tensors are loaded with the block's)."""
    width, hidden = state["reduce.weight"].shape
    if not hasattr(block, "harmonizer"):
        block.harmonizer = Harmonizer(hidden, width)
        block.register_forward_hook(_harmonize)
