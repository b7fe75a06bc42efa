"""Harmonizers (ScaleOT-style): a small trainable module standing in for each dropped span.

A kept emulator block that stands in for several original blocks (``plan.spans[j] > 1``)
gets a bottleneck residual after it, ``h + expand(act(reduce(rms_norm(h))))``, trained by the
model owner with the distillation loss (so ``split.distill.steps`` must be > 0). ``expand``
starts at zero, so an untrained harmonizer leaves the emulator exactly as it was. Its tensors
ship inside the block (``"<index>.harmonizer.reduce.weight"``, ...), frozen for the data owner
like the rest of the emulator; the layer itself is in ``harmonizer_layers.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Method

PREFIX = "harmonizer."


class BottleneckHarmonizer(Method):
    name: Literal["bottleneck"] = "bottleneck"
    width: int = Field(64, ge=1, description="bottleneck width of each harmonizer (the hidden "
                       "size is the model's)")

    def initial(self, hidden: int, plan, seed: int = 0) -> dict:
        """Untrained harmonizer tensors (``"<index>.harmonizer...."``) for every kept block
        that stands in for a dropped span."""
        from .harmonizer_layers import initial_tensors

        spanning = sorted({i for i, span in zip(plan.emulator, plan.spans) if span > 1})
        return {f"{i}.{PREFIX}{k}": v for i in spanning
                for k, v in initial_tensors(hidden, self.width, seed + i).items()}

    @classmethod
    def prepare_block(cls, block, state: dict) -> None:
        """Give ``block`` the harmonizer its ``state`` carries (no-op if none)."""
        if any(k.startswith(PREFIX) for k in state):
            from .harmonizer_layers import attach
            attach(block, {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
