"""Loading models and their tokenizer / image processor, by hub name, local path or zoo name.

Zoo names (``fl-offsite/<name>``) resolve to models shipped inside this package, so the demo
and the tests run with no hub access. Everything else goes to ``from_pretrained`` as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM,
                          AutoModelForImageClassification, AutoTokenizer)

from .families import FAMILIES, Family, use_family
from ..errors import UserError, first_line
from .fetch import FETCHABLE, resolve_model_source

ZOO_DIR = Path(__file__).parents[1] / "zoo"
ZOO_PREFIX = "fl-offsite/"

AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "image-classification": AutoModelForImageClassification,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_path(name_or_path: str) -> str:
    """Zoo name -> packaged (or fetched) directory; ``.gguf`` file -> its converted directory;
    existing path -> itself; anything else -> hub id."""
    name_or_path = resolve_model_source(name_or_path)
    if name_or_path.startswith(ZOO_PREFIX):
        local = ZOO_DIR / name_or_path[len(ZOO_PREFIX):]
        if local.is_dir():
            return str(local)
        shipped = ", ".join(sorted([ZOO_PREFIX + p.name for p in ZOO_DIR.iterdir() if p.is_dir()]
                                   + [f"{ZOO_PREFIX}{name} (fetch-model)" for name in FETCHABLE]))
        raise UserError(f"--model: no zoo model {name_or_path!r}; shipped: {shipped}")
    return name_or_path


def task_of_config(config) -> str:
    family = FAMILIES.get(config.model_type)
    return family.task if family else "causal-lm"


def load_config(name_or_path: str):
    path = resolve_model_path(name_or_path)
    looks_like_path = path.startswith(("/", ".", "~")) or path.count("/") > 1  # hub: org/name
    if looks_like_path and not Path(path).exists():
        raise UserError(f"--model: {path} does not exist (not a directory, and a path is no "
                        "hub id); give a model directory, a .gguf file, fl-offsite/<name> or a "
                        "hub id")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        hint = f"{path} has no loadable config.json" if Path(path).exists() else \
            "not found as a hub id (is the hub reachable here?) nor as a local path"
        raise UserError(f"--model: cannot load {name_or_path!r}: {hint} "
                        f"({first_line(exc)})") from None


def resolve_device(spec: str, field: str = "owner_device") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda[:N]`` as a device that exists here (one clear line if not)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise UserError(f"{field}: {spec} asked for, but this machine has "
                            f"{count or 'no'} CUDA GPU{'s' if count != 1 else ''}; use "
                            "auto or cpu" + (f", or cuda:0..{count - 1}" if count else ""))
    return device


def config_dtype(config) -> str:
    """The dtype a model config declares, by name; float32 if it declares none."""
    saved = getattr(config, "dtype", None)
    names = {v: k for k, v in DTYPES.items()}
    return names.get(saved, saved if saved in DTYPES else "float32")


def checkpoint_dtype(name_or_path: str) -> str:
    """The dtype a checkpoint says it was saved in (``config.json``), float32 if it says none."""
    return config_dtype(load_config(name_or_path))


def load_model(name_or_path: str, dtype: str | None = None, family: dict | None = None):
    """The full model in ``dtype`` (default: the checkpoint's own), in eval mode, with caching
    off (blocks may be dropped later); ``family`` (a Family as a mapping) overrides where its
    parts are."""
    config = load_config(name_or_path)
    auto = AUTO_CLASSES[task_of_config(config)]
    dtype = dtype or config_dtype(config)
    model = auto.from_pretrained(resolve_model_path(name_or_path), dtype=DTYPES[dtype])
    model.config.use_cache = False
    return use_family(model.eval(), Family.from_dict(family) if family else None)


def load_processor(name_or_path: str):
    """Tokenizer (text models) or image processor (vision models); None if there is none."""
    path = resolve_model_path(name_or_path)
    task = task_of_config(load_config(name_or_path))
    loader = AutoImageProcessor if task == "image-classification" else AutoTokenizer
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None
