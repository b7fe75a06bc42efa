"""Uniform layer drop (Offsite-Tuning's baseline): keep evenly spaced middle blocks."""

from __future__ import annotations

from typing import Literal

from ..offsite.plan import make_plan
from .base import Selection


class UniformSelection(Selection):
    name: Literal["uniform"] = "uniform"

    def plan(self, model, arch, split, public_items, pad_id):
        return make_plan(len(arch.blocks(model)), split.adapter_bottom, split.adapter_top,
                         split.emulator_layers, split.drop_ratio), {}
