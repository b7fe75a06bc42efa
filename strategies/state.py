"""A strategy's mutable state (server-optimizer moments, momentum) as tensors, for checkpoints.

Flower's strategies keep it in attributes; these are the ones that change between rounds.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays")


def export_state(strategy) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors keyed ``attr/key``, {attr: container type}) of every state attribute set."""
    tensors, kinds = {}, {}
    for attr in STATE_ATTRIBUTES:
        value = getattr(strategy, attr, None)
        if value is None or (isinstance(value, (dict, list)) and not value):
            continue
        if isinstance(value, ArrayRecord):
            kinds[attr], items = "arrayrecord", {k: a.numpy() for k, a in value.items()}
        elif isinstance(value, dict):
            kinds[attr], items = "dict", value
        else:
            kinds[attr], items = "list", {str(i): v for i, v in enumerate(value)}
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
