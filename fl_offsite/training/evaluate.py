"""One evaluation path for every model: full, emulated (bundle), plugged-in, fine-tuned.

Metrics: ``loss`` and ``ppl`` for language modelling; ``acc`` and ``acc_norm`` for multiple
choice, as lm-eval defines them (argmax of the summed log-likelihood of each choice, and of
that sum divided by the choice's length in characters); ``acc`` for image classification.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import TaskData, collate, context_text


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def mean_loss(model, items: list[dict], batch_size: int = 8, pad_id: int = 0) -> tuple[float, int]:
    """Token-weighted mean loss over ``items`` (examples for image tasks), and the count."""
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[start:start + batch_size], pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if logits.dim() == 2:  # classification
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            count += len(labels)
            continue
        shift = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), shift.reshape(-1),
                               ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((shift != -100).sum())
    return total / max(count, 1), count


@torch.no_grad()
def classification_accuracy(model, items: list[dict], batch_size: int = 32) -> float:
    device = _device(model)
    correct = 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size])
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
    return correct / len(items)


@torch.no_grad()
def score_continuations(model, pairs: list[tuple[list[int], list[int]]], pad_id: int = 0,
                        max_length: int = 512) -> list[tuple[float, bool]]:
    """(summed log p(continuation | context), whether it is the greedy continuation) for each
    (context ids, continuation ids) pair, in one right-padded batch."""
    device = _device(model)
    seqs = [(ctx + cont)[-max_length:] for ctx, cont in pairs]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    out = []
    for row, (seq, (_, cont)) in enumerate(zip(seqs, pairs)):
        n = min(len(cont), len(seq) - 1)
        positions = torch.arange(len(seq) - n, len(seq), device=device)
        step = logprobs[row, positions - 1]
        targets = ids[row, positions]
        out.append((float(step.gather(1, targets[:, None]).sum()),
                    bool((step.argmax(-1) == targets).all())))
    return out


def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log p(choice | context) for each choice (an empty context starts from BOS)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not ctx and tokenizer.bos_token_id is not None:
        ctx = [tokenizer.bos_token_id]
    pairs = [(ctx, tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
    return [ll for ll, _ in score_continuations(model, pairs, tokenizer.pad_token_id or 0)]


def multiple_choice_metrics(model, tokenizer, raw) -> dict[str, float]:
    acc = acc_norm = nll = 0.0
    for ex in raw:
        choices = list(ex["choices"])
        lls = choice_loglikelihoods(model, tokenizer, context_text(ex), choices)
        gold = int(ex["label"])
        acc += max(range(len(lls)), key=lls.__getitem__) == gold
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == gold
        nll -= lls[gold]
    n = len(raw)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "loss": nll / n}


def evaluate(model, data: TaskData, processor, batch_size: int = 8) -> dict[str, float]:
    """Metrics of ``model`` on prepared task data (model is left in eval mode)."""
    model.eval()
    if data.kind == "multiple-choice":
        return multiple_choice_metrics(model, processor, data.raw)
    if data.kind == "image":
        loss, _ = mean_loss(model, data.train_items, batch_size)
        return {"loss": loss, "acc": classification_accuracy(model, data.train_items)}
    pad = getattr(processor, "pad_token_id", None) or 0
    loss, _ = mean_loss(model, data.train_items, batch_size, pad)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
