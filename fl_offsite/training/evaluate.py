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
def classification_metrics(model, items: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Mean cross-entropy and accuracy of an image classifier, from one pass."""
    device = _device(model)
    loss, correct = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size])
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu()
        loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return {"loss": loss / len(items), "acc": correct / len(items)}


@torch.no_grad()
def score_continuations(model, pairs: list[tuple[list[int], list[int]]], pad_id: int = 0,
                        max_length: int = 512, batch_size: int = 32
                        ) -> list[tuple[float, bool]]:
    """(summed log p(continuation | context), whether it is the greedy continuation) for each
    (context ids, continuation ids) pair, in right-padded batches; the vocabulary-wide
    log-softmax is taken only where a continuation token is scored."""
    device = _device(model)
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [(ctx + cont)[-max_length:] for ctx, cont in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs],
                            device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (seq, (_, cont)) in enumerate(zip(seqs, chunk)):
            n = min(len(cont), len(seq) - 1)
            positions = torch.arange(len(seq) - n, len(seq), device=device)
            step = logits[row, positions - 1].float().log_softmax(-1)
            targets = ids[row, positions]
            out.append((float(step.gather(1, targets[:, None]).sum()),
                        bool((step.argmax(-1) == targets).all())))
    return out


def multiple_choice_metrics(model, tokenizer, raw, batch_size: int = 32) -> dict[str, float]:
    """lm-eval's acc / acc_norm, every (context, choice) pair of the set scored in batches
    (an empty context starts from BOS)."""
    examples = list(raw)
    contexts = tokenizer([context_text(ex) for ex in examples],
                         add_special_tokens=False)["input_ids"]
    choices = [list(ex["choices"]) for ex in examples]
    flat = tokenizer([c for cs in choices for c in cs], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pairs, cursor = [], 0
    for ctx, cs in zip(contexts, choices):
        pairs += [(ctx or bos, flat[cursor + j]) for j in range(len(cs))]
        cursor += len(cs)
    scores = [ll for ll, _ in score_continuations(model, pairs, tokenizer.pad_token_id or 0,
                                                  batch_size=batch_size)]
    acc = acc_norm = nll = 0.0
    cursor = 0
    for ex, cs in zip(examples, choices):
        lls, cursor = scores[cursor:cursor + len(cs)], cursor + len(cs)
        gold = int(ex["label"])
        acc += max(range(len(lls)), key=lls.__getitem__) == gold
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, cs)]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == gold
        nll -= lls[gold]
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "loss": nll / n}


def evaluate(model, data: TaskData, processor, batch_size: int = 8) -> dict[str, float]:
    """Metrics of ``model`` on prepared task data (model is left in eval mode)."""
    model.eval()
    if data.kind == "multiple-choice":
        return multiple_choice_metrics(model, processor, data.raw)
    if data.kind == "image":
        return classification_metrics(model, data.train_items)
    pad = getattr(processor, "pad_token_id", None) or 0
    loss, _ = mean_loss(model, data.train_items, batch_size, pad)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
