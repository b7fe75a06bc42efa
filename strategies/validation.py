"""Checks every upload must pass before any strategy sees it, per-client norm clipping, and
the bound on the weight a data owner can claim.

A rejected upload has no influence at all on the aggregate: it is dropped before
aggregation, and its reason is logged and counted (``clients_rejected`` in summary.json).
``num-examples`` is the data owner's own claim; capped at a multiple of the round's median, a
data owner who lies about it weighs no more than that many typical data owners.
"""

from __future__ import annotations

import math
import statistics
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


def _metrics(reply: Message):
    metrics = reply.content.metric_records
    return next(iter(metrics.values())) if len(metrics) == 1 else None


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
    count = _metrics(reply).get(WEIGHT_KEY) if _metrics(reply) is not None else None
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


@dataclass
class CappedWeight:
    node_id: int
    announced: int
    used: int


def cap_weights(replies: list[Message], max_weight: float) -> list[CappedWeight]:
    """Bound each (accepted) upload's ``num-examples`` by ``max_weight`` x the median of the
    round's, in place; returns the capped ones."""
    counts = [int(_metrics(r)[WEIGHT_KEY]) for r in replies]
    if not counts:
        return []
    cap = max(1, int(max_weight * statistics.median(counts)))
    capped = []
    for reply, count in zip(replies, counts):
        if count > cap:
            _metrics(reply)[WEIGHT_KEY] = cap
            capped.append(CappedWeight(reply.metadata.src_node_id, count, cap))
    return capped


def screen(replies: list[Message], reference: dict[str, torch.Tensor],
           max_update_norm: float | None = None, clip_norm: float | None = None,
           max_weight: float | None = None
           ) -> tuple[list[Message], list[Rejection], list[CappedWeight]]:
    """(accepted replies, rejections, capped weights); accepted ones are clipped when
    ``clip_norm`` is set and their weights bounded when ``max_weight`` is."""
    accepted, rejected = [], []
    for reply in replies:
        reason = check_upload(reply, reference, max_update_norm)
        if reason is not None:
            rejected.append(Rejection(reply.metadata.src_node_id, reason))
            continue
        if clip_norm is not None:
            clip_upload(reply, reference, clip_norm)
        accepted.append(reply)
    capped = cap_weights(accepted, max_weight) if max_weight is not None else []
    return accepted, rejected, capped
