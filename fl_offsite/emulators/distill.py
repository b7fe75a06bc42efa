"""Distilling the emulator: train the kept middle blocks to imitate the full model's middle.

The student is the emulated model built from the full model (teacher) and a layer plan; both
share the frozen embeddings, head and adapter, so the hidden state entering the middle is the
same for both. Only the emulator blocks train, on

    kd_weight * NMSE(student's middle output, teacher's middle output)
    + lm_weight * the student's task loss
    + layer_weight * mean over emulator positions of NMSE at the boundary each stands in for
    + grad_weight * NMSE(the emulator's backward of g, the full middle's backward of g)

where NMSE is ||s - t||^2 / ||t||^2 over the unpadded tokens (scale-free, as in Offsite-Tuning)
and a "boundary" is a block's output, read by a forward hook. The teacher is frozen, so its
boundary states are computed once per public item and kept (in bfloat16): every later visit of
that item costs only the student. The gradient term is what the bottom adapter trains on: g is
the full model's gradient of its task loss at the middle's output, and the data owner's bottom
blocks receive the middle's vector-Jacobian product of it. Matching hidden states alone leaves
that backward path free to differ (the two halves of the adapter then co-adapt to the emulator
and plug in worse); matching it costs a second backward through the emulator blocks. With
``lm_weight`` 0 the student also stops after its last emulator block (no top blocks, no
vocabulary-sized head), which is most of a small model's cost. Every ``eval_every`` steps the
objective is measured on a held-out split of the public data (its ``validation`` split, or the
last tenth of its training blocks) and the best emulator is kept. The same routine re-aligns
an emulator between federated rounds (FedBiOT-style), with the current global adapter plugged
into both models.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from ..errors import UserError
from ..offsite.bundle import build_emulated_model, emulated_config, keyed, split_state
from ..offsite.plan import LayerPlan
from ..training.data import collate


def emulated_from_full(model, arch, plan: LayerPlan, emulator: dict | None = None):
    """The emulated model of ``model`` (sharing its frozen tensors) with a trainable copy of
    the emulator blocks (``emulator``: ``"<index>.<path>"`` tensors, default the model's)."""
    shared, blocks = split_state(model, arch)
    emulator = {k: v.detach().clone() for k, v in (emulator or keyed(blocks, plan.emulator)).items()}
    student = build_emulated_model(emulated_config(model.config, plan), plan, shared, emulator,
                                   keyed(blocks, plan.adapter), arch.task, arch.family)
    return student


def emulator_tensors(student, arch, plan: LayerPlan) -> dict[str, torch.Tensor]:
    """The student's emulator blocks as ``"<index>.<path>"`` tensors (detached copies)."""
    blocks = arch.blocks(student)
    return {f"{index}.{name}": tensor.detach().clone()
            for index in dict.fromkeys(plan.emulator)
            for name, tensor in blocks[plan.order.index(index)].state_dict().items()}


class _Reached(Exception):
    """Raised by a hook once the last wanted block has run: the rest of the model is skipped."""


@contextlib.contextmanager
def input_leaf(block):
    """Make ``block``'s output hidden state a leaf that requires grad (yielded in a list once
    the model has run), so that gradients can be taken with respect to it."""
    box: list[torch.Tensor] = []

    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_()
        box.append(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def block_outputs(model, blocks, positions: list[int], batch: dict, stop: bool):
    """({position: that block's output hidden state}, the model's output or None if stopped).

    Positions count block calls in order, so a block shared at several positions (a repeated
    emulator block) is read at each of them.
    """
    wanted, last = set(positions), max(positions)
    captured: dict[int, torch.Tensor] = {}
    calls = [0]

    def hook(module, args, output):
        position = calls[0]
        calls[0] += 1
        if position in wanted:
            captured[position] = output[0] if isinstance(output, tuple) else output
            if stop and position == last:
                raise _Reached

    handles = [m.register_forward_hook(hook) for m in dict.fromkeys(blocks)]
    try:
        output = model(**batch)
    except _Reached:
        output = None
    finally:
        for handle in handles:
            handle.remove()
    return captured, output


def _nmse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None,
          per_token: bool = False) -> torch.Tensor:
    """``global``: sum ||s - t||^2 / sum ||t||^2 over the unpadded tokens; ``per_token``: the
    mean over tokens of each token's own ratio. Real LLMs put most of the hidden norm on a few
    tokens (SmolLM2: the first token of a block carries 91% of it), and the global ratio is then
    mostly that token's error."""
    err, ref = (s.float() - t.float()).pow(2).sum(-1), t.float().pow(2).sum(-1)
    if mask is not None:
        err, ref = err[mask], ref[mask]
    if per_token:
        return (err / ref.clamp(min=1e-12)).mean()
    return err.sum() / ref.sum().clamp(min=1e-12)


def _tokens(item: dict) -> int:
    return len(item["input_ids"]) if "input_ids" in item else 0


class TeacherStates:
    """The frozen teacher's boundary states for each public item, computed on first use; with
    ``gradients`` (the bottom adapter's last block), also the gradient of the teacher's summed
    task loss at the last position's boundary and at that block's output."""

    def __init__(self, teacher, arch, items: list[dict], positions: list[int], pad_id: int,
                 autocast: bool = False, losses: bool = False, gradients: int | None = None):
        self.teacher, self.blocks = teacher, arch.blocks(teacher)
        self.items, self.positions, self.pad_id, self.autocast = items, positions, pad_id, autocast
        self.cache: dict[int, list[torch.Tensor]] = {}
        self.losses: dict[int, tuple[float, int]] | None = {} if losses else None
        self.gradient_block = gradients
        self.gradients: dict[int, list[torch.Tensor]] = {}

    def _compute(self, missing: list[int]) -> None:
        inputs = _on(collate([self.items[i] for i in missing], self.pad_id), self.teacher)
        labels = inputs.pop("labels")
        wants_output = self.losses is not None or self.gradient_block is not None
        with contextlib.ExitStack() as stack:
            stack.enter_context(_autocast(self.autocast, self.teacher))
            stack.enter_context(torch.set_grad_enabled(self.gradient_block is not None))
            leaf = (stack.enter_context(input_leaf(self.blocks[self.gradient_block]))
                    if self.gradient_block is not None else None)
            states, output = block_outputs(self.teacher, self.blocks, self.positions, inputs,
                                           stop=not wants_output)
            if leaf is not None:  # rows are independent: each row's gradient is its own
                summed = summed_task_loss(output.logits, labels)
                grads = torch.autograd.grad(summed, [states[self.positions[-1]], leaf[0]])
        if self.losses is not None:
            self.losses.update(zip(missing, row_losses(output.logits.detach(), labels)))
        for row, i in enumerate(missing):
            n = _tokens(self.items[i]) or None
            self.cache[i] = [states[p][row, :n].detach().to(torch.bfloat16)
                             for p in self.positions]
            if leaf is not None:
                self.gradients[i] = [g[row, :n].to(torch.bfloat16) for g in grads]

    def batch(self, indices: list[int], width: int | None) -> list[torch.Tensor]:
        """One (batch, tokens, hidden) tensor per position, right-padded to ``width``."""
        missing = [i for i in indices if i not in self.cache]
        if missing:
            self._compute(missing)
        return _stacked([self.cache[i] for i in indices], width)

    def gradient_batch(self, indices: list[int], width: int | None) -> list[torch.Tensor]:
        """[gradient at the middle's output, gradient at its input], as ``batch``."""
        self.batch(indices, width)
        return _stacked([self.gradients[i] for i in indices], width)

    def loss(self, indices: list[int]) -> float:
        """The teacher's own task loss on these items (token-weighted, as the student's)."""
        total, count = map(sum, zip(*(self.losses[i] for i in indices)))
        return total / max(count, 1)


def _stacked(per_item: list[list[torch.Tensor]], width: int | None) -> list[torch.Tensor]:
    """Slot by slot, the items' (tokens, hidden) tensors right-padded to ``width`` and stacked."""
    out = []
    for rows in zip(*per_item):
        if width is not None:
            rows = [torch.nn.functional.pad(r, (0, 0, 0, width - len(r))) for r in rows]
        out.append(torch.stack(rows))
    return out


def summed_task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task loss summed over rows and tokens (so a row's gradient ignores its batch)."""
    return _row_sums(logits, labels)[0].sum()


def _row_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed task loss, scored positions) per row, as tensors: next-token cross-entropy for a
    language model's (rows, tokens, vocab) logits, the label's for a classifier's (rows,
    classes)."""
    f = torch.nn.functional
    if logits.dim() == 2:
        return f.cross_entropy(logits.float(), labels, reduction="none"), torch.ones_like(labels)
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token = f.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return token.sum(1), (labels != -100).sum(1)


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """(summed task loss, scored positions) per row (see ``_row_sums``)."""
    return [(float(t), int(n)) for t, n in zip(*_row_sums(logits, labels))]


def _on(batch: dict, model) -> dict:
    """``batch`` on the device ``model`` is on (the model owner's model may be on a GPU)."""
    from ..models.offload import execution_device

    device = execution_device(model)
    return {k: v.to(device) for k, v in batch.items()}


def _autocast(enabled: bool, model=None):
    """bfloat16 autocast on the device ``model`` is on (off: a no-op)."""
    if not enabled:
        return contextlib.nullcontext()
    from ..models.offload import execution_device

    device = execution_device(model).type if model is not None else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16)


class Objective:
    """The distillation loss of a student built for ``plan`` against a teacher's states."""

    def __init__(self, plan: LayerPlan, kd_weight: float, lm_weight: float, layer_weight: float,
                 per_token: bool = False, margin: float = 0.0, margin_weight: float = 0.0,
                 grad_weight: float = 0.0):
        l, m = len(plan.bottom), len(plan.emulator)
        if grad_weight and not l:
            raise UserError("distill.grad_weight: matches the gradient the bottom adapter "
                            "receives, and this split has none; set split.adapter_bottom >= 1 "
                            "or grad_weight 0")
        ends = [l + sum(plan.spans[:j + 1]) - 1 for j in range(m)]  # teacher blocks, by position
        self.student_positions = list(range(l, l + m)) if layer_weight else [l + m - 1]
        self.teacher_positions = ends if layer_weight else [ends[-1]]
        self.input_block = l - 1  # the bottom adapter's last block, the same in both models
        self.kd_weight, self.lm_weight, self.layer_weight = kd_weight, lm_weight, layer_weight
        self.per_token, self.margin, self.margin_weight = per_token, margin, margin_weight
        self.grad_weight = grad_weight

    @classmethod
    def from_config(cls, plan: LayerPlan, cfg) -> "Objective":
        """The objective a ``DistillConfig`` (split.distill) describes."""
        return cls(plan, cfg.kd_weight, cfg.lm_weight, cfg.layer_weight,
                   cfg.nmse == "per_token", cfg.margin, cfg.margin_weight, cfg.grad_weight)

    def settings(self) -> dict:
        """The weights, for a distillation report (unused options left out)."""
        return {"kd_weight": self.kd_weight, "lm_weight": self.lm_weight,
                "layer_weight": self.layer_weight,
                **({"margin": self.margin, "margin_weight": self.margin_weight}
                   if self.margin_weight else {}),
                **({"grad_weight": self.grad_weight} if self.grad_weight else {}),
                "nmse": "per_token" if self.per_token else "global"}

    @property
    def needs_output(self) -> bool:
        """Does the objective use the student's task loss (else the forward stops early)?"""
        return bool(self.lm_weight or self.margin_weight)

    def teacher_states(self, teacher, arch, items: list[dict], pad_id: int,
                       autocast: bool) -> TeacherStates:
        """The teacher's cache of everything this objective compares against."""
        return TeacherStates(teacher, arch, items, self.teacher_positions, pad_id, autocast,
                             losses=bool(self.margin_weight),
                             gradients=self.input_block if self.grad_weight else None)

    def __call__(self, student, arch, states: TeacherStates, indices: list[int],
                 batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, {part: value}) of ``student`` on the public ``batch`` (items ``indices``)."""
        batch = _on(batch, student)
        width = _width(batch)
        targets = states.batch(indices, width)
        inputs = batch if self.needs_output else {k: v for k, v in batch.items()
                                                  if k != "labels"}
        with contextlib.ExitStack() as stack:
            leaf = None
            if self.grad_weight:
                leaf = stack.enter_context(input_leaf(arch.blocks(student)[self.input_block]))
                # fused attention kernels have no second derivative; the math one has
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            outputs, output = block_outputs(student, arch.blocks(student),
                                            self.student_positions, inputs,
                                            stop=not self.needs_output)
        mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        pairs = [_nmse(outputs[s], t, mask, self.per_token)
                 for s, t in zip(self.student_positions, targets)]
        kd = pairs[-1]
        loss = self.kd_weight * kd
        parts = {"nmse": kd.item()}
        if self.lm_weight:
            loss = loss + self.lm_weight * output.loss
            parts["lm_loss"] = output.loss.item()
        if self.margin_weight:  # LLEOT-style: the emulator alone stays `margin` nats worse
            gap = output.loss - states.loss(indices)
            loss = loss + self.margin_weight * torch.relu(self.margin - gap)
            parts["lm_gap"] = gap.item()
        if self.layer_weight:
            layer = sum(pairs) / len(pairs)
            loss = loss + self.layer_weight * layer
            parts["layer_nmse"] = layer.item()
        if self.grad_weight:
            at_output, at_input = states.gradient_batch(indices, width)
            end = outputs[self.student_positions[-1]]
            backward, = torch.autograd.grad(end, leaf[0], at_output.to(end.dtype),
                                            create_graph=student.training)
            grad = _nmse(backward, at_input, mask)
            loss = loss + self.grad_weight * grad
            parts["grad_nmse"] = grad.item()
        parts["loss"] = loss.item()
        return loss, parts


def _batches(items: list[dict], batch_size: int, pad_id: int, shuffle: bool, seed: int = 0):
    """(item indices, collated batch) pairs."""
    return DataLoader(range(len(items)), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed),
                      collate_fn=lambda idx: (list(idx), collate([items[i] for i in idx],
                                                                 pad_id)))


def _width(batch: dict) -> int | None:
    return batch["input_ids"].shape[1] if "input_ids" in batch else None


def measure(objective: Objective, teacher, student, items: list[dict], batch_size: int = 8,
            pad_id: int = 0, arch=None, states: TeacherStates | None = None,
            autocast: bool = False) -> dict[str, float]:
    """Token-weighted mean of each part of the objective over ``items``."""
    from ..models.families import resolve

    arch = arch or resolve(student)
    states = states or objective.teacher_states(teacher, arch, items, pad_id, autocast)
    student.eval()
    totals: dict[str, float] = {}
    weight = 0
    for indices, batch in _batches(items, batch_size, pad_id, shuffle=False):
        n = int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(indices)
        # the gradient term differentiates the student's forward, without training it
        with _autocast(autocast, student), torch.set_grad_enabled(bool(objective.grad_weight)):
            _, parts = objective(student, arch, states, indices, batch)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value * n
        weight += n
    return {k: v / max(weight, 1) for k, v in totals.items()}


def distill(teacher, student, arch, plan: LayerPlan, train_items: list[dict],
            val_items: list[dict], objective: Objective, steps: int, lr: float = 1e-4,
            batch_size: int = 8, eval_every: int = 50, seed: int = 0, pad_id: int = 0,
            log=None, autocast: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Train ``student``'s emulator blocks on ``objective``; returns the best emulator tensors
    and a report. ``autocast``: bfloat16 autocast on the model's device (a gain on GPUs and
    AMX CPUs only)."""
    if not train_items or not val_items:
        raise UserError("distill: the public data has too little text for training and a "
                        "held-out split; give more text or a smaller block_size")
    blocks = arch.blocks(student)
    student.requires_grad_(False)
    params = []
    for p in sorted({plan.order.index(i) for i in plan.emulator}):
        blocks[p].requires_grad_(True)
        params += list(blocks[p].parameters())
    teacher.eval()
    torch.manual_seed(seed)
    train_states, val_states = (objective.teacher_states(teacher, arch, items, pad_id, autocast)
                                for items in (train_items, val_items))

    def held_out():
        return measure(objective, teacher, student, val_items, batch_size, pad_id, arch,
                       val_states, autocast)

    loader = _batches(train_items, batch_size, pad_id, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = held_out()
    best, best_step = dict(start), 0
    best_tensors = emulator_tensors(student, arch, plan)
    for step, (indices, batch) in enumerate(_cycle(loader, steps), start=1):
        _train_step(objective, student, arch, train_states, indices, batch, params, optimizer,
                    autocast)
        if step % eval_every == 0 or step == steps:
            scores = held_out()
            if log:
                log(_progress(step, steps, scores))
            if scores["loss"] < best["loss"]:
                best, best_step = scores, step
                best_tensors = emulator_tensors(student, arch, plan)
    student.requires_grad_(False)
    student.eval()
    report = {"steps": steps, "best_step": best_step, "lr": lr, "batch_size": batch_size,
              **objective.settings(), "bf16": autocast,
              "held_out_before": start, "held_out_best": best}
    return best_tensors, report


def _cycle(loader, steps: int):
    """Exactly ``steps`` batches, going over ``loader`` again as often as needed."""
    step = 0
    while step < steps:
        for item in loader:
            yield item
            step += 1
            if step >= steps:
                return


def _train_step(objective: Objective, student, arch, states: TeacherStates, indices, batch,
                params, optimizer, autocast: bool) -> None:
    student.train()
    with _autocast(autocast, student):
        loss, _ = objective(student, arch, states, indices, batch)
    if not math.isfinite(loss.item()):
        raise UserError("distill: the loss became NaN/Inf; lower distill lr")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()


def _progress(step: int, steps: int, scores: dict[str, float]) -> str:
    return (f"distill step {step}/{steps}: held-out nmse {scores['nmse']:.4f}"
            + (f", lm loss {scores['lm_loss']:.3f}" if "lm_loss" in scores else "")
            + (f", gap to the full model {scores['lm_gap']:.3f}" if "lm_gap" in scores else "")
            + (f", gradient nmse {scores['grad_nmse']:.4f}" if "grad_nmse" in scores else ""))
