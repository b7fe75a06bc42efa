"""The data owner's training loop (also used for the full fine-tuning baseline).

Trains whatever parameters are marked trainable (see ``adapter.prepare``), through accelerate
for device placement, mixed precision and gradient accumulation. Seeded: the same seed, data
and model give the same result.

Half-precision weights (a float16 or bfloat16 bundle or checkpoint) are trained the standard
mixed-precision way: the trainable ones get float32 master copies for the optimizer, the
forward runs under autocast to the half dtype (the frozen emulator stays in it), and the
result is rounded back, so what is returned and sent has the bundle's dtype. AdamW on float16
weights directly turns them to NaN within a step. There is no loss scaling: on a GPU,
bfloat16 is the safer half dtype.
"""

from __future__ import annotations

import contextlib
import math
import time
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from ..errors import UserError
from .config import TrainConfig
from .data import collate

HALF = (torch.float16, torch.bfloat16)  # trained through float32 master weights


def train(model: torch.nn.Module, items: list[dict], cfg: TrainConfig, pad_id: int = 0,
          seed: int = 0, prox_mu: float = 0.0, log=None) -> dict[str, float]:
    """Train ``model``'s trainable parameters on ``items``; returns loss / step statistics.

    ``seed`` fixes data order and dropout; ``prox_mu`` > 0 adds FedProx's
    mu/2 * ||w - w_start||^2 on the trainable tensors; ``log`` gets a progress line about ten
    times a run (a real model's step takes seconds to minutes on a CPU).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("tuning: nothing to train (no trainable parameters)")
    if not items:
        raise UserError("data: the training split is empty")
    half = {p.dtype for p in model.parameters() if p.dtype in HALF}
    if len(half) > 1:
        raise UserError("dtype: the model mixes float16 and bfloat16 weights; load it (or build "
                        "its bundle) in one --dtype")
    half_dtype = half.pop() if half else None
    originals = [p.dtype for p in params]
    for p in params:  # float32 master weights for the optimizer
        p.data = p.data.float()
    try:
        return _train(model, params, items, cfg, pad_id, seed, prox_mu, log, half_dtype)
    finally:
        for p, dtype in zip(params, originals):
            p.data = p.data.to(dtype)


def _train(model, params, items, cfg: TrainConfig, pad_id: int, seed: int, prox_mu: float, log,
           half_dtype) -> dict[str, float]:
    set_seed(seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum)
    # done here, not by accelerate: its precision is fixed per process, and it autocasts
    # float16 only on accelerators
    autocast = torch.autocast(accelerator.device.type, dtype=half_dtype) \
        if half_dtype is not None and cfg.mixed_precision == "no" else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(items, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                        collate_fn=lambda b: collate(b, pad_id))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else None

    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    model.train()
    losses: list[float] = []
    step, started, every = 0, time.time(), max(1, total_steps // 10)
    while step < total_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                with autocast:
                    loss = model(**batch).loss
                task_loss = loss.detach().float().item()
                if anchors is not None:
                    loss = loss + 0.5 * prox_mu * sum(
                        (p - a).pow(2).sum() for p, a in zip(params, anchors))
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(task_loss)
            if accelerator.sync_gradients:
                step += 1
                if log and (step % every == 0 or step == total_steps):
                    log(f"train step {step}/{total_steps}: loss {task_loss:.4f}, "
                        f"{(time.time() - started) / step:.2f} s/step")
                if step >= total_steps:
                    break
    model.eval()
    accelerator.free_memory()
    if not all(math.isfinite(x) for x in losses):
        raise UserError("training: the loss became NaN/Inf; lower lr or use mixed_precision=no")
    return {"train_loss": sum(losses) / len(losses), "train_loss_last": losses[-1],
            "steps": step, "examples": len(items)}
