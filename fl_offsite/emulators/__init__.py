"""Emulator methods by name: how the model owner makes the frozen, lossy stand-in for the
middle blocks (``pipeline.py`` runs them: selection, then distillation, then compression).

Adding a method is one module with its config class (``base.Selection``,
``base.Compression`` or a harmonizer) and one line in a registry below; the run config's types
(``Selection``, ``Compression``, ``Harmonizer``) are derived from the registries.
"""

from __future__ import annotations

from ..registry import tagged_union
from .channels import ChannelPruning
from .harmonizer import BottleneckHarmonizer
from .int8 import Int8Compression
from .lowrank import LowRankCompression
from .similarity import SimilaritySelection
from .uniform import UniformSelection

SELECTIONS = {
    "uniform": UniformSelection,
    "similarity": SimilaritySelection,
}

COMPRESSIONS = {
    "int8": Int8Compression,
    "lowrank": LowRankCompression,
    "channels": ChannelPruning,
}

HARMONIZERS = {
    "bottleneck": BottleneckHarmonizer,
}

Selection = tagged_union(SELECTIONS, default="uniform")
Compression = tagged_union(COMPRESSIONS)
Harmonizer = tagged_union(HARMONIZERS, default="bottleneck")

# what can give an emulator block extra or replaced layers when a bundle is loaded
BLOCK_PREPARERS = (*COMPRESSIONS.values(), *HARMONIZERS.values())
