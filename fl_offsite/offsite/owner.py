"""The model owner's side: make a bundle from the full model, plug adapters back in."""

from __future__ import annotations

from pathlib import Path

from . import adapter as adapters
from ..training import data
from .adapter import Adapter
from ..models.families import resolve
from .bundle import BundleInfo, write_bundle
from ..config import DistillConfig, SplitConfig
from ..errors import UserError
from ..fileio import atomic_dir
from ..models.loading import load_config, load_model, load_processor
from .plan import LayerPlan, make_plan


def build_bundle(model_name: str, out_dir: str | Path, split: SplitConfig | None = None,
                 dtype: str = "float32", overwrite: bool = False, log=None) -> BundleInfo:
    split = split or SplitConfig()
    make_plan(load_config(model_name).num_hidden_layers, split.adapter_bottom, split.adapter_top,
              split.emulator_layers, split.drop_ratio)  # fail before loading any weights
    model = load_model(model_name, dtype)
    processor = load_processor(model_name)
    plan, emulator, record = make_emulator(model, processor, split, log)
    return write_bundle(model, plan, out_dir, model_name, processor, emulator, split.quantize,
                        record, overwrite=overwrite)


def public_items(cfg: DistillConfig, processor) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items) of the public data: its validation split, or else
    the last tenth of its training items."""
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
    they were made, as ``split`` asks: uniform or similarity-based choice, then distillation."""
    from ..emulators.distill import distill, emulated_from_full
    from ..emulators.similarity import select_layers

    arch = resolve(model)
    pad_id = getattr(processor, "pad_token_id", 0) or 0
    record: dict = {"layer_selection": split.layer_selection}
    public = public_items(split.distill, processor) if split.distill.data else None
    if split.layer_selection == "similarity":
        plan, changes = select_layers(model, arch, public[0], split.adapter_bottom,
                                      split.adapter_top, split.emulator_layers, split.drop_ratio,
                                      split.repeat_blocks, split.distill.seed, pad_id)
        record.update(public_data=split.distill.data, repeat_blocks=split.repeat_blocks,
                      block_changes=[round(c, 6) for c in changes])
    else:
        plan = make_plan(len(arch.blocks(model)), split.adapter_bottom, split.adapter_top,
                         split.emulator_layers, split.drop_ratio)
    if not split.distill.steps:
        return plan, None, record
    d = split.distill
    emulator, report = distill(model, emulated_from_full(model, arch, plan), arch, plan,
                               public[0], public[1], d.steps, d.lr, d.batch_size, d.kd_weight,
                               d.lm_weight, d.layer_weight, d.eval_every, d.seed, pad_id, log)
    record["distill"] = {"data": d.data, **report}
    return plan, emulator, record


def plugged_model(model_name: str, adapter: Adapter, dtype: str = "float32"):
    """The full model with ``adapter`` plugged in (LoRA merged)."""
    model = load_model(model_name, dtype)
    return adapters.plug(model, resolve(model), adapter)


def save_model(model, processor, out_dir: str | Path, overwrite: bool = False) -> None:
    """A directory ``from_pretrained`` loads as is (written atomically)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
