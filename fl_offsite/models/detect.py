"""Finding a model's parts without a table entry: what a standard Hugging Face decoder (or
encoder) looks like from the outside.

- the blocks: the shallowest ``ModuleList`` whose length is ``config.num_hidden_layers``;
- embeddings and head: ``get_input_embeddings()`` / ``get_output_embeddings()``;
- final norm: the norm layers beside the blocks;
- LoRA targets: the linear layers of a block (GPT-2 style ``Conv1D`` noted for peft).

Everything outside the blocks (rotary tables, learned positions, norms) is shared and ships
with the bundle, so only the blocks must be found exactly; the rest is what the bundle's
record and the error messages say.
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from ..errors import UserError

REGISTER_HINT = ("say where its parts are with --family '{\"blocks\": [\"model.layers\"], ...}' "
                 "(or a run config's family: key; bundles carry it to every data owner)")


def _path_of(model: torch.nn.Module, module) -> tuple[str, ...]:
    if module is None:
        return ()
    for name, candidate in model.named_modules():
        if candidate is module:
            return (name,)
    return ()


def detect_family(model: torch.nn.Module):
    """A ``Family`` read off ``model``'s structure, or a one-line UserError saying what is
    missing."""
    from .families import Family

    config = model.config
    depth = getattr(config, "num_hidden_layers", None)
    kind = f"{config.model_type!r} ({type(model).__name__})"
    lists = [name for name, module in model.named_modules()
             if name and isinstance(module, torch.nn.ModuleList) and len(module) == depth]
    if not depth or not lists:
        raise UserError(f"model: no transformer blocks found in {kind}: no ModuleList of "
                        f"length num_hidden_layers={depth}; {REGISTER_HINT}")
    path = min(lists, key=lambda name: name.count("."))
    parent_path = path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    norms = tuple(f"{parent_path}.{name}".lstrip(".") for name, child in parent.named_children()
                  if "norm" in name.lower() or "norm" in type(child).__name__.lower())
    first = model.get_submodule(path)[0]
    linears = {name.rpartition(".")[2]: module for name, module in first.named_modules()
               if isinstance(module, (torch.nn.Linear, Conv1D))}
    if not linears:
        raise UserError(f"model: the blocks of {kind} at {path} have no linear layers for LoRA; "
                        f"{REGISTER_HINT}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    task = "image-classification" if "ImageClassification" in type(model).__name__ \
        else "causal-lm"
    return Family(blocks=(path,), embeddings=_path_of(model, model.get_input_embeddings()),
                  final_norm=norms, head=_path_of(model, head),
                  lora_targets=tuple(sorted(linears)),
                  lora_fan_in_fan_out=any(isinstance(m, Conv1D) for m in linears.values()),
                  task=task)
