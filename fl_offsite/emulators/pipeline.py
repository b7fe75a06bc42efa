"""The model owner's emulator recipe (``split:`` in a run config) and the routine that
follows it: choose the kept blocks, distil them on public text, then compress (at write time).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import UserError
from ..offsite.plan import LayerPlan
from . import COMPRESSIONS, Compression, Harmonizer, Selection, UniformSelection


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DistillConfig(_Section):
    """Public data for the emulator: distillation (steps > 0) and similarity-based selection."""

    data: str | None = Field(None, description="public text: local path, fl-offsite/<name> or "
                             "hub name; never the data owners' data")
    steps: int = Field(0, ge=0, description="distillation steps (0: no distillation)")
    lr: float = Field(1e-4, gt=0.0)
    batch_size: int = Field(8, ge=1)
    block_size: int = Field(128, ge=8)
    max_examples: int | None = Field(None, ge=1)
    kd_weight: float = Field(30.0, ge=0.0, description="weight of the normalised MSE of the "
                             "middle output")
    lm_weight: float = Field(1.0, ge=0.0, description="weight of the student's task loss")
    layer_weight: float = Field(0.0, ge=0.0, description="weight of per-position matching")
    margin: float = Field(1.0, ge=0.0, description="nats the emulator's own task loss must stay "
                          "above the full model's (with margin_weight > 0)")
    margin_weight: float = Field(0.0, ge=0.0, description="weight of the margin penalty "
                                 "(LLEOT-style: the emulator alone stays bad; 0: off)")
    grad_weight: float = Field(0.0, ge=0.0, description="weight of matching the gradient "
                               "the bottom adapter receives through the middle (a second "
                               "backward through the emulator per step; 0: off)")
    eval_every: int = Field(50, ge=1, description="held-out check (best step is kept)")
    nmse: Literal["global", "per_token"] = Field(
        "global", description="global: one ratio over all tokens (Offsite-Tuning's); per_token: "
        "the mean of each token's ratio (real LLMs concentrate the hidden norm on a few tokens)")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bfloat16 autocast "
                                                    "(fast on CPUs with AMX and on GPUs)")
    after_compression: bool = Field(False, description="distil the compressed blocks "
                                    "(lowrank, channels) instead of compressing the distilled "
                                    "ones")
    seed: int = 0


class SplitConfig(_Section):
    adapter_bottom: int = Field(2, ge=0, description="l: bottom blocks in the adapter")
    adapter_top: int = Field(2, ge=0, description="r: top blocks in the adapter")
    emulator_layers: int | None = Field(None, ge=1, description="k: middle blocks kept")
    drop_ratio: float | None = Field(None, ge=0.0, lt=1.0,
                                     description="fraction of middle blocks dropped")
    selection: Selection = UniformSelection()
    distill: DistillConfig = DistillConfig()
    compression: Compression | None = None
    harmonizer: Harmonizer | None = None

    @property
    def needs_full_model(self) -> bool:
        """Does making this emulator run the model (else its bundle is read in parts)?"""
        return bool(self.distill.steps) or any(m.needs_public_data for m in self._methods())

    def _methods(self):
        return [self.selection] + ([self.compression] if self.compression else [])

    @model_validator(mode="after")
    def _needs_public_data(self):
        if self.distill.data is None and (self.distill.steps or
                                          any(m.needs_public_data for m in self._methods())):
            raise ValueError("distill.data is missing: distillation, similarity-based "
                             "layer selection and gradient-allocated compression need public "
                             "text (--distill-data, or split.distill.data in a config)")
        return self

    @model_validator(mode="after")
    def _distillable_compression(self):
        if self.distill.after_compression and not (
                self.distill.steps and self.compression and self.compression.trainable):
            trainable = ", ".join(n for n, m in COMPRESSIONS.items() if m.trainable)
            raise ValueError(f"distill.after_compression: needs distillation steps and a "
                             f"compression whose layers train ({trainable})")
        return self

    @model_validator(mode="after")
    def _gradient_has_a_receiver(self):
        if self.distill.grad_weight and not self.adapter_bottom:
            raise ValueError("distill.grad_weight: matches the gradient the bottom adapter "
                             "receives, and adapter_bottom is 0; set adapter_bottom >= 1 or "
                             "grad_weight 0")
        return self

    @model_validator(mode="after")
    def _harmonizer_is_trained(self):
        if self.harmonizer is not None and not self.distill.steps:
            raise ValueError("harmonizer: is trained by distillation; set split.distill.steps "
                             "> 0 (--distill-steps)")
        return self


def public_items(cfg: DistillConfig, processor) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items) of the public data: its validation split, or else
    the last tenth of its training items."""
    from ..training import data

    train = data.prepare(cfg.data, "train", processor, cfg.block_size, cfg.max_examples)
    try:
        held_out = data.prepare(cfg.data, "validation", processor, cfg.block_size,
                                cfg.max_examples).train_items
        return train.train_items, held_out
    except UserError:
        cut = max(1, len(train.train_items) // 10)
        return train.train_items[:-cut], train.train_items[-cut:]


def make_emulator(model, processor, split: SplitConfig, log=None
                  ) -> tuple[LayerPlan, dict | None, dict]:
    """The plan, the emulator tensors (None: the model's own blocks) and a record of how
    they were made. Compression is fitted here and applied when the bundle is written, or,
    with ``distill.after_compression``, applied here and the compressed blocks distilled."""
    from ..models.families import resolve
    from .distill import Objective, distill, emulated_from_full

    arch = resolve(model)
    pad_id = getattr(processor, "pad_token_id", 0) or 0
    public = public_items(split.distill, processor) if split.distill.data else None
    plan, details = split.selection.plan(model, arch, split, public and public[0], pad_id)
    record = {"layer_selection": split.selection.name, **details}
    emulator = None
    if split.harmonizer is not None:
        emulator, record["harmonizer"] = _with_harmonizers(model, arch, plan, split)
    d = split.distill
    if split.compression is not None and d.after_compression:
        from ..offsite.bundle import compress_emulator, keyed, split_state

        record["compression"] = split.compression.fit(model, arch, plan, emulator,
                                                      public[0], pad_id, log)
        emulator = compress_emulator(model, arch, emulator or keyed(
            split_state(model, arch)[1], plan.emulator), split.compression)
    if d.steps:
        student = emulated_from_full(model, arch, plan, emulator)
        emulator, report = distill(model, student, arch, plan, public[0], public[1],
                                   Objective.from_config(plan, d), d.steps, d.lr,
                                   d.batch_size, d.eval_every, d.seed, pad_id, log,
                                   autocast=d.mixed_precision == "bf16")
        record["distill"] = {"data": d.data, **report}
    if split.compression is not None and not d.after_compression:
        record["compression"] = split.compression.fit(model, arch, plan, emulator,
                                                      public and public[0], pad_id, log)
    return plan, emulator, record


def _with_harmonizers(model, arch, plan: LayerPlan, split: SplitConfig) -> tuple[dict, dict]:
    """The kept blocks plus untrained harmonizers, and the record of what was added."""
    from ..offsite.bundle import keyed, split_state

    dtype = next(model.parameters()).dtype
    added = {k: v.to(dtype) for k, v in split.harmonizer.initial(
        model.config.hidden_size, plan, split.distill.seed).items()}
    record = {**split.harmonizer.model_dump(), "parameters": sum(v.numel() for v in added.values()),
              "blocks": sorted({int(k.split(".", 1)[0]) for k in added})}
    return {**keyed(split_state(model, arch)[1], plan.emulator), **added}, record
