"""Choosing the emulator's blocks by representation similarity instead of uniformly.

A block whose output is nearly its input (linear CKA close to 1) is well emulated by skipping
it; a block that changes the representation a lot is not. With ``k`` blocks to keep, the middle
is cut into ``k`` contiguous segments that start at the first middle block and at the ``k - 1``
other blocks with the largest change; each segment is represented by its block with the largest
change, and the rest of the segment is dropped (ShortGPT-style block influence).

With ``repeat=True`` the representative is repeated over its whole segment instead (CRaSh-style
layer sharing): the emulator keeps the full depth but ships only ``k`` distinct blocks.

Similarities are measured with the full model on public data, on a token sample drawn with
``seed``, so the choice is deterministic for a seed.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..offsite.plan import LayerPlan, make_plan
from .base import Selection


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two (tokens, features) matrices."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp(min=1e-30))


def boundary_states(model, items: list[dict], first: int, last: int, max_tokens: int = 4096,
                    seed: int = 0, batch_size: int = 8, pad_id: int = 0) -> list[torch.Tensor]:
    """Hidden states at the inputs of blocks ``first..last`` and the output of ``last``
    (``last - first + 2`` matrices of sampled, unpadded tokens)."""
    import numpy as np
    import torch

    from ..training.data import collate

    states: list[list[torch.Tensor]] = [[] for _ in range(last - first + 2)]
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = collate(items[start:start + batch_size], pad_id)
            batch.pop("labels")
            hidden = model(**batch, output_hidden_states=True).hidden_states
            mask = batch.get("attention_mask")
            for slot, h in enumerate(hidden[first:last + 2]):
                tokens = h.reshape(-1, h.shape[-1]) if mask is None else h[mask.bool()]
                states[slot].append(tokens.float())
            if sum(len(t) for t in states[0]) >= 4 * max_tokens:
                break
    stacked = [torch.cat(s) for s in states]
    picked = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(
        len(stacked[0]))[:max_tokens]))
    return [s[picked] for s in stacked]


def block_changes(states: list[torch.Tensor]) -> list[float]:
    """1 - CKA(input, output) of each block whose boundary states are given."""
    return [1.0 - linear_cka(a, b) for a, b in zip(states, states[1:])]


def similarity_plan(changes: list[float], depth: int, adapter_bottom: int, adapter_top: int,
                    emulator_layers: int | None = None, drop_ratio: float | None = None,
                    repeat: bool = False) -> LayerPlan:
    """The plan that keeps the most-changing middle blocks (``changes`` per middle block)."""
    uniform = make_plan(depth, adapter_bottom, adapter_top, emulator_layers, drop_ratio)
    k, first = len(uniform.emulator), adapter_bottom
    middle = len(changes)
    # segment starts: the first middle block and the k-1 others that change the most
    # (stable sort: ties go to the lower block)
    others = sorted(range(1, middle), key=lambda i: -changes[i])[:k - 1]
    starts = sorted([0, *others])
    ends = starts[1:] + [middle]
    emulator, spans = [], []
    for a, b in zip(starts, ends):
        best = max(range(a, b), key=lambda i: (changes[i], -i))
        if repeat:
            emulator += [first + best] * (b - a)
            spans += [1] * (b - a)
        else:
            emulator.append(first + best)
            spans.append(b - a)
    return LayerPlan(depth, uniform.bottom, tuple(emulator), uniform.top, tuple(spans))


def select_layers(model, arch, items: list[dict], adapter_bottom: int, adapter_top: int,
                  emulator_layers: int | None = None, drop_ratio: float | None = None,
                  repeat: bool = False, seed: int = 0, pad_id: int = 0
                  ) -> tuple[LayerPlan, list[float]]:
    """Measure the middle blocks on ``items`` and plan by similarity; also returns the
    changes (for the bundle's record)."""
    depth = len(arch.blocks(model))
    make_plan(depth, adapter_bottom, adapter_top, emulator_layers, drop_ratio)  # validate first
    first, last = adapter_bottom, depth - adapter_top - 1
    changes = block_changes(boundary_states(model, items, first, last, seed=seed, pad_id=pad_id))
    plan = similarity_plan(changes, depth, adapter_bottom, adapter_top, emulator_layers,
                           drop_ratio, repeat)
    return plan, changes


class SimilaritySelection(Selection):
    """Keep the blocks that change the representation most, measured on public text."""

    name: Literal["similarity"] = "similarity"
    repeat_blocks: bool = Field(False, description="repeat each kept block over the blocks it "
                                "stands in for (CRaSh-style sharing)")
    needs_public_data: ClassVar[bool] = True

    def plan(self, model, arch, split, public_items, pad_id):
        plan, changes = select_layers(model, arch, public_items, split.adapter_bottom,
                                      split.adapter_top, split.emulator_layers, split.drop_ratio,
                                      self.repeat_blocks, split.distill.seed, pad_id)
        return plan, {"public_data": split.distill.data, "repeat_blocks": self.repeat_blocks,
                      "block_changes": [round(c, 6) for c in changes]}
