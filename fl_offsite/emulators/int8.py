"""int8 emulator (config): per-output-channel symmetric 8-bit weights for the emulator's
linear layers; the tensors and the ``Int8Linear`` layer are in ``int8_layers.py`` (imported
only when a bundle is made or loaded, so a config validates without torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from .base import Compression

SCALE_SUFFIX = "_scale"


class Int8Compression(Compression):
    name: Literal["int8"] = "int8"
    own_suffixes: ClassVar[tuple[str, ...]] = (SCALE_SUFFIX,)

    def weight_bytes(self, dtype_bytes: int) -> float:
        return 1.0

    def compress_block(self, block, state, index=None):
        from .int8_layers import quantize_block
        return quantize_block(block, state)

    @classmethod
    def prepare_block(cls, block, state):
        from .int8_layers import use_int8_layers
        use_int8_layers(block, state)
