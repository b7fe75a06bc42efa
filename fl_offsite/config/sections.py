"""The run config's sections that belong to no single subsystem's module: data, partition,
adapter kind, resources, fault drills, privacy and re-alignment.

(``split`` lives with the emulator methods, ``train`` with the training loop and ``strategy``
with the strategies.)
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    path: str = Field(description="local file/dir, packaged fl-offsite/<name>, or hub name")
    block_size: int = Field(128, ge=8)
    eval_split: str = "test"
    max_eval_examples: int | None = Field(None, ge=1)
    max_train_examples: int | None = Field(None, ge=1)


class PartitionConfig(Section):
    name: Literal["iid", "dirichlet", "shard"] = "iid"
    by: str = Field("label", description="column the non-IID partitioners group by")
    alpha: float = Field(0.5, gt=0.0)
    shards_per_client: int = Field(2, ge=1)
    seed: int = 0


class TuningConfig(Section):
    kind: Literal["blocks", "lora", "bitfit"] = "blocks"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class FaultsConfig(Section):
    """Fault drills: failures injected on purpose (off by default)."""

    # the order in which one seeded draw per data owner and round picks a kind
    KINDS: ClassVar[tuple[str, ...]] = ("crash", "hang", "die", "nan_update", "wrong_shape",
                                        "huge_norm", "inflated_count")
    # the ones only the model owner's per-upload screen catches (which SecAgg+ rules out)
    CORRUPTED_UPLOADS: ClassVar[tuple[str, ...]] = ("nan_update", "wrong_shape", "huge_norm")

    crash: float = Field(0.0, ge=0.0, le=1.0, description="probability a sampled owner raises")
    nan_update: float = Field(0.0, ge=0.0, le=1.0, description="fraction of uploads with NaN")
    wrong_shape: float = Field(0.0, ge=0.0, le=1.0, description="fraction with a bad shape")
    huge_norm: float = Field(0.0, ge=0.0, le=1.0, description="fraction scaled by 1e6")
    inflated_count: float = Field(0.0, ge=0.0, le=1.0, description="fraction claiming 10^9 "
                                  "examples")
    hang: float = Field(0.0, ge=0.0, le=1.0, description="probability an owner sleeps past "
                                                        "the round timeout")
    die: float = Field(0.0, ge=0.0, le=1.0, description="probability an owner's worker "
                                                       "process exits hard")
    seed: int = 0


class DPConfig(Section):
    """Client-side differential privacy: ``update`` noises each upload (off while
    noise_multiplier is 0); ``dpsgd`` trains with per-example clipping and noise (Opacus)."""

    mode: Literal["update", "dpsgd"] = "update"
    clip_norm: float = Field(1.0, gt=0.0, description="update: L2 bound of each adapter update")
    max_grad_norm: float = Field(1.0, gt=0.0, description="dpsgd: L2 bound of each example's "
                                 "gradient")
    noise_multiplier: float = Field(0.0, ge=0.0, description="noise std / clip_norm (update) "
                                    "or / max_grad_norm (dpsgd)")
    delta: float = Field(1e-5, gt=0.0, lt=1.0)

    @property
    def active(self) -> bool:
        """DP-SGD always (noise 0: clipping only, epsilon infinite); update noise when > 0."""
        return self.mode == "dpsgd" or self.noise_multiplier > 0


class SecAggConfig(Section):
    """Secure aggregation (Flower's SecAgg+): the model owner sees only the sum of the updates."""

    enabled: bool = False
    num_shares: int | float = Field(1.0, description="each data owner's secrets are split into "
                                    "this many shares: a count >= 3 or a fraction of the round")
    reconstruction_threshold: int | float = Field(0.67, description="shares needed to rebuild "
                                                  "a secret: a count >= 2 or a fraction of "
                                                  "num_shares")
    clipping_range: float = Field(1.0, gt=0.0, description="each coordinate of a weighted "
                                  "update is clipped to +-this, then quantized")
    quantization_range: int = Field(2 ** 22, ge=2, description="integer levels over "
                                    "[-clipping_range, clipping_range]")
    max_weight: float = Field(1000.0, gt=0.0, description="largest num-examples of one upload "
                              "(weights are num-examples / max_weight)")

    @field_validator("num_shares", "reconstruction_threshold")
    @classmethod
    def _count_or_fraction(cls, value, info):
        least = 3 if info.field_name == "num_shares" else 2
        if isinstance(value, bool) or (isinstance(value, float) and not 0.0 < value <= 1.0) or \
                (isinstance(value, int) and value < least):
            raise ValueError(f"use a count >= {least} or a fraction in (0, 1]")
        return value


class RealignConfig(Section):
    """Per-round re-alignment (FedBiOT-style): between rounds the model owner re-distils the
    emulator against the full model with the global adapter plugged in, on split.distill.data,
    and ships the new emulator blocks to each data owner as a delta of its cached bundle."""

    every: int = Field(0, ge=0, description="re-align after every this many rounds (0: off)")
    steps: int = Field(20, ge=1, description="distillation steps per re-alignment")
    lr: float = Field(1e-4, gt=0.0)


class ResourcesConfig(Section):
    num_cpus: float = Field(1.0, gt=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
