"""Local DP-SGD: the data owner trains its adapter with per-example clipping and noise (Opacus).

With ``dp.mode: dpsgd`` every optimizer step of a data owner is a sampled Gaussian mechanism
on its own examples, which gives each example an (epsilon, delta) guarantee:

- **Poisson sampling.** Each example joins a batch independently with probability
  ``q = 1 / ceil(N / batch_size)`` (N: the data owner's examples; the expected batch is about
  ``batch_size``, the size varies). This is the sampling the RDP accountant's analysis of the
  subsampled Gaussian mechanism assumes; shuffled fixed-size batches would not match it.
- **Per-example clipping.** Each example's gradient (over all trainable tensors together) is
  clipped to L2 norm ``max_grad_norm``; the loss is computed per example (the mean over its
  own target tokens), so no example's gradient depends on another's (a transformers model's
  built-in loss divides by the batch's token count, which would).
- **Noise.** Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added
  to the sum, which is divided by the expected batch size before the AdamW step. An empty
  Poisson batch still takes its noise-only step: skipping it would reveal that it was empty.

Opacus' ``PrivacyEngine.make_private`` does the per-example gradients (hooks on the modules
that own trainable tensors, so only the adapter's tensors cost memory), the clipping, the
noise and the accounting. One obstacle in Hugging Face blocks: OPT flattens (batch,
position) into one dimension before its feed-forward layers and their norm, which hides the
batch from per-layer per-example gradients (Opacus' ``hooks`` and ``functorch`` modes both
fail on it; its ``ew`` mode cannot call a model with keyword inputs). So for the duration of
training every module that owns a trainable tensor is wrapped in ``_BatchFirst``, which gives
it its input as (batch, -1, ...) and flattens the output back; a linear layer or layer norm
computes the same thing either way. The per-example gradients match autograd on each example
alone (tests/test_dpsgd.py).

Sampling and noise come from the OS's entropy, not the run's seed (which the model owner
knows); the model's own randomness (dropout) stays seeded. Steps are accounted with Opacus'
RDP accountant: one ``(noise_multiplier, q, steps)`` entry per round a data owner trains in.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import collate
from ..errors import UserError
from .config import TrainConfig


class _BatchSize:
    """The current batch size, read by every ``_BatchFirst`` wrapper."""

    value = 0


class _BatchFirst(nn.Module):
    """Runs ``inner`` on (batch, -1, ...) when the model has flattened batch and positions."""

    def __init__(self, inner: nn.Module, batch: _BatchSize):
        super().__init__()
        self.inner = inner
        self.batch = batch

    def forward(self, x, *args, **kwargs):
        b = self.batch.value
        if torch.is_tensor(x) and b and x.dim() >= 2 and x.shape[0] != b and \
                x.shape[0] % b == 0:
            out = self.inner(x.reshape(b, -1, *x.shape[1:]), *args, **kwargs)
            return out.reshape(x.shape[0], *out.shape[2:])
        return self.inner(x, *args, **kwargs)

    def __getattr__(self, name):  # callers may read the wrapped layer's attributes (weight...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def _wrap(model: nn.Module, batch: _BatchSize) -> list[tuple[nn.Module, str, nn.Module]]:
    """Wrap every module owning a trainable tensor; returns what ``_unwrap`` puts back."""
    owners = []
    for name, module in model.named_modules():
        if name and any(p.requires_grad for p in module.parameters(recurse=False)):
            parent_name, _, child = name.rpartition(".")
            owners.append((model.get_submodule(parent_name), child, module))
    for parent, child, module in owners:  # parents were looked up before any replacement
        setattr(parent, child, _BatchFirst(module, batch))
    return owners


def _unwrap(owners: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, child, module in owners:
        setattr(parent, child, module)


def per_example_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """One loss per example: cross-entropy over its own target tokens (or its label)."""
    if "pixel_values" in batch:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                             reduction="none")
    valid = labels != -100
    return (tokens * valid).sum(1) / valid.sum(1).clamp(min=1)


def epsilon(history: list, delta: float) -> float:
    """Epsilon after the steps in ``history``: (noise_multiplier, sample_rate, steps) entries.

    Infinite when any step had no noise (clipping alone protects nothing)."""
    history = [(float(z), float(q), int(n)) for z, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta))


def _collate(items: list[dict], pad_id: int = 0) -> dict:
    return collate(items, pad_id) if items else {}  # an empty Poisson batch


def _secret_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def _steps(model, params, loader, optimizer, batch: _BatchSize, anchors, prox_mu: float,
           total_steps: int, device) -> list[float]:
    """``total_steps`` DP-SGD steps; returns the mean loss of each non-empty batch."""
    losses: list[float] = []
    step = 0
    while step < total_steps:
        for data in loader:
            size = len(data["labels"]) if data else 0
            if size:
                batch.value = size
                per_example = per_example_loss(model, {k: v.to(device) for k, v in data.items()})
                (per_example.sum() / size).backward()
                losses.append(float(per_example.detach().mean()))
            else:  # an empty Poisson batch: its noise-only step still happens
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            if optimizer.pre_step():  # clip, sum, add noise, scale; the accountant counts it
                if anchors is not None:  # FedProx: data-independent, added after the noise
                    for p, anchor in zip(params, anchors):
                        p.grad.add_(p.detach() - anchor, alpha=prox_mu)
                optimizer.original_optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= total_steps:
                break
    return losses


def _poisson_loader(items: list[dict], batch_size: int, pad_id: int) -> DataLoader:
    """Each example joins each batch with probability 1 / steps per epoch, drawn from a
    secret generator (the RDP accountant's sampling assumption)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    steps_per_epoch = math.ceil(len(items) / batch_size)
    sampler = UniformWithReplacementSampler(num_samples=len(items),
                                            sample_rate=1.0 / steps_per_epoch,
                                            generator=_secret_generator(torch.device("cpu")),
                                            steps=steps_per_epoch)
    return DataLoader(items, batch_sampler=sampler, collate_fn=partial(_collate, pad_id=pad_id))


def _leave_clean(model, params, hooks, owners) -> None:
    """Opacus' hooks and per-example gradients off the model, as plain training leaves it."""
    if hooks is not None:
        hooks.cleanup()
    _unwrap(owners)
    for p in params:
        p.grad = None
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    model.eval()


def train_dpsgd(model: nn.Module, items: list[dict], cfg: TrainConfig, noise_multiplier: float,
                max_grad_norm: float, delta: float, pad_id: int = 0, seed: int = 0,
                prox_mu: float = 0.0) -> dict:
    """``train``'s counterpart with DP-SGD; adds ``dp`` (noise_multiplier, sample_rate, steps,
    epsilon of this call alone) to the statistics."""
    from accelerate.utils import set_seed
    from opacus import PrivacyEngine

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("tuning: nothing to train (no trainable parameters)")
    if not items:
        raise UserError("data: the training split is empty")
    if cfg.grad_accum != 1 or cfg.mixed_precision != "no":
        raise UserError("dp.mode: dpsgd needs train.grad_accum=1 and train.mixed_precision=no")
    if any(p.dtype == torch.float16 for p in params):
        raise UserError("dtype: dp.mode dpsgd trains the adapter in its own dtype, and float16 "
                        "weights turn to NaN; use a float32 or bfloat16 bundle (dtype key)")
    set_seed(seed)  # dropout; sampling and noise below are not derived from the seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = _poisson_loader(items, cfg.batch_size, pad_id)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else None
    batch = _BatchSize()
    owners = _wrap(model, batch)
    hooks = None
    model.train()
    try:
        with warnings.catch_warnings():
            # expected: no cryptographic RNG (secure_mode needs torchcsprng; the generators here
            # are seeded from os.urandom), and the first adapter block's input needs no gradient
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            engine = PrivacyEngine(accountant="rdp")
            hooks, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                poisson_sampling=False,  # the loader above samples already, from a secret RNG
                noise_generator=_secret_generator(device), wrap_model=False)
            sample_rate = 1.0 / len(loader)  # what make_private gave the accountant
            total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(loader)))
            losses = _steps(model, params, loader, optimizer, batch, anchors, prox_mu,
                            total_steps, device)
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" not in str(exc):
            raise
        raise UserError("dp.mode: dpsgd cannot compute per-example gradients for this model "
                        "(a layer hides the batch dimension); use dp.mode=update") from None
    finally:
        _leave_clean(model, params, hooks, owners)
    if not all(math.isfinite(x) for x in losses):
        raise UserError("training: the loss became NaN/Inf; lower lr")
    history = [(noise_multiplier, sample_rate, total_steps)]
    return {"train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "train_loss_last": losses[-1] if losses else float("nan"),
            "steps": total_steps, "examples": len(items),
            "dp": {"noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                   "steps": total_steps, "epsilon": epsilon(history, delta)}}
