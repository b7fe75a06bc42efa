"""What the model owner records about each round's replies: privacy spent, failures, bytes and
training losses."""

from __future__ import annotations

from flwr.app import Message

from . import protocol


def privacy_spent(rounds: list[dict], dp, replies: list[Message], node_name) -> dict:
    """(epsilon, delta) of the data owner that has uploaded most often so far (``update``), or
    the data owners' DP-SGD accounting (``dpsgd``)."""
    from collections import Counter

    if dp.mode == "dpsgd":
        return _dpsgd_spent(rounds, dp, replies, node_name)

    from .privacy import epsilon

    counts = Counter(name for r in rounds for name in r.get("participants", []))
    most = max(counts.values(), default=0)
    return {"epsilon": epsilon(most, dp.noise_multiplier, dp.delta), "delta": dp.delta,
            "max_participations": most}


def _dpsgd_spent(rounds: list[dict], dp, replies: list[Message], node_name) -> dict:
    """``epsilon``: the largest a data owner of this round reported (its own RDP accountant, over
    its rounds in this run); ``epsilon_run``: the largest over every data owner so far,
    recounted here from the (sample rate, steps) each reported per round in ``owners``, so a
    resumed run (whose data owners start new accountants) still counts earlier rounds. An
    infinite epsilon (no noise) is written as null."""
    import math
    from collections import defaultdict

    from ..training.dpsgd import epsilon

    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
    owners = {}
    for reply in replies:
        metrics = reply.content["metrics"]
        if "dp-steps" in metrics:
            owners[node_name(reply.metadata.src_node_id)] = {
                "epsilon": float(metrics["dp-epsilon"]),
                "sample_rate": float(metrics["dp-sample-rate"]),
                "steps": int(metrics["dp-steps"])}
    history = defaultdict(list)
    for record in rounds + [{"dp": {"owners": owners}}]:
        for who, spent in ((record.get("dp") or {}).get("owners") or {}).items():
            history[who].append((dp.noise_multiplier, spent["sample_rate"], spent["steps"]))
    reported = max((o["epsilon"] for o in owners.values()), default=math.nan)
    run = max((epsilon(h, dp.delta) for h in history.values()), default=0.0)
    for spent in owners.values():
        spent["epsilon"] = finite(spent["epsilon"])
    return {"mode": "dpsgd", "epsilon": finite(reported), "epsilon_run": finite(run),
            "delta": dp.delta, "noise_multiplier": dp.noise_multiplier,
            "max_grad_norm": dp.max_grad_norm, "owners": owners}


def failure(reply: Message) -> str:
    """The data owner's own error line out of Flower's error reason (which adds tracebacks)."""
    lines = [line.strip() for line in (reply.error.reason or "").splitlines() if line.strip()]
    said = [line.split("Message: ", 1)[1].removesuffix("'>") for line in lines
            if "Message: " in line]
    return (said or lines or [f"error code {reply.error.code}"])[-1][:500]


def upload_bytes(reply: Message) -> int:
    return protocol.content_bytes(reply.content)


def train_losses(replies: list[Message]) -> dict:
    losses = [float(r.content["metrics"]["train_loss"]) for r in replies]
    if not losses:
        return {}
    return {"mean": sum(losses) / len(losses), "min": min(losses), "max": max(losses)}


