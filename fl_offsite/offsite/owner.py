"""The model owner's side: make a bundle from the full model, plug adapters back in."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..emulators.pipeline import SplitConfig, make_emulator
from ..fileio import atomic_dir, refuse_occupied
from ..models.families import resolve
from ..models.loading import DTYPES, checkpoint_dtype, load_config, load_model, load_processor
from ..models.offload import load_offloaded
from . import adapter as adapters
from .adapter import Adapter
from .bundle import BundleInfo, write_bundle
from .plan import make_plan
from .streaming import open_checkpoint


def build_bundle(model_name: str, out_dir: str | Path, split: SplitConfig | None = None,
                 dtype: str | None = None, overwrite: bool = False, log=None,
                 family: dict | None = None, max_memory: dict | None = None) -> BundleInfo:
    """The bundle of ``model_name`` for ``split``, in ``dtype`` (default: the checkpoint's own).
    A bundle that needs no forward pass is read in parts from the checkpoint; one that does
    loads the full model in float32 (distillation trains it), within ``max_memory``
    (accelerate's, e.g. {"cpu": "4GiB"}) if given, the rest offloaded to disk."""
    split = split or SplitConfig()
    dtype = dtype or checkpoint_dtype(model_name)
    refuse_occupied(out_dir, overwrite)
    make_plan(load_config(model_name).num_hidden_layers, split.adapter_bottom, split.adapter_top,
              split.emulator_layers, split.drop_ratio)  # fail before loading any weights
    processor = load_processor(model_name)
    checkpoint = None if split.needs_full_model else open_checkpoint(model_name, dtype, family,
                                                                      log)
    if checkpoint is not None:  # only the bundle's tensors are read (streaming.py)
        plan, _, record = make_emulator(checkpoint.model, processor, split, log)
        return write_bundle(checkpoint.model, plan, out_dir, model_name, processor, None,
                            split.compression, record, overwrite=overwrite,
                            state=checkpoint.read(plan.order, log))
    if max_memory:
        with tempfile.TemporaryDirectory(dir=Path(out_dir).absolute().parent,
                                         prefix=".offload-") as folder:
            model = load_offloaded(model_name, "float32", family, max_memory, folder, log)
            return _write_made(model, processor, model_name, out_dir, split, dtype, overwrite,
                               log)
    return _write_made(load_model(model_name, "float32", family), processor, model_name,
                       out_dir, split, dtype, overwrite, log)


def _write_made(model, processor, model_name: str, out_dir, split: SplitConfig, dtype: str,
                overwrite: bool, log) -> BundleInfo:
    """Make the emulator from the loaded full model (in float32) and write the bundle in
    ``dtype``."""
    plan, emulator, record = make_emulator(model, processor, split, log)
    return write_bundle(model, plan, out_dir, model_name, processor, emulator, split.compression,
                        record, overwrite=overwrite, compressed=split.distill.after_compression,
                        dtype=DTYPES[dtype])


def plugged_model(model_name: str, adapter: Adapter, dtype: str | None = None,
                  family: dict | None = None):
    """The full model with ``adapter`` plugged in (LoRA merged), loaded in ``dtype`` (default:
    the adapter's, i.e. its bundle's: the one the adapter's source hash was taken in)."""
    model = load_model(model_name, dtype or adapter.dtype_name, family)
    return adapters.plug(model, resolve(model), adapter)


def save_model(model, processor, out_dir: str | Path, overwrite: bool = False) -> None:
    """A directory ``from_pretrained`` loads as is (written atomically)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
