"""Will a data owner fit in memory? A simple estimate, checked before it loads or trains.

The estimate, in bytes (``tokens`` is ``data.block_size``, or patches + 1 for images):

- ``weights = 1.5 x`` the bundle's tensor files (tensors load as stored, an int8 emulator stays
  int8; the half covers loading copies and the tokenizer);
- ``optimizer = 3 x`` the adapter blocks' tensors: their gradients and AdamW's two moments (an
  upper bound for LoRA and BitFit, which train fewer tensors);
- ``dpsgd = 2 x batch_size x`` the adapter blocks' tensors: Opacus' per-example gradients and
  their clipped copy (``dp.mode: dpsgd`` only);
- ``activations = batch_size x tokens x 4 x (layers x (8 hidden + 2 ffn + 2 heads x tokens)
  + 3 vocab)`` plus 64 MiB of workspace: what backpropagation through the emulated model keeps
  (all its layers: the bottom adapter blocks need the gradient through the frozen middle).

On the reference model's 2-4-2 bundle it is 1.1x to 1.3x the measured peak (numbers in the
README). The budget is what psutil reports available, divided
among the data owners a simulation runs at once (``FL_OFFSITE_PARALLEL_CLIENTS``, set by the
simulation); a node config ``memory-limit-mb`` or ``$FL_OFFSITE_MEMORY_LIMIT_MB`` replaces it
(the megabytes one data owner may use). A data owner that does not fit raises
``MemoryBudgetError``: Flower answers the model owner with that error, the round counts the
data owner as failed and goes on, and the worker process stays alive. The check is about CPU
memory; on a GPU the activations live on the device and are not checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

MB = 2 ** 20
LIMIT_ENV = "FL_OFFSITE_MEMORY_LIMIT_MB"
PARALLEL_ENV = "FL_OFFSITE_PARALLEL_CLIENTS"
WORKSPACE = 64 * MB
PROCESS = 512 * MB  # one Python process with torch and transformers imported (measured ~0.5 GB)
TENSOR_FILES = ("emulator.safetensors", "shared.safetensors", "adapter.safetensors")
FIX = ("lower train.batch_size or data.block_size, run fewer data owners at once (raise "
       "resources.num_cpus), or compress the emulator (split.compression.name=int8)")


class MemoryBudgetError(UserError):
    """A data owner would not fit in the memory it has."""


@dataclass
class Estimate:
    weights: int
    training: int = 0
    batch_size: int = 0
    tokens: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.training

    def describe(self) -> str:
        if not self.training:
            return f"about {self.total / MB:.0f} MB for the bundle"
        return (f"about {self.total / MB:.0f} MB (bundle {self.weights / MB:.0f} MB + training "
                f"{self.training / MB:.0f} MB at train.batch_size {self.batch_size} x "
                f"{self.tokens} tokens)")


def _first(config: dict, *keys: str, default: int) -> int:
    for source in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(source.get(key), int):
                return source[key]
    return default


def _dims(config: dict, block_size: int) -> dict:
    """Sizes the activation estimate needs, from a transformers config (as a dict)."""
    hidden = _first(config, "hidden_size", "n_embd", "d_model", default=768)
    if "image_size" in config and "patch_size" in config:
        size, patch = config["image_size"], config["patch_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        tokens, vocab = (size // patch) ** 2 + 1, len(config.get("id2label") or {}) or 2
    else:
        tokens, vocab = block_size, _first(config, "vocab_size", default=50000)
    return {"hidden": hidden, "tokens": tokens, "vocab": vocab,
            "ffn": _first(config, "ffn_dim", "intermediate_size", "n_inner", default=4 * hidden),
            "heads": _first(config, "num_attention_heads", "n_head", default=max(1, hidden // 64)),
            "layers": _first(config, "num_hidden_layers", "n_layer", default=1)}


def training_bytes(config: dict, adapter_bytes: int, batch_size: int, block_size: int,
                   dpsgd: bool = False) -> tuple[int, int]:
    """(bytes for training, tokens per example) on top of the loaded weights. A half-precision
    adapter trains through float32 master weights (training/loop.py): the optimizer's state
    is counted at float32 size, plus the master copy."""
    d = _dims(config, block_size)
    per_token = d["layers"] * (8 * d["hidden"] + 2 * d["ffn"] + 2 * d["heads"] * d["tokens"]) \
        + 3 * d["vocab"]
    activations = batch_size * d["tokens"] * 4 * per_token + WORKSPACE
    master = adapter_bytes * 4 // _itemsize(config)
    optimizer = 3 * master + (master - adapter_bytes) + \
        (2 * batch_size * master if dpsgd else 0)
    return int(activations + optimizer), d["tokens"]


def _itemsize(config: dict) -> int:
    """Bytes per weight of the dtype a config names (4 if it names none)."""
    return {"float16": 2, "bfloat16": 2}.get(str(config.get("dtype") or
                                                  config.get("torch_dtype")), 4)


def bundle_estimate(bundle_dir: str | Path, task: dict | None = None) -> Estimate:
    """A data owner's estimate from its bundle directory (config and file sizes only) and, if
    given, the training task the model owner sent (batch size, block size, DP mode)."""
    bundle_dir = Path(bundle_dir)
    files = {n: (bundle_dir / n).stat().st_size for n in TENSOR_FILES
             if (bundle_dir / n).is_file()}
    estimate = Estimate(int(1.5 * sum(files.values())))
    if task is None:
        return estimate
    config = json.loads((bundle_dir / "config.json").read_text())
    batch = int(task["train"]["batch_size"])
    dpsgd = (task.get("dp") or {}).get("mode") == "dpsgd"
    estimate.training, estimate.tokens = training_bytes(
        config, files.get("adapter.safetensors", 0), batch, int(task["block_size"]), dpsgd)
    estimate.batch_size = batch
    return estimate


def config_estimate(cfg) -> Estimate:
    """The same estimate before any bundle exists: sizes from a weightless copy of the model."""
    import torch

    from ..models.families import resolve
    from ..offsite.bundle import emulated_config
    from ..models.loading import AUTO_CLASSES, DTYPES, config_dtype, load_config, task_of_config
    from ..offsite.plan import make_plan

    if cfg.bundle:
        return bundle_estimate(cfg.bundle, {"train": {"batch_size": cfg.train.batch_size},
                                            "block_size": cfg.data.block_size,
                                            "dp": cfg.dp.model_dump()})
    config = load_config(cfg.model)
    dtype = cfg.dtype or config_dtype(config)
    with torch.device("meta"):
        model = AUTO_CLASSES[task_of_config(config)].from_config(config)
    blocks = resolve(model).blocks(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    shared = sum(p.numel() for p in model.parameters()) - sum(block_params)
    plan = make_plan(len(blocks), cfg.split.adapter_bottom, cfg.split.adapter_top,
                     cfg.split.emulator_layers, cfg.split.drop_ratio)
    size = torch.finfo(DTYPES[dtype]).bits // 8
    compression = cfg.split.compression
    per_weight = compression.weight_bytes(size) if compression else size
    middle = sum(block_params[i] for i in plan.emulator) * per_weight
    adapter = sum(block_params[i] for i in plan.adapter) * size
    estimate = Estimate(int(1.5 * (shared * size + middle + adapter)))
    emulated = {**emulated_config(config, plan).to_dict(), "dtype": dtype}
    estimate.training, estimate.tokens = training_bytes(
        emulated, adapter, cfg.train.batch_size, cfg.data.block_size, cfg.dp.mode == "dpsgd")
    estimate.batch_size = cfg.train.batch_size
    return estimate


def parallel_clients(cfg) -> int:
    """How many data owners Flower's Ray backend runs at once on this machine."""
    cpus = os.cpu_count() or 1
    at_once = min(cfg.clients_per_round, max(1, int(cpus // cfg.resources.num_cpus)))
    if cfg.resources.num_gpus > 0:
        import torch
        gpus = torch.cuda.device_count()
        at_once = min(at_once, max(1, int(gpus // cfg.resources.num_gpus)))
    return at_once


def _limit(node_config=None) -> tuple[int | None, str]:
    """(bytes one data owner may use, where that was set), or (None, "") if not set."""
    value, source = (node_config or {}).get("memory-limit-mb"), "memory-limit-mb"
    if value in (None, ""):
        value, source = os.environ.get(LIMIT_ENV), f"${LIMIT_ENV}"
    if value in (None, ""):
        return None, ""
    try:
        return int(float(value) * MB), source
    except ValueError:
        raise UserError(f"{source}: {value!r} is not a number of megabytes") from None


def check_data_owner(estimate: Estimate, node_config=None, resident: int = 0,
                     who: str = "this data owner") -> None:
    """Raise ``MemoryBudgetError`` if ``estimate`` exceeds this data owner's budget.

    ``resident``: bytes of the estimate already in memory (a bundle loaded in an earlier round),
    which the available figure no longer includes."""
    import psutil

    limit, source = _limit(node_config)
    if limit is not None:
        budget = limit
    else:
        available = psutil.virtual_memory().available
        parallel = max(1, int(os.environ.get(PARALLEL_ENV, "1") or 1))
        budget = available // parallel + resident
        source = (f"{available / MB:.0f} MB available" +
                  (f" / {parallel} data owners at once" if parallel > 1 else ""))
    if estimate.total > budget:
        raise MemoryBudgetError(f"memory: {who} needs {estimate.describe()} but has "
                                f"{budget / MB:.0f} MB ({source}); {FIX}")


def check_simulation(cfg) -> None:
    """Refuse a simulation whose data owners, as many as run at once, would not fit."""
    import psutil

    estimate = config_estimate(cfg)
    parallel = parallel_clients(cfg)
    limit, source = _limit()
    if limit is not None:
        if estimate.total > limit:
            raise UserError(f"memory: each data owner needs {estimate.describe()}, over the "
                            f"{limit / MB:.0f} MB of {source}; {FIX}")
        return
    available = psutil.virtual_memory().available
    need = parallel * (estimate.total + PROCESS)
    if need > available:
        raise UserError(f"memory: {parallel} data owners at once need about {need / MB:.0f} MB "
                        f"(each {estimate.describe()}, plus {PROCESS // MB} MB for its process) "
                        f"but {available / MB:.0f} MB is available; {FIX}")
