"""The one training config: the data owner's local training, ``fl-offsite train``'s flags and
the run config's ``train:`` section are all this class."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lr: float = Field(3e-4, gt=0.0, description="AdamW learning rate")
    epochs: float = Field(1.0, gt=0.0, description="passes over the data (per round in a "
                          "federated run)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, description="batches per optimizer step")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping (0: off)")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
