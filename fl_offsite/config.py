"""Run configuration: YAML file + ``--set key=value`` overrides, validated by pydantic.

Unknown keys and wrong types are refused with one line naming the dotted key and the fix.
The same dotted keys are Flower's run-config keys (``flwr run . --run-config 'rounds=2'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .errors import UserError


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
    eval_every: int = Field(50, ge=1, description="held-out check (best step is kept)")
    seed: int = 0


class SplitConfig(_Section):
    adapter_bottom: int = Field(2, ge=0)
    adapter_top: int = Field(2, ge=0)
    emulator_layers: int | None = Field(None, ge=1)
    drop_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    layer_selection: Literal["uniform", "similarity"] = "uniform"
    repeat_blocks: bool = Field(False, description="similarity: repeat each kept block over "
                                "the blocks it stands in for (CRaSh-style sharing)")
    quantize: Literal["int8"] | None = None
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _needs_public_data(self):
        if self.distill.data is None and (self.distill.steps or
                                          self.layer_selection == "similarity"):
            raise ValueError("distill.data is missing: distillation and similarity-based "
                             "layer selection need public text (--distill-data, or "
                             "split.distill.data in a config)")
        if self.repeat_blocks and self.layer_selection != "similarity":
            raise ValueError("repeat_blocks needs layer_selection: similarity")
        return self


class DataConfig(_Section):
    path: str = Field(description="local file/dir, packaged fl-offsite/<name>, or hub name")
    block_size: int = Field(128, ge=8)
    eval_split: str = "test"
    max_eval_examples: int | None = Field(None, ge=1)
    max_train_examples: int | None = Field(None, ge=1)


class PartitionConfig(_Section):
    name: Literal["iid", "dirichlet", "shard"] = "iid"
    by: str = Field("label", description="column the non-IID partitioners group by")
    alpha: float = Field(0.5, gt=0.0)
    shards_per_client: int = Field(2, ge=1)
    seed: int = 0


class TuningConfig(_Section):
    kind: Literal["blocks", "lora", "bitfit"] = "blocks"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TrainConfig(_Section):
    lr: float = Field(3e-4, gt=0.0)
    local_epochs: float = Field(1.0, gt=0.0)
    local_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


class StrategyConfig(_Section):
    name: str = "fedavg"
    proximal_mu: float = Field(0.01, ge=0.0, description="fedprox")
    server_lr: float | None = Field(None, gt=0.0, description="fedavgm (default 1.0) / fedadam, "
                                    "fedyogi, fedadagrad (eta, default 1e-3)")
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="fedavgm")
    eta_l: float = Field(0.0316, gt=0.0, description="fedadam / fedyogi / fedadagrad")
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)
    trim_beta: float = Field(0.2, gt=0.0, lt=0.5, description="trimmed_mean")
    num_malicious: int = Field(0, ge=0, description="krum")
    krum_keep: int = Field(1, ge=1, description="krum: 1 = Krum, >1 = multi-Krum")
    max_update_norm: float | None = Field(None, gt=0.0, description="reject larger updates")
    clip_norm: float | None = Field(None, gt=0.0, description="clip each update to this norm")


class FaultsConfig(_Section):
    """Fault drills: failures injected on purpose (off by default)."""

    crash: float = Field(0.0, ge=0.0, le=1.0, description="probability a sampled owner raises")
    nan_update: float = Field(0.0, ge=0.0, le=1.0, description="fraction of uploads with NaN")
    wrong_shape: float = Field(0.0, ge=0.0, le=1.0, description="fraction with a bad shape")
    huge_norm: float = Field(0.0, ge=0.0, le=1.0, description="fraction scaled by 1e6")
    hang: float = Field(0.0, ge=0.0, le=1.0, description="probability an owner sleeps past "
                                                        "the round timeout")
    die: float = Field(0.0, ge=0.0, le=1.0, description="probability an owner's worker "
                                                       "process exits hard")
    seed: int = 0


class DPConfig(_Section):
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


# Strategies whose aggregate is a function of the example-weighted mean of the uploads, so they
# can run on the sum secure aggregation reveals (the robust ones need each upload on its own).
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


class SecAggConfig(_Section):
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


class RealignConfig(_Section):
    """Per-round re-alignment (FedBiOT-style): between rounds the model owner re-distils the
    emulator against the full model with the global adapter plugged in, on split.distill.data,
    and ships the new emulator blocks to each data owner as a delta of its cached bundle."""

    every: int = Field(0, ge=0, description="re-align after every this many rounds (0: off)")
    steps: int = Field(20, ge=1, description="distillation steps per re-alignment")
    lr: float = Field(1e-4, gt=0.0)


class ResourcesConfig(_Section):
    num_cpus: float = Field(1.0, gt=0.0)
    num_gpus: float = Field(0.0, ge=0.0)


class Config(_Section):
    name: str = "run"
    model: str
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
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
    ray_address: str | None = Field(None, description="attach to a running Ray cluster")
    split: SplitConfig = SplitConfig()
    data: DataConfig
    partition: PartitionConfig = PartitionConfig()
    tuning: TuningConfig = TuningConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
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
            if self.split.quantize:
                raise ValueError("realign.every: re-alignment trains the emulator, which an int8 "
                                 "emulator cannot; unset split.quantize or realign.every")
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
        if self.strategy.name not in SECAGG_STRATEGIES:
            raise ValueError(f"strategy.name: {self.strategy.name} needs every upload on its own, "
                             "but with secagg.enabled the model owner sees only their sum; use "
                             f"{', '.join(SECAGG_STRATEGIES)}, or secagg.enabled=false")
        for key in ("max_update_norm", "clip_norm"):
            if getattr(self.strategy, key) is not None:
                raise ValueError(f"strategy.{key}: the model owner cannot screen or clip single "
                                 "uploads with secagg.enabled (it sees only their sum); unset "
                                 "it (dp.clip_norm with dp.noise_multiplier > 0 clips on the data "
                                 "owner, before masking)")
        for key in ("nan_update", "wrong_shape", "huge_norm"):
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


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: {key} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set {text!r}: use key=value, e.g. --set rounds=2")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _first_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling against configs/demo.yaml)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    got = f" (got {err['input']!r})" if err["type"] not in {"extra_forbidden", "missing"} and \
        not isinstance(err.get("input"), dict) else ""
    return f"{source}: {where + ': ' if where else ''}{msg}{got}"


def build_section(name: str, values: dict) -> _Section:
    """One section (e.g. ``split`` from CLI flags), with the same one-line errors."""
    section = Config.model_fields[name].annotation
    try:
        return section.model_validate(values)
    except ValidationError as exc:
        raise UserError(_first_error(exc, name)) from None


def build(tree: dict, source: str) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_first_error(exc, source)) from None


def load(path: str | Path | None, overrides: list[str] | dict | None = None) -> Config:
    """Config from a YAML file (or none) with dotted overrides applied on top."""
    tree: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--config: {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--config: {path} is not valid YAML "
                            f"({str(exc).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise UserError(f"--config: {path} must hold a mapping of keys")
        source = str(path)
    items = overrides.items() if isinstance(overrides, dict) else \
        (parse_override(o) for o in overrides or [])
    for key, value in items:
        set_dotted(tree, key, value)
    return build(tree, source)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
