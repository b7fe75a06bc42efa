"""Checks every upload must pass before any strategy sees it, and per-client norm clipping.

A rejected upload has no influence at all on the aggregate: it is dropped before
aggregation, and its reason is logged and counted (``clients_rejected`` in summary.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message

WEIGHT_KEY = "num-examples"


@dataclass
class Rejection:
    node_id: int
    reason: str


def _tensors(reply: Message) -> dict[str, torch.Tensor] | None:
    arrays = reply.content.array_records
    if len(arrays) != 1:
        return None
    return dict(next(iter(arrays.values())).to_torch_state_dict())


def update_norm(upload: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((upload[k].double() - reference[k].double()).pow(2).sum())
                         for k in sorted(reference)))


def check_upload(reply: Message, reference: dict[str, torch.Tensor],
                 max_update_norm: float | None) -> str | None:
    """Why ``reply`` must be rejected, or None if it is acceptable."""
    tensors = _tensors(reply)
    if tensors is None:
        return "malformed reply: expected exactly one ArrayRecord"
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        return f"wrong keys: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, ref in reference.items():
        got = tensors[key]
        if got.shape != ref.shape:
            return f"wrong shape for {key}: {tuple(got.shape)} instead of {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"wrong dtype for {key}: {got.dtype} instead of {ref.dtype}"
        if not torch.isfinite(got).all():
            return f"non-finite values (NaN or Inf) in {key}"
    metrics = reply.content.metric_records
    count = next(iter(metrics.values())).get(WEIGHT_KEY) if len(metrics) == 1 else None
    if isinstance(count, bool) or not isinstance(count, (int, float)) or count != int(count) \
            or count < 1:
        return f"{WEIGHT_KEY} must be a positive integer, got {count!r}"
    if max_update_norm is not None:
        norm = update_norm(tensors, reference)
        if norm > max_update_norm:
            return f"update norm {norm:.4g} above the bound {max_update_norm:g}"
    return None


def clip_upload(reply: Message, reference: dict[str, torch.Tensor], clip_norm: float) -> float:
    """Scale the update (upload - reference) to norm <= ``clip_norm`` in place; returns the
    norm before clipping."""
    tensors = _tensors(reply)
    norm = update_norm(tensors, reference)
    if norm > clip_norm:
        scale = clip_norm / norm
        clipped = {k: (reference[k] + (tensors[k] - reference[k]) * scale).to(reference[k].dtype)
                   for k in reference}
        key = next(iter(reply.content.array_records))
        reply.content[key] = ArrayRecord(clipped)
    return norm


def screen(replies: list[Message], reference: dict[str, torch.Tensor],
           max_update_norm: float | None = None, clip_norm: float | None = None
           ) -> tuple[list[Message], list[Rejection]]:
    """(accepted replies, rejections); accepted ones are clipped when ``clip_norm`` is set."""
    accepted, rejected = [], []
    for reply in replies:
        reason = check_upload(reply, reference, max_update_norm)
        if reason is not None:
            rejected.append(Rejection(reply.metadata.src_node_id, reason))
            continue
        if clip_norm is not None:
            clip_upload(reply, reference, clip_norm)
        accepted.append(reply)
    return accepted, rejected
