"""The two kinds of emulator method and what each must provide.

- A **selection** decides which middle blocks the emulator keeps, and where (``LayerPlan``).
- A **compression** rewrites the kept blocks' tensors before they are shipped (int8, ...) and
  tells the data owner how to hold them (``prepare_block``).

Distillation (``distill.py``) sits between them: it trains the kept blocks on public text.
Every method is a pydantic config class tagged by ``name``; its fields are its settings.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..errors import UserError


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    needs_public_data: ClassVar[bool] = False

    def record(self) -> dict:
        """What ``offsite.json`` says about how the emulator was made (beyond the name)."""
        return {}


class Selection(Method):
    def plan(self, model, arch, split, public_items: list[dict] | None, pad_id: int):
        """(LayerPlan, record) for ``split``'s adapter sizes and kept-block count."""
        raise NotImplementedError


class Compression(Method):
    trainable: ClassVar[bool] = False  # can the emulator still be distilled afterwards?
    own_suffixes: ClassVar[tuple[str, ...]] = ()  # tensor names it makes (not left in float)

    def weight_bytes(self, dtype_bytes: int) -> float:
        """What a compressed linear weight costs in memory, per original weight."""
        raise NotImplementedError

    def fit(self, model, arch, plan, emulator: dict | None, public_items: list[dict] | None,
            pad_id: int, log=None) -> dict:
        """Settle per-block settings on the full model (and public data, if it
        ``needs_public_data``) before any block is compressed; returns the record."""
        return {}

    def compress_block(self, block, state: dict, index: int | None = None) -> dict:
        """``state`` (the tensors of block ``index``, shaped like ``block``) compressed."""
        raise NotImplementedError

    def left_uncompressed(self, state: dict) -> list[str]:
        """Weight matrices (2-D or more) of a compressed block state still in floating point:
        what the bundle's record must say the method did not cover (e.g. MoE experts)."""
        return sorted(k for k, v in state.items() if v.dim() >= 2 and v.is_floating_point()
                      and not k.endswith(self.own_suffixes))

    @classmethod
    def prepare_block(cls, block, state: dict) -> None:
        """Make ``block`` able to hold ``state`` if this method compressed it (no-op if not)."""
        raise NotImplementedError


class AllocatedCompression(Compression):
    """An in-layer method with a ratio per block: the one named by ``budget_field`` everywhere
    (``allocation: uniform``) except the blocks the user sets in ``block_ratios``, or picked
    among ``candidates`` within that field's budget (``allocation: gradient``)."""

    budget_field: ClassVar[str]
    allocation: Literal["uniform", "gradient"] = Field(
        "uniform", description="uniform: the same ratio in every block; gradient: per-block "
        "ratios chosen by adapter-gradient preservation on the public data")
    block_ratios: dict[int, float] = Field(
        {}, description="ratios of single blocks, by the block's index in the full model "
        "(e.g. 10=0.5,11=0.3), overriding the method's ratio there (uniform allocation)")
    score_batches: int = Field(4, ge=1, description="public batches per measurement")

    _ratios: dict[int, float] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _budget_reachable(self):
        budget = getattr(self, self.budget_field)
        if self.allocation == "gradient" and not (
                min(self.candidates) <= budget <= max(self.candidates)):
            raise ValueError(f"{self.budget_field}: {budget} is outside the candidates "
                             f"{sorted(self.candidates)}; widen split.compression.candidates")
        return self

    @model_validator(mode="after")
    def _block_ratios_valid(self):
        if self.block_ratios and self.allocation == "gradient":
            raise ValueError("block_ratios: gradient allocation chooses every block's ratio; "
                             "drop block_ratios or use allocation uniform")
        for index, ratio in self.block_ratios.items():
            if not 0 < ratio <= 1:
                raise ValueError(f"block_ratios: block {index}'s ratio {ratio} is outside "
                                 "(0, 1]")
        return self

    def ratio(self, index: int | None) -> float:
        """The ratio block ``index`` is compressed at."""
        return self._ratios.get(index, getattr(self, self.budget_field))

    def given_ratios(self, plan) -> dict:
        """Take ``block_ratios`` for ``plan``'s emulator (refusing blocks it does not keep);
        the record's ``ratios`` entry, empty if none were given."""
        kept = set(plan.emulator)
        outside = sorted(set(self.block_ratios) - kept)
        if outside:
            raise UserError(f"split.compression.block_ratios: block(s) {outside} are not "
                            f"emulator blocks; the emulator keeps {sorted(kept)}")
        self._ratios = dict(self.block_ratios)
        return {"ratios": {str(i): r for i, r in sorted(self._ratios.items())}} \
            if self._ratios else {}
