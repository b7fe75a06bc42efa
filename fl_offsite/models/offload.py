"""The model owner's full model when it does not fit in memory: accelerate keeps what fits
within ``max_memory`` (GPUs first, then CPU RAM) and leaves the rest on disk, loaded one block
at a time inside each forward pass. Only forward passes need the whole model (similarity
choice, the distillation teacher); every tensor that goes into the bundle or the student is
read from the checkpoint itself, block by block (``offsite.streaming``), so the bundle is the
one a fully loaded model gives.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .families import Family, use_family
from .loading import AUTO_CLASSES, DTYPES, load_config, resolve_model_path, task_of_config

CHECKPOINT_ATTRIBUTE = "fl_offsite_checkpoint"  # where split_state finds the tensors


def parse_max_memory(spec: str) -> dict:
    """``cpu=4GiB,cuda:0=20GiB`` as accelerate's ``max_memory`` ({"cpu": "4GiB", 0: "20GiB"})."""
    limits = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        device, _, size = part.partition("=")
        if not size or not (device == "cpu" or device.startswith("cuda")):
            raise UserError(f"--max-memory: {part!r} is not DEVICE=SIZE; give e.g. "
                            "cpu=4GiB,cuda:0=20GiB")
        limits["cpu" if device == "cpu" else int(device.partition(":")[2] or 0)] = size
    if not limits:
        raise UserError("--max-memory: empty; give e.g. cpu=4GiB,cuda:0=20GiB")
    return limits


def load_offloaded(model_name: str, dtype: str, family: dict | None, max_memory: dict,
                   folder, log=None):
    """The full model placed within ``max_memory``, the rest offloaded to ``folder``."""
    from ..offsite.streaming import open_checkpoint

    checkpoint = open_checkpoint(model_name, dtype, family, log)
    if checkpoint is None:
        raise UserError("--max-memory: the model must be a local safetensors checkpoint "
                        "(its tensors are read from it block by block); save it with "
                        "save_pretrained(safe_serialization=True) first")
    auto = AUTO_CLASSES[task_of_config(load_config(model_name))]
    model = auto.from_pretrained(resolve_model_path(model_name), dtype=DTYPES[dtype],
                                 device_map="auto", max_memory=max_memory,
                                 offload_folder=str(folder))
    model.config.use_cache = False
    if log:
        placed = list(model.hf_device_map.values())
        log(f"model owner: {placed.count('disk')} of {len(placed)} modules offloaded to disk")
    setattr(model, CHECKPOINT_ATTRIBUTE, checkpoint)
    return use_family(model.eval(), Family.from_dict(family) if family else None)


def execution_device(model) -> torch.device:
    """Where a batch for ``model`` goes: its first GPU if accelerate placed it over several
    devices, else the device of its parameters."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        gpus = sorted(d for d in placed.values() if isinstance(d, int))
        return torch.device(f"cuda:{gpus[0]}" if gpus else "cpu")
    return next(model.parameters()).device
