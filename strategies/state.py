"""A strategy's mutable state (server-optimizer moments, momentum) as tensors, for checkpoints.

Flower's strategies keep it in instance attributes. Rather than naming them (names change
between Flower versions), every attribute that holds arrays (an ``ArrayRecord``, or a dict or
list of numpy arrays) is saved and set back; configuration holds no arrays.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


def _arrays(value) -> tuple[str, dict[str, np.ndarray]] | None:
    """(container kind, arrays by key) when ``value`` is array state, else None."""
    if isinstance(value, ArrayRecord):
        return ("arrayrecord", {k: a.numpy() for k, a in value.items()}) if len(value) else None
    if isinstance(value, dict) and value and all(isinstance(v, np.ndarray)
                                                  for v in value.values()):
        return "dict", value
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        return "list", {str(i): v for i, v in enumerate(value)}
    return None


def export_state(strategy) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors keyed ``attr/key``, {attr: container kind}) of every array-holding attribute."""
    tensors, kinds = {}, {}
    for attr, value in sorted(vars(strategy).items()):
        found = _arrays(value)
        if found is None:
            continue
        kinds[attr], items = found
        for key, array in items.items():
            tensors[f"{attr}/{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    return tensors, kinds


def import_state(strategy, tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
    for attr, kind in kinds.items():
        prefix = attr + "/"
        items = {k[len(prefix):]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}
        if kind == "arrayrecord":
            value = ArrayRecord({k: torch.from_numpy(v) for k, v in items.items()})
        elif kind == "dict":
            value = items
        else:
            value = [items[str(i)] for i in range(len(items))]
        setattr(strategy, attr, value)
