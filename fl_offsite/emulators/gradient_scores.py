"""How much changing one emulator block disturbs the adapter's training signal, and a budgeted
choice of changes from that (training-free; GradOT's criterion).

The data owner only ever sees the emulator through the gradient it gives the adapter, so a
compression that keeps that gradient keeps the adapter's training (and so the plug-in) intact.
On public text the model owner takes the adapter's gradient through the emulated model, then
through the same model with one block changed at each candidate setting, and reports their
cosine. ``allocate`` then spends a parameter budget greedily where it buys the most cosine per
parameter.
"""

from __future__ import annotations

import torch

from ..models.families import resolve
from ..offsite import adapter as adapters
from ..training.data import collate


def adapter_gradient(student, batches: list[dict]) -> torch.Tensor:
    """The adapter's gradient of the mean task loss over ``batches``, flattened."""
    trainable = [p for p in student.parameters() if p.requires_grad]
    student.zero_grad(set_to_none=True)
    for batch in batches:
        (student(**batch).loss / len(batches)).backward()
    gradient = torch.cat([p.grad.flatten() for p in trainable])
    student.zero_grad(set_to_none=True)
    return gradient


def gradient_scores(model, arch, plan, emulator: dict | None, items: list[dict], pad_id: int,
                    candidates: list[float], change, batches: int = 4, log=None,
                    batch_size: int = 8) -> dict[int, dict[float, float]]:
    """{emulator block: {candidate: cosine of the adapter's gradient with that block changed
    by ``change(index, block, state, candidate)`` vs unchanged}}."""
    from .distill import emulated_from_full

    student = emulated_from_full(model, arch, plan, emulator)
    student_arch = resolve(student)
    adapters.prepare(student, student_arch, plan.order, plan.adapter, "blocks")
    data = [collate(items[i * batch_size:(i + 1) * batch_size], pad_id)
            for i in range(min(batches, max(1, len(items) // batch_size)))]
    reference = adapter_gradient(student, data)
    blocks = student_arch.blocks(student)
    scores: dict[int, dict[float, float]] = {}
    for index in dict.fromkeys(plan.emulator):
        block = blocks[plan.order.index(index)]  # a repeated block is one module
        original = {k: v.detach().clone() for k, v in block.state_dict().items()}
        scores[index] = {}
        for candidate in candidates:
            with torch.no_grad():
                block.load_state_dict(change(index, block, original, candidate))
            gradient = adapter_gradient(student, data)
            scores[index][candidate] = float(torch.nn.functional.cosine_similarity(
                gradient.double(), reference.double(), dim=0))
        with torch.no_grad():
            block.load_state_dict(original)
        if log:
            log(f"gradient score of block {index}: " + ", ".join(
                f"{c:g}: {s:.4f}" for c, s in scores[index].items()))
    student.requires_grad_(False)  # its adapter tensors are the full model's
    return scores


def allocate(scores: dict[int, dict[float, float]], costs: dict[int, dict[float, int]],
             budget: float) -> dict[int, float]:
    """Per block, the candidate to use: all start at the cheapest; the upgrade with the most
    cosine gained per parameter is taken while the total cost stays within ``budget``.

    An upgrade may skip rungs, and one that lowers the cosine is never taken: on SmolLM2 a
    block's cosine fell from 0.39 at a tenth of its channels to 0.20 at a fifth and rose to 0.80
    at two fifths, so a one-rung ladder left it at a tenth."""
    choice = {i: min(by, key=lambda c: (costs[i][c], c)) for i, by in scores.items()}
    spent = sum(costs[i][c] for i, c in choice.items())
    while True:
        best = None
        for i, current in choice.items():
            for candidate, score in scores[i].items():
                extra = costs[i][candidate] - costs[i][current]
                gain = score - scores[i][current]
                if extra <= 0 or gain <= 0 or spent + extra > budget:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, i, candidate, extra)
        if best is None:
            return choice
        _, i, candidate, extra = best
        choice[i] = candidate
        spent += extra
