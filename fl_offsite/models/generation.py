"""Generation from any fl-offsite model (full, emulated, plugged-in), with the KV cache where it
is sound.

Bundles are loaded with ``use_cache=False`` (training never needs the cache), but generating
without it recomputes the whole prefix per token: about 3.5x slower at 48 new tokens on
SmolLM2. An emulated model is built from a config whose blocks are renumbered, so its cache is
sound, except where one block module stands at several depths (CRaSh-style sharing): both
depths would write their keys into that module's single cache slot.
"""

from __future__ import annotations

import torch

from .families import resolve


def shares_blocks(model: torch.nn.Module) -> bool:
    """Whether one block module runs at more than one depth of ``model``."""
    blocks = list(resolve(model).blocks(model))
    return len({id(block) for block in blocks}) < len(blocks)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """``model.generate`` on an unpadded batch, cached unless the model shares blocks."""
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                          use_cache=not shares_blocks(model), **kwargs)
