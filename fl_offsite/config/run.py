"""The run config: one YAML file (plus ``--set key=value`` overrides) per federated run, and
the checks that span several of its sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from strategies import REGISTRY, FedAvg, Strategy

from ..emulators.pipeline import SplitConfig
from ..training.config import TrainConfig
from .sections import (DataConfig, DPConfig, FaultsConfig, PartitionConfig, RealignConfig,
                       ResourcesConfig, SecAggConfig, Section, TuningConfig)


class Config(Section):
    name: str = "run"
    model: str
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="of the bundle and the model owner's full model (default: the "
        "checkpoint's own); half-precision adapters train through float32 master weights")
    family: dict | None = Field(None, description="where the model's parts are, when the table "
                                "and detection get it wrong: a Family as a mapping (blocks, "
                                "embeddings, final_norm, head, lora_targets); the bundle carries "
                                "it to the data owners")
    seed: int = 0
    num_clients: int = Field(8, ge=1)
    clients_per_round: int = Field(4, ge=1)
    clients_fraction: float | None = Field(None, gt=0.0, le=1.0,
                                           description="sample this fraction instead of a count")
    rounds: int = Field(3, ge=1)
    min_clients: int = Field(1, ge=1, description="valid uploads needed to update the adapter")
    round_timeout: float = Field(600.0, gt=0.0, description="seconds to wait for training replies")
    connect_timeout: float = Field(300.0, gt=0.0, description="seconds to wait for data owners "
                                   "to answer hello and take the bundle (covers cold start)")
    bundle: str | None = Field(None, description="reuse this bundle instead of building one")
    bundle_transport: Literal["shared-path", "message"] = "shared-path"
    keep_checkpoints: int = Field(2, ge=1)
    evaluate_emulator: bool = True
    owner_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="where "
                              "the model owner keeps the full model and its emulator copy for "
                              "evaluation and re-alignment (auto: the first GPU if one is "
                              "visible, else cpu)")
    eval_every: int = Field(1, ge=1, description="evaluate plug-in (and the emulator) every N "
                            "rounds and after the last")
    ray_address: str | None = Field(None, description="attach to a running Ray cluster")
    split: SplitConfig = SplitConfig()
    data: DataConfig
    partition: PartitionConfig = PartitionConfig()
    tuning: TuningConfig = TuningConfig()
    train: TrainConfig = TrainConfig()
    strategy: Strategy = FedAvg()
    resources: ResourcesConfig = ResourcesConfig()
    faults: FaultsConfig = FaultsConfig()
    dp: DPConfig = DPConfig()
    secagg: SecAggConfig = SecAggConfig()
    realign: RealignConfig = RealignConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.clients_fraction is not None:
            self.__dict__["clients_per_round"] = max(1, round(self.clients_fraction *
                                                              self.num_clients))
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds num_clients "
                             f"({self.num_clients}); lower it or add clients")
        if self.min_clients > self.clients_per_round:
            raise ValueError(f"min_clients ({self.min_clients}) exceeds clients_per_round "
                             f"({self.clients_per_round})")
        return self

    @model_validator(mode="after")
    def _realignment(self):
        if self.realign.every:
            if self.split.distill.data is None:
                raise ValueError("realign.every: re-alignment distils on public text; set "
                                 "split.distill.data")
            if self.split.compression and not self.split.compression.trainable:
                raise ValueError(f"realign.every: re-alignment trains the emulator, which "
                                 f"{self.split.compression.name} compression rules out; unset "
                                 "split.compression or realign.every")
        return self

    @model_validator(mode="after")
    def _dp_sgd(self):
        """Refuse what DP-SGD's accounting cannot cover."""
        if self.dp.mode != "dpsgd":
            return self
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum: dp.mode dpsgd takes one noisy step per sampled "
                             "batch (accumulated batches would be accounted wrongly); set "
                             "train.grad_accum=1 and raise train.batch_size instead")
        if self.train.mixed_precision != "no":
            raise ValueError("train.mixed_precision: dp.mode dpsgd trains without autocast; set "
                             "train.mixed_precision=no (a bfloat16 model via dtype works)")
        return self

    @model_validator(mode="after")
    def _secure_aggregation(self):
        """Refuse what needs to see single uploads, which SecAgg+ hides from the model owner."""
        sec, k = self.secagg, self.clients_per_round
        if not sec.enabled:
            return self
        if not self.strategy.weighted_mean:
            usable = ", ".join(n for n, c in REGISTRY.items() if c.weighted_mean)
            raise ValueError(f"strategy.name: {self.strategy.name} needs every upload on its own, "
                             "but with secagg.enabled the model owner sees only their sum; use "
                             f"{usable}, or secagg.enabled=false")
        for key in ("max_update_norm", "clip_norm"):
            if getattr(self.strategy, key) is not None:
                raise ValueError(f"strategy.{key}: the model owner cannot screen or clip single "
                                 "uploads with secagg.enabled (it sees only their sum); unset "
                                 "it (dp.clip_norm with dp.noise_multiplier > 0 clips on the data "
                                 "owner, before masking)")
        for key in self.faults.CORRUPTED_UPLOADS:
            if getattr(self.faults, key) > 0:
                raise ValueError(f"faults.{key}: corrupted-upload drills test the per-upload "
                                 "screen, which secagg.enabled rules out; set it to 0")
        if k < 2:
            raise ValueError(f"secagg.enabled: secure aggregation needs clients_per_round >= 2 "
                             f"(got {k})")
        if k * sec.quantization_range >= 2 ** 32:
            raise ValueError(f"secagg.quantization_range: {k} uploads of {sec.quantization_range} "
                             f"levels overflow the 2**32 masking modulus; use at most "
                             f"{(2 ** 32 - 1) // k}")
        if isinstance(sec.num_shares, int) and sec.num_shares > k:
            raise ValueError(f"secagg.num_shares: {sec.num_shares} shares, but only {k} data "
                             "owners per round; lower it or give a fraction")
        if isinstance(sec.num_shares, int) and isinstance(sec.reconstruction_threshold, int) \
                and sec.reconstruction_threshold >= sec.num_shares:
            raise ValueError(f"secagg.reconstruction_threshold: must be below num_shares "
                             f"({sec.num_shares}), got {sec.reconstruction_threshold}")
        return self
