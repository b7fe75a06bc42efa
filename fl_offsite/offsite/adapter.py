"""The adapter: what a data owner trains and returns, and how it is plugged back in.

An adapter is a dict of tensors keyed ``"<original block index>.<parameter path>"`` plus
metadata. Its ``kind`` says what the tensors are:

- ``blocks``: the full weights of the adapter blocks (plain offsite-tuning);
- ``lora``: peft LoRA matrices inside the adapter blocks (``...q_proj.lora_A.default.weight``);
- ``bitfit``: the biases of the adapter blocks.

Only trainable tensors travel, so a LoRA or BitFit update is small. The same loading code
serves the emulated model (blocks at new positions) and the full model (blocks in place), via
the ``order`` list mapping position -> original index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from ..models.families import Arch
from .bundle import split_state, unkeyed
from ..errors import UserError
from ..fileio import load_tensors, save_tensors, tensors_hash

KINDS = ("blocks", "lora", "bitfit")


@dataclass
class Adapter:
    tensors: dict[str, torch.Tensor]
    kind: str
    bundle_hash: str
    source_hash: str
    indices: tuple[int, ...]
    lora: dict = field(default_factory=dict)  # r, alpha, dropout, targets (kind == "lora")

    def meta(self) -> dict:
        return {"kind": self.kind, "bundle_hash": self.bundle_hash, "source_hash": self.source_hash,
                "indices": list(self.indices), "lora": self.lora}

    @property
    def dtype_name(self) -> str:
        """The dtype its tensors (and so its bundle) are in, by name ("float32" if mixed)."""
        dtypes = {t.dtype for t in self.tensors.values() if t.is_floating_point()}
        return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "Adapter":
        return Adapter(tensors, self.kind, self.bundle_hash, self.source_hash, self.indices,
                       self.lora)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, self.tensors, metadata={"fl_offsite": json.dumps(self.meta())})

    @classmethod
    def load(cls, path: str | Path) -> "Adapter":
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise UserError(f"--adapter: {path} is a directory; pass an adapter .safetensors "
                            "file or a bundle directory")
        if not path.is_file():
            raise UserError(f"--adapter: {path} does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["fl_offsite"])
        except Exception:
            raise UserError(f"--adapter: {path} is not an fl-offsite adapter file "
                            "(safetensors with fl_offsite metadata)") from None
        return cls(load_tensors(path), meta["kind"], meta["bundle_hash"], meta["source_hash"],
                   tuple(meta["indices"]), meta.get("lora") or {})


def lora_config(arch: Arch, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                targets: list[str] | None = None) -> dict:
    return {"r": r, "alpha": alpha, "dropout": dropout,
            "targets": list(targets or arch.family.lora_targets),
            "fan_in_fan_out": arch.family.lora_fan_in_fan_out}


def _inject_lora(blocks: torch.nn.ModuleList, positions, lora: dict) -> None:
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["targets"], bias="none",
                        fan_in_fan_out=lora.get("fan_in_fan_out", False))
    for p in positions:
        inject_adapter_in_model(config, blocks[p])


def prepare(model: torch.nn.Module, arch: Arch, order: tuple[int, ...],
            adapter_indices: tuple[int, ...], kind: str, lora: dict | None = None) -> None:
    """Freeze everything, then make the adapter's tensors (of ``kind``) trainable."""
    if kind not in KINDS:
        raise UserError(f"tuning: unknown adapter kind {kind!r}; use one of {', '.join(KINDS)}")
    blocks = arch.blocks(model)
    positions = [order.index(i) for i in adapter_indices]
    if kind == "lora":
        _inject_lora(blocks, positions, lora)
    model.requires_grad_(False)
    trainable = 0
    for p in positions:
        for name, param in blocks[p].named_parameters():
            param.requires_grad_(_is_trainable(name, kind))
            trainable += param.requires_grad
    if not trainable:
        raise UserError(f"tuning: the adapter blocks of this {arch.model_type} model have no "
                        f"tensors for {kind!r} (no biases?); use blocks or lora")


def _is_trainable(name: str, kind: str) -> bool:
    if kind == "blocks":
        return True
    if kind == "lora":
        return "lora_" in name
    return name.endswith(".bias")


def extract(model: torch.nn.Module, arch: Arch, order: tuple[int, ...], template: Adapter
            ) -> Adapter:
    """The adapter's current tensors out of a prepared model (detached CPU copies)."""
    blocks = arch.blocks(model)
    tensors = {}
    for index in template.indices:
        block = blocks[order.index(index)]
        for name, param in block.named_parameters():
            if _is_trainable(name, template.kind):
                tensors[f"{index}.{name}"] = param.detach().cpu().clone()
    return template.with_tensors(tensors)


def initial_adapter(model: torch.nn.Module, arch: Arch, order: tuple[int, ...],
                    adapter_indices: tuple[int, ...], kind: str, bundle_hash: str,
                    source_hash: str, lora: dict | None = None, seed: int = 0) -> Adapter:
    """The round-0 adapter: the bundle's blocks, their biases, or fresh LoRA matrices.

    ``model`` is modified (prepared for ``kind``); LoRA init is seeded so every party that
    builds the initial adapter gets the same one.
    """
    torch.manual_seed(seed)
    prepare(model, arch, order, adapter_indices, kind, lora)
    template = Adapter({}, kind, bundle_hash, source_hash, tuple(adapter_indices),
                       lora if kind == "lora" else {})
    return extract(model, arch, order, template)


def check(adapter: Adapter, expected: dict[str, torch.Tensor], where: str) -> None:
    """Missing / extra keys, shape and dtype mismatches, each a clear error."""
    missing = sorted(set(expected) - set(adapter.tensors))
    extra = sorted(set(adapter.tensors) - set(expected))
    if missing or extra:
        raise UserError(f"--adapter: does not fit {where}: missing keys {missing[:3]}"
                        f"{'...' if len(missing) > 3 else ''}, unexpected keys {extra[:3]}"
                        f"{'...' if len(extra) > 3 else ''}")
    for key, ref in expected.items():
        got = adapter.tensors[key]
        if got.shape != ref.shape:
            raise UserError(f"--adapter: {key} has shape {tuple(got.shape)}, {where} needs "
                            f"{tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise UserError(f"--adapter: {key} is {got.dtype}, {where} is {ref.dtype}; "
                            "load the model with the matching --dtype")


def load_into(model: torch.nn.Module, arch: Arch, order: tuple[int, ...], adapter: Adapter
              ) -> None:
    """Copy a *prepared* model's adapter tensors from ``adapter`` (emulated or full model)."""
    current = extract(model, arch, order, adapter)
    check(adapter, current.tensors, "this model")
    blocks = arch.blocks(model)
    with torch.no_grad():
        for index, params in unkeyed(adapter.tensors).items():
            block = blocks[order.index(index)]
            named = dict(block.named_parameters())
            for name, tensor in params.items():
                named[name].copy_(tensor)


def plug(full_model: torch.nn.Module, arch: Arch, adapter: Adapter) -> torch.nn.Module:
    """Plug ``adapter`` into the full model in place; LoRA is merged into the base weights.

    Fails if the adapter was made for another model (source hash) or does not fit it.
    """
    shared, _ = split_state(full_model, arch)
    dtypes = {t.dtype for t in adapter.tensors.values() if t.is_floating_point()}
    model_dtype = next(t.dtype for t in shared.values() if t.is_floating_point())
    if dtypes and dtypes != {model_dtype}:  # the source hash covers dtypes: say this first
        raise UserError(f"--adapter: its tensors are {', '.join(sorted(map(str, dtypes)))}, "
                        f"the model is loaded as {model_dtype}; load it with the bundle's "
                        "--dtype")
    if tensors_hash(shared) != adapter.source_hash:
        raise UserError("--adapter: was trained on a bundle of a different model (source hash "
                        "mismatch); plug it into the model its bundle was built from")
    depth = len(arch.blocks(full_model))
    if max(adapter.indices, default=-1) >= depth:
        raise UserError(f"--adapter: adapts block {max(adapter.indices)} but the model has "
                        f"{depth} blocks")
    order = tuple(range(depth))
    if adapter.kind == "lora":
        prepare(full_model, arch, order, adapter.indices, adapter.kind, adapter.lora)
    load_into(full_model, arch, order, adapter)
    if adapter.kind == "lora":
        _merge_lora(arch.blocks(full_model), adapter.indices)
    full_model.requires_grad_(False)
    return full_model


def _merge_lora(blocks: torch.nn.ModuleList, indices) -> None:
    """Fold LoRA into the base weights and put the plain base layers back (peft's merge)."""
    for index in indices:
        for name, module in list(blocks[index].named_modules()):
            if isinstance(module, LoraLayer):
                module.merge(safe_merge=True)
                parent_name, _, child = name.rpartition(".")
                parent = blocks[index].get_submodule(parent_name) if parent_name else blocks[index]
                setattr(parent, child, module.get_base_layer())
        if hasattr(blocks[index], "peft_config"):  # left by inject_adapter_in_model
            del blocks[index].peft_config
