"""The model owner's secret: no tensor of a dropped block ever leaves it, in any message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fl_offsite import config as configs
from fl_offsite.models.families import resolve
from fl_offsite.offsite.bundle import split_state
from fl_offsite.federation import server
from fl_offsite.federation.runtime import new_run_dir
from fl_offsite.federation.simulation import simulate
from fl_offsite.models.loading import load_model, resolve_model_path
from fl_offsite.offsite.plan import make_plan

pytestmark = pytest.mark.slow


class RecordingGrid:
    """The real Grid, with every message the model owner sends kept for inspection."""

    def __init__(self, grid, sent: list):
        self.grid, self.sent = grid, sent

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        self.sent.extend(messages)
        return self.grid.send_and_receive(messages, *args, **kwargs)

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend(messages)
        return self.grid.push_messages(messages)

    def __getattr__(self, attr):
        return getattr(self.grid, attr)


def test_no_dropped_block_and_no_checkpoint_leaves_the_model_owner(tmp_path, monkeypatch):
    sent: list = []
    real = server.run_federation
    monkeypatch.setattr(server, "run_federation",
                        lambda grid, *a, **k: real(RecordingGrid(grid, sent), *a, **k))
    cfg = configs.load(None, {
        "model": "fl-offsite/tiny-opt", "num_clients": 2, "clients_per_round": 2, "rounds": 2,
        "bundle_transport": "message", "split": {"emulator_layers": 2},
        "data": {"path": "fl-offsite/pydoc", "block_size": 32, "max_eval_examples": 10},
        "train": {"max_steps": 1, "batch_size": 4}})
    simulate(cfg, new_run_dir(cfg, tmp_path / "run"))

    model = load_model(cfg.model)
    _, blocks = split_state(model, resolve(model))
    gone = make_plan(len(blocks), 2, 2, 2).dropped
    assert gone
    dropped = [t for i in gone for t in blocks[i].values()]
    checkpoint = (Path(resolve_model_path(cfg.model)) / "model.safetensors").read_bytes()
    tensors, blobs = [], []
    for message in sent:
        for record in message.content.values():
            if isinstance(record, ArrayRecord):
                tensors += list(record.to_torch_state_dict().items())
            elif isinstance(record, ConfigRecord):
                blobs += [v for v in record.values() if isinstance(v, (bytes, str))]
    assert len(tensors) > 100  # the bundle did travel inside messages
    for name, tensor in tensors:
        index = name.split("/", 1)[-1].split(".")[0]
        assert not (index.isdigit() and int(index) in gone), name
        for secret in dropped:
            assert not (tensor.shape == secret.shape and
                        torch.equal(tensor.to(secret.dtype), secret)), name
    for blob in blobs:
        data = blob.encode() if isinstance(blob, str) else blob
        assert checkpoint[:4096] not in data and len(data) < len(checkpoint)
