"""Secure aggregation (``secagg.enabled``, Flower's SecAgg+): the same adapter as FedAvg up to
the quantization error, and the model owner never holds a single data owner's update."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp.strategy import FedAvg

import strategies
from fl_offsite import config as configs
from fl_offsite.offsite.adapter import Adapter
from fl_offsite.errors import UserError
from fl_offsite.federation import protocol, server
from fl_offsite.federation.runtime import new_run_dir
from fl_offsite.federation.simulation import simulate

BASE = {
    "name": "test", "model": "fl-offsite/tiny-opt", "num_clients": 3, "clients_per_round": 3,
    "rounds": 2, "seed": 0, "split": {"emulator_layers": 2},
    "data": {"path": "fl-offsite/pydoc", "block_size": 32, "max_eval_examples": 20},
    "train": {"lr": 0.002, "max_steps": 2, "batch_size": 4},
}
CRASH = {"crash": 0.34, "seed": 4}  # data owner 1 raises in round 1, data owner 2 in round 2


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg, keeping what each aggregate_train call was given."""

    calls: list = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        RecordingFedAvg.calls.append(
            [(protocol.record_tensors(r.content["arrays"]),
              int(r.content["metrics"]["num-examples"])) for r in replies])
        return super().aggregate_train(server_round, replies)


class RecordingGrid:
    """The real Grid, keeping every message the model owner sends and every reply it gets."""

    def __init__(self, grid, sent: list, received: list):
        self.grid, self.sent, self.received = grid, sent, received

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self.grid.send_and_receive(messages, *args, **kwargs))
        self.received.extend(copy.deepcopy(replies))  # as they arrived (the loop trims them)
        return replies

    def __getattr__(self, attr):
        return getattr(self.grid, attr)


def _run(tmp_path_factory, secure: bool) -> dict:
    patch = pytest.MonkeyPatch()
    patch.setattr(strategies.FedAvg, "flower_strategy_class", lambda self: RecordingFedAvg)
    sent, received = [], []
    real = server.run_federation
    patch.setattr(server, "run_federation",
                  lambda grid, *a, **k: real(RecordingGrid(grid, sent, received), *a, **k))
    RecordingFedAvg.calls = []
    cfg = configs.load(None, {**BASE, "faults": CRASH, "secagg": {"enabled": secure}})
    run_dir = new_run_dir(cfg, tmp_path_factory.mktemp("secagg" if secure else "plain") / "run")
    try:
        summary = simulate(cfg, run_dir)
    finally:
        patch.undo()
    return {"cfg": cfg, "dir": run_dir, "summary": summary, "calls": list(RecordingFedAvg.calls),
            "sent": sent, "received": received}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same seed and federation twice: plain FedAvg, then FedAvg under SecAgg+; one data
    owner drops out of each round (SecAgg+ removes its masks with the others' key shares)."""
    return _run(tmp_path_factory, False), _run(tmp_path_factory, True)


def _adapter(run: dict, rnd: int) -> dict[str, torch.Tensor]:
    return Adapter.load(run["dir"] / "checkpoints" / f"round-{rnd:04d}.safetensors").tensors


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


@pytest.mark.slow
def test_secure_fedavg_matches_plain_fedavg_within_the_quantization_error(runs):
    plain, secure = runs
    sec = secure["cfg"].secagg
    first_plain, first_secure = plain["summary"]["rounds"][0], secure["summary"]["rounds"][0]
    # round 1: same global adapter, same seeds, so the same trained adapters go in
    assert first_secure["train_loss"] == pytest.approx(first_plain["train_loss"], rel=1e-12)
    for record in secure["summary"]["rounds"]:  # the dropout costs its upload, not the round
        assert record["clients_ok"] == 2 and record["clients_failed"] == 1 and record["updated"]
    assert first_secure["secagg"]["clipped"] == 0
    # each of the K stochastic roundings is off by < 1 level of 2c/Q; the sum is divided by
    # q_total / Q, q_total = sum_i round(n_i / max_weight * Q)
    (uploads,) = plain["calls"][:1]
    q_total = sum(round(n / sec.max_weight * sec.quantization_range) for _, n in uploads)
    max_error = 2 * sec.clipping_range * len(uploads) / q_total
    assert first_secure["secagg"]["max_error"] == pytest.approx(max_error)
    assert max_error < 2e-6
    a, b = _adapter(secure, 1), _adapter(plain, 1)
    eps = torch.finfo(torch.float32).eps  # both adapters are float32: a few roundings each
    for key in b:
        diff = (a[key].double() - b[key].double()).abs()
        assert bool((diff <= max_error + 4 * eps * b[key].double().abs()).all()), key
    assert any(not torch.equal(a[k], b[k]) for k in b)  # it did go through quantization
    # later rounds train from adapters that differ by up to max_error per coordinate, so they
    # differ by what training makes of that: still a tiny fraction of the round's update
    for rnd in (2,):
        step = _distance(_adapter(plain, rnd), _adapter(plain, rnd - 1))
        assert _distance(_adapter(secure, rnd), _adapter(plain, rnd)) < 0.01 * step
    last_plain, last_secure = plain["summary"]["rounds"][-1], secure["summary"]["rounds"][-1]
    assert last_secure["plugin"]["ppl"] == pytest.approx(last_plain["plugin"]["ppl"], rel=1e-3)


@pytest.mark.slow
def test_the_model_owner_never_holds_a_single_update(runs):
    plain, secure = runs
    sec = secure["cfg"].secagg
    q, c, w = sec.quantization_range, sec.clipping_range, sec.max_weight
    uploads = plain["calls"][0]  # round 1's trained adapters, as plain FedAvg received them
    # the round-1 global adapter, from the model owner's training instructions (FitIns)
    fitins = next(m for m in secure["sent"] if "fitins.parameters" in m.content.array_records)
    keys = json.loads(str(fitins.content["fitins.config"]["secagg-keys"]))
    arrays = list(fitins.content["fitins.parameters"].values())
    start = {k: torch.from_numpy(bytes_to_ndarray(a.data).copy()) for k, a in zip(keys, arrays)}
    updates = [({k: t[k].double() - start[k].double() for k in keys}, n) for t, n in uploads]
    # what the data owners would send unmasked: the quantized weighted update, in [0, Q]
    quantized = [np.concatenate([((u[k].numpy() * n / w).clip(-c, c) + c).ravel() * q / (2 * c)
                                 for k in keys]) for u, n in updates]

    # 1. no reply a data owner sent the model owner carries an adapter or update in the clear
    masked = []
    for reply in secure["received"]:
        if reply.has_error():  # the data owner dropping out
            continue
        for record in reply.content.array_records.values():
            assert len(record) == 0, "a tensor travelled unmasked"
        configs_ = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in configs_:
            vectors = [bytes_to_ndarray(b) for b in configs_[Key.MASKED_PARAMETERS]]
            masked.append(np.concatenate([v.ravel() for v in vectors[1:]]))  # [0]: the weight
    assert len(masked) == 2 * secure["cfg"].rounds
    for vector in masked[:2]:  # round 1's masked uploads look nothing like any quantized update
        assert vector.shape == quantized[0].shape
        assert float((vector > q).mean()) > 0.99  # uniform over [0, 2**32), not within [0, Q]
        for plain_vector in quantized:
            assert float((np.abs(vector - plain_vector) <= 1).mean()) < 0.01

    # 2. the strategy gets one reply per round: the unmasked mean, no data owner's own adapter
    assert [len(call) for call in secure["calls"]] == [1] * secure["cfg"].rounds
    (mean, total), = secure["calls"][0]
    assert total == sum(n for _, n in uploads)
    weighted = {k: sum(t[k].double() * n for t, n in uploads) / total for k in keys}
    max_error = secure["summary"]["rounds"][0]["secagg"]["max_error"]
    assert all(float((mean[k].double() - weighted[k]).abs().max()) <= max_error + 1e-6
               for k in keys)
    for own, _ in uploads:
        assert _distance(mean, own) > 100 * max_error * math.sqrt(len(quantized[0]))


@pytest.mark.slow
def test_a_claim_beyond_max_weight_costs_the_round_not_the_adapter(tmp_path, capsys):
    """One data owner per round claims 10^9 examples. Flower's SecAgg+ would only warn and let
    it outweigh the others (or overflow); the masked sum cannot be split afterwards, so the
    model owner refuses the round and the adapter stays where it was."""
    from fl_offsite.offsite.emulated import bundle_adapter

    cfg = configs.load(None, {**BASE, "secagg": {"enabled": True},
                              "faults": {"inflated_count": 0.34, "seed": 4}})
    run_dir = new_run_dir(cfg, tmp_path / "run")
    summary = simulate(cfg, run_dir)
    start = bundle_adapter(run_dir / "bundle").tensors
    for record in summary["rounds"]:
        assert record["clients_ok"] == 3 and not record["updated"]
        assert list(record["secagg"]["claims_over_max_weight"].values()) == [10**9]
        kept = _adapter({"dir": run_dir}, record["round"])
        assert all(torch.equal(kept[k], start[k]) for k in start)
    assert "claimed more than secagg.max_weight=1000 examples (1000000000)" in \
        capsys.readouterr().out


@pytest.mark.parametrize("override, field", [
    ({"strategy": {"name": "median"}}, "strategy.name"),
    ({"strategy": {"name": "krum"}}, "strategy.name"),
    ({"strategy": {"name": "trimmed_mean"}}, "strategy.name"),
    ({"strategy": {"max_update_norm": 1.0}}, "strategy.max_update_norm"),
    ({"strategy": {"clip_norm": 1.0}}, "strategy.clip_norm"),
    ({"faults": {"nan_update": 0.2}}, "faults.nan_update"),
    ({"num_clients": 1, "clients_per_round": 1}, "secagg.enabled"),
    ({"secagg": {"enabled": True, "num_shares": 2}}, "secagg.num_shares"),
    ({"secagg": {"enabled": True, "num_shares": 4}}, "secagg.num_shares"),
    ({"secagg": {"enabled": True, "quantization_range": 2 ** 31}}, "secagg.quantization_range"),
])
def test_incompatible_settings_are_refused_in_one_line(override, field):
    tree = {**BASE, "secagg": {"enabled": True}, **override}
    with pytest.raises(UserError) as err:
        configs.load(None, tree)
    message = str(err.value)
    assert message.startswith(f"config: {field}: ") and "\n" not in message
    if "secagg" not in override:  # the same settings are fine without secure aggregation
        configs.load(None, {**tree, "secagg": {"enabled": False}})


def test_the_cli_refuses_secagg_with_a_robust_strategy(capsys, tmp_path):
    from pathlib import Path

    from fl_offsite.cli import main

    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"
    code = main(["simulate", "--config", str(demo), "--set", "secagg.enabled=true",
                 "--set", "strategy.name=median", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "strategy.name: median needs every upload on its own" in err
    assert not (tmp_path / "run").exists()
