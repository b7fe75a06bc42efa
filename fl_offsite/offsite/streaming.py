"""A bundle read tensor by tensor from the checkpoint, never the whole model.

A bundle whose emulator needs no forward pass (a selection without public data, no
distillation; int8 included) needs only the shared parts and the planned blocks. The model
owner builds the model's skeleton on the meta device (to find its parts and plan the split),
then reads just those tensors with ``safe_open`` from the safetensors file that holds each one
(``model.safetensors.index.json`` for a sharded checkpoint). Peak memory is then about the
bundle's size, whatever the full model's.

The result is the bundle loading the whole model would give, byte for byte. Where that cannot
be promised (a hub id, ``.bin`` weights, tensors renamed or fused on load, modules kept in
float32), ``open_checkpoint`` says why and the caller loads the model as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from ..errors import UserError
from ..models.families import Arch, Family, resolve, use_family
from .bundle import block_of, place
from ..models.loading import AUTO_CLASSES, DTYPES, load_config, resolve_model_path, task_of_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(directory: Path) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it; None if ``directory`` has no
    safetensors checkpoint."""
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        with safe_open(directory / SINGLE_FILE, "pt") as f:
            return {name: directory / SINGLE_FILE for name in f.keys()}
    return None


def skeleton(model_name: str, dtype: str, family: dict | None = None) -> torch.nn.Module:
    """The model with every parameter on the meta device (buffers real), configured as
    ``load_model`` configures the loaded one."""
    config = load_config(model_name)
    config.dtype = DTYPES[dtype]
    with init_empty_weights(include_buffers=False):
        model = AUTO_CLASSES[task_of_config(config)].from_config(config, dtype=DTYPES[dtype])
    model.tie_weights()  # tied tensors are one object, as in a loaded model
    model.config.use_cache = False
    return use_family(model.eval(), Family.from_dict(family) if family else None)


def _tensors_once(model: torch.nn.Module) -> dict[str, tuple[list[str], torch.Tensor]]:
    """State-dict name -> (all its names, tensor): a tied tensor once, under its first name
    (as ``bundle.split_state`` keeps it)."""
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for name, tensor in state.items():
        names.setdefault(id(tensor), []).append(name)
    return {group[0]: (group, state[group[0]]) for group in names.values()}


@dataclass
class Checkpoint:
    """A safetensors checkpoint matched name by name and shape by shape to the skeleton."""

    model: torch.nn.Module  # the skeleton: parts, config and block modules, no weights
    arch: Arch
    sources: dict[str, tuple[Path, str] | None]  # None: a buffer the checkpoint lacks
    dtype: torch.dtype

    def read(self, block_indices, log=None, shared_parts: bool = True
             ) -> tuple[dict, dict[int, dict]]:
        """(shared tensors, {block index: {path in block: tensor}}) for ``block_indices``
        only, in the bundle's dtype; every other tensor stays on disk (its file unopened).
        ``shared_parts=False`` leaves the shared parts out too."""
        wanted, path = set(block_indices), self.arch.blocks_path
        shared: dict[str, torch.Tensor] = {}
        blocks: dict[int, dict[str, torch.Tensor]] = {}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        state = self.model.state_dict()
        for name, source in self.sources.items():
            where = block_of(name, path)
            if (where is None and not shared_parts) or (where is not None and
                                                        where[0] not in wanted):
                continue  # a part left out: its file may stay unopened
            if source is None:
                place(name, state[name], path, shared, blocks)
            else:
                by_file.setdefault(source[0], []).append((name, source[1]))
        for file, pairs in by_file.items():
            with safe_open(file, "pt") as f:
                for name, stored_as in pairs:
                    shape = tuple(f.get_slice(stored_as).get_shape())
                    if shape != tuple(state[name].shape):
                        raise UserError(f"--model: {file.name} holds {stored_as} with shape "
                                        f"{shape}, its config.json says {tuple(state[name].shape)}"
                                        "; the checkpoint and its config disagree")
                    tensor = f.get_tensor(stored_as)
                    if tensor.is_floating_point():
                        tensor = tensor.to(self.dtype)
                    place(name, tensor, path, shared, blocks)
        if log:
            read = [*shared.values(), *(t for b in blocks.values() for t in b.values())]
            log(f"model owner: read {len(read)} of {len(self.sources)} tensors "
                f"({sum(t.numel() * t.element_size() for t in read) / 2**20:.1f} MB) from "
                f"{len(by_file)} of {len(set(p for p, _ in filter(None, self.sources.values())))}"
                " checkpoint files")
        return shared, blocks

    def on_demand(self) -> tuple[dict, "BlocksOnDemand"]:
        """The shared tensors, and the blocks read when first asked for."""
        return self.read((), shared_parts=True)[0], BlocksOnDemand(self)


class BlocksOnDemand(Mapping):
    """{block index: its tensors}, each block read from the checkpoint when first asked for
    (an offloaded model's ``split_state``: only the planned blocks are ever read)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint, self.read = checkpoint, {}

    def __getitem__(self, index: int) -> dict:
        if index not in self.read:
            if not 0 <= index < len(self):
                raise KeyError(index)
            self.read[index] = self.checkpoint.read([index], shared_parts=False)[1][index]
        return self.read[index]

    def __iter__(self):
        return iter(range(len(self)))

    def __len__(self) -> int:
        return len(self.checkpoint.arch.blocks(self.checkpoint.model))


def open_checkpoint(model_name: str, dtype: str = "float32", family: dict | None = None,
                    log=None) -> Checkpoint | None:
    """The checkpoint of ``model_name`` ready to be read in parts, or None (and a log line
    saying why) where only loading the whole model gives the right tensors."""
    def no(reason: str) -> None:
        if log:
            log(f"model owner: loading the whole model ({reason})")

    directory = Path(resolve_model_path(model_name))
    files = checkpoint_files(directory) if directory.is_dir() else None
    if files is None:
        return no("no local safetensors checkpoint")
    model = skeleton(model_name, dtype, family)
    if dtype != "float32" and getattr(model, "_keep_in_fp32_modules", None):
        return no(f"{type(model).__name__} keeps some modules in float32")
    sources: dict[str, tuple[Path, str] | None] = {}
    for name, (aliases, tensor) in _tensors_once(model).items():
        stored_as = next((alias for alias in aliases if alias in files), None)
        if stored_as is not None:
            sources[name] = (files[stored_as], stored_as)
        elif tensor.is_meta:
            return no(f"{name} is not in the checkpoint under that name")
        else:
            sources[name] = None  # a buffer from the config (from_pretrained keeps it too)
    return Checkpoint(model, resolve(model), sources, DTYPES[dtype])
