"""Distilling the emulator: train the kept middle blocks to imitate the full model's middle.

The student is the emulated model built from the full model (teacher) and a layer plan; both
share the frozen embeddings, head and adapter, so the hidden state entering the middle is the
same for both. Only the emulator blocks train, on

    kd_weight * NMSE(student's middle output, teacher's middle output)
    + lm_weight * the student's task loss
    + layer_weight * mean over emulator positions of NMSE at the boundary each stands in for

where NMSE is ||s - t||^2 / ||t||^2 over the unpadded tokens (scale-free, as in Offsite-Tuning).
Every ``eval_every`` steps the objective is measured on a held-out split of the public data
(its ``validation`` split, or the last tenth of its training blocks) and the best emulator
is kept. The same routine re-aligns an emulator between federated rounds (FedBiOT-style), with
the current global adapter plugged into both models.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from ..offsite.bundle import build_emulated_model, emulated_config, keyed, split_state
from ..training.data import collate
from ..errors import UserError
from ..offsite.plan import LayerPlan


def emulated_from_full(model, arch, plan: LayerPlan, emulator: dict | None = None):
    """The emulated model of ``model`` (sharing its frozen tensors) with a trainable copy of
    the emulator blocks (``emulator``: ``"<index>.<path>"`` tensors, default the model's)."""
    shared, blocks = split_state(model, arch)
    emulator = {k: v.detach().clone() for k, v in (emulator or keyed(blocks, plan.emulator)).items()}
    student = build_emulated_model(emulated_config(model.config, plan), plan, shared, emulator,
                                   keyed(blocks, plan.adapter), arch.task)
    return student


def emulator_tensors(student, arch, plan: LayerPlan) -> dict[str, torch.Tensor]:
    """The student's emulator blocks as ``"<index>.<path>"`` tensors (detached copies)."""
    blocks = arch.blocks(student)
    return {f"{index}.{name}": tensor.detach().clone()
            for index in dict.fromkeys(plan.emulator)
            for name, tensor in blocks[plan.order.index(index)].state_dict().items()}


def _nmse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err, ref = (s - t).float().pow(2).sum(-1), t.float().pow(2).sum(-1)
    if mask is not None:
        err, ref = err[mask], ref[mask]
    return err.sum() / ref.sum().clamp(min=1e-12)


class Objective:
    """The distillation loss between a teacher and a student built for ``plan``."""

    def __init__(self, plan: LayerPlan, kd_weight: float, lm_weight: float, layer_weight: float):
        l, m = len(plan.bottom), len(plan.emulator)
        self.teacher_out, self.student_out = l + sum(plan.spans), l + m
        ends = [l + sum(plan.spans[:j + 1]) for j in range(m)]
        self.layer_pairs = [(l + j + 1, ends[j]) for j in range(m)]
        self.kd_weight, self.lm_weight, self.layer_weight = kd_weight, lm_weight, layer_weight

    def __call__(self, teacher, student, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            t_hidden = teacher(**{k: v for k, v in batch.items() if k != "labels"},
                               output_hidden_states=True).hidden_states
        out = student(**batch, output_hidden_states=True)
        s_hidden = out.hidden_states
        mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        kd = _nmse(s_hidden[self.student_out], t_hidden[self.teacher_out], mask)
        loss = self.kd_weight * kd + self.lm_weight * out.loss
        parts = {"nmse": kd.item(), "lm_loss": out.loss.item()}
        if self.layer_weight:
            layer = sum(_nmse(s_hidden[s], t_hidden[t], mask) for s, t in self.layer_pairs)
            layer = layer / len(self.layer_pairs)
            loss = loss + self.layer_weight * layer
            parts["layer_nmse"] = layer.item()
        parts["loss"] = loss.item()
        return loss, parts


@torch.no_grad()
def measure(objective: Objective, teacher, student, items: list[dict], batch_size: int = 8,
            pad_id: int = 0) -> dict[str, float]:
    """Token-weighted mean of each part of the objective over ``items``."""
    student.eval()
    totals: dict[str, float] = {}
    weight = 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size], pad_id)
        n = int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"])
        _, parts = objective(teacher, student, batch)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value * n
        weight += n
    return {k: v / max(weight, 1) for k, v in totals.items()}


def distill(teacher, student, arch, plan: LayerPlan, train_items: list[dict],
            val_items: list[dict], steps: int, lr: float = 1e-4, batch_size: int = 8,
            kd_weight: float = 30.0, lm_weight: float = 1.0, layer_weight: float = 0.0,
            eval_every: int = 50, seed: int = 0, pad_id: int = 0, log=None
            ) -> tuple[dict[str, torch.Tensor], dict]:
    """Train ``student``'s emulator blocks; returns the best emulator tensors and a report."""
    if not train_items or not val_items:
        raise UserError("distill: the public data has too little text for training and a "
                        "held-out split; give more text or a smaller block_size")
    blocks = arch.blocks(student)
    student.requires_grad_(False)
    positions = sorted({plan.order.index(i) for i in plan.emulator})
    params = []
    for p in positions:
        blocks[p].requires_grad_(True)
        params += list(blocks[p].parameters())
    objective = Objective(plan, kd_weight, lm_weight, layer_weight)
    teacher.eval()
    torch.manual_seed(seed)
    loader = DataLoader(train_items, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed),
                        collate_fn=lambda b: collate(b, pad_id))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = measure(objective, teacher, student, val_items, batch_size, pad_id)
    best, best_step = dict(start), 0
    best_tensors = emulator_tensors(student, arch, plan)
    step = 0
    while step < steps:
        for batch in loader:
            student.train()
            loss, _ = objective(teacher, student, batch)
            if not math.isfinite(loss.item()):
                raise UserError("distill: the loss became NaN/Inf; lower distill lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % eval_every == 0 or step == steps:
                scores = measure(objective, teacher, student, val_items, batch_size, pad_id)
                if log:
                    log(f"distill step {step}/{steps}: held-out nmse {scores['nmse']:.4f}, "
                        f"lm loss {scores['lm_loss']:.3f}")
                if scores["loss"] < best["loss"]:
                    best, best_step = scores, step
                    best_tensors = emulator_tensors(student, arch, plan)
            if step >= steps:
                break
    student.requires_grad_(False)
    student.eval()
    report = {"steps": steps, "best_step": best_step, "lr": lr, "batch_size": batch_size,
              "kd_weight": kd_weight, "lm_weight": lm_weight, "layer_weight": layer_weight,
              "held_out_before": start, "held_out_best": best}
    return best_tensors, report
