"""The model owner's secret: no tensor of a dropped block ever leaves it, in any message."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fl_offsite import config as configs
from fl_offsite.models.families import resolve
from fl_offsite.offsite.bundle import split_state
from fl_offsite.federation.runtime import new_run_dir
from fl_offsite.federation.simulation import simulate
from fl_offsite.models.loading import load_model
from fl_offsite.offsite.plan import make_plan

pytestmark = pytest.mark.slow


BASE = {
    "model": "fl-offsite/tiny-opt", "num_clients": 2, "clients_per_round": 2, "rounds": 2,
    "bundle_transport": "message", "split": {"emulator_layers": 2},
    "data": {"path": "fl-offsite/pydoc", "block_size": 32, "max_eval_examples": 10},
    "train": {"max_steps": 1, "batch_size": 4}}
DISTILL = {"data": "fl-offsite/pydoc", "steps": 2, "batch_size": 4, "block_size": 32}
KINDS = {
    "plain": {},
    "int8": {"split": {"emulator_layers": 2, "compression": {"name": "int8"}}},
    "distilled": {"split": {"emulator_layers": 2, "distill": DISTILL}},
    # re-alignment ships new emulator blocks as deltas of the cached bundle every round
    "realigned": {"split": {"emulator_layers": 2, "distill": DISTILL},
                  "realign": {"every": 1, "steps": 2, "lr": 1e-3}},
}


def sent_contents(messages) -> tuple[list[tuple[str, torch.Tensor]], list[bytes]]:
    """Every tensor and every byte string the model owner put in a message."""
    tensors, blobs = [], []
    for message in messages:
        for record in message.content.values():
            if isinstance(record, ArrayRecord):
                tensors += list(record.to_torch_state_dict().items())
            elif isinstance(record, ConfigRecord):
                blobs += [v.encode() if isinstance(v, str) else v for v in record.values()
                          if isinstance(v, (bytes, str))]
    return tensors, blobs


def resembles(tensor: torch.Tensor, secret: torch.Tensor) -> bool:
    """Is ``tensor`` the secret, a rounding of it (fp16, int8 codes) or close to it?"""
    if tensor.shape != secret.shape or secret.numel() < 2:
        return False
    a, b = tensor.double().flatten(), secret.double().flatten()
    if torch.equal(a, b):
        return True
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-12)) > 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_no_dropped_block_leaves_the_model_owner(tmp_path, wire, kind):
    cfg = configs.load(None, {**BASE, **KINDS[kind]})
    simulate(cfg, new_run_dir(cfg, tmp_path / "run"))

    model = load_model(cfg.model)
    _, blocks = split_state(model, resolve(model))
    gone = make_plan(len(blocks), 2, 2, 2).dropped
    assert gone
    # weight matrices: a norm's all-ones vector is the same in every block, not a secret
    secrets = [(f"{i}.{name}", t) for i in gone for name, t in blocks[i].items() if t.dim() >= 2]
    tensors, blobs = sent_contents(m for sent, _ in wire for m in sent)
    assert len(tensors) > 100  # the bundle did travel inside messages
    for name, tensor in tensors:
        index = name.split("/", 1)[-1].split(".")[0]
        assert not (index.isdigit() and int(index) in gone), name
        for secret_name, secret in secrets:
            assert not resembles(tensor, secret), f"{name} resembles dropped {secret_name}"
    # no dropped tensor's bytes (as stored, or in fp16) hide in a byte string either
    needles = [t.contiguous().to(dtype).flatten()[:16].numpy().tobytes()
               for _, t in secrets for dtype in (torch.float32, torch.float16)]
    for blob in blobs:
        assert not any(needle in blob for needle in needles)


def test_resembles_catches_a_leak_in_each_form():
    """The detector above: the secret, its fp16 and int8 forms and a noisy copy are caught,
    an unrelated tensor of the same shape is not."""
    from fl_offsite.emulators.int8_layers import quantize_weight

    secret = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    codes, _ = quantize_weight(secret)
    assert resembles(secret.clone(), secret)
    assert resembles(secret.half(), secret)
    assert resembles(codes, secret)
    assert resembles(secret + 0.3 * torch.randn_like(secret), secret)
    assert not resembles(torch.randn(64, 32), secret)
