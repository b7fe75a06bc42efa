"""Real Flower + Ray simulations of federated offsite-tuning on the packaged tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.serverapp.strategy import FedAvg

import strategies
from fl_offsite import config as configs
from fl_offsite.offsite.adapter import Adapter
from fl_offsite.federation import protocol
from fl_offsite.federation.client import injected_fault
from fl_offsite.federation.simulation import simulate
from fl_offsite.federation.runtime import new_run_dir

from conftest import received_bytes, record_wire

pytestmark = pytest.mark.slow

BASE = {
    "name": "test", "model": "fl-offsite/tiny-opt", "num_clients": 3, "clients_per_round": 3,
    "rounds": 2, "seed": 0, "split": {"emulator_layers": 2},
    "data": {"path": "fl-offsite/pydoc", "block_size": 32, "max_eval_examples": 20},
    "train": {"lr": 0.002, "max_steps": 2, "batch_size": 4},
}


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg, keeping what it was given and what it returned."""

    calls: list = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        RecordingFedAvg.calls.append((
            [(protocol.record_tensors(r.content["arrays"]),
              int(r.content["metrics"]["num-examples"])) for r in replies],
            protocol.record_tensors(arrays)))
        return arrays, metrics


@pytest.fixture(scope="module")
def crashing_run(tmp_path_factory):
    """3 data owners, 2 rounds, FedAvg recorded, fault drill crashing about a third of them."""
    patch = pytest.MonkeyPatch()
    patch.setattr(strategies.FedAvg, "flower_strategy_class", lambda self: RecordingFedAvg)
    exchanges = record_wire(patch)
    RecordingFedAvg.calls = []
    cfg = configs.load(None, {**BASE, "faults": {"crash": 0.34, "seed": 3}})
    run_dir = new_run_dir(cfg, tmp_path_factory.mktemp("sim") / "run")
    try:
        summary = simulate(cfg, run_dir)
    finally:
        patch.undo()
    return cfg, run_dir, summary, list(RecordingFedAvg.calls), exchanges


def test_the_aggregate_is_the_example_weighted_mean_of_client_adapters(crashing_run):
    _, run_dir, _, calls, _ = crashing_run
    assert calls
    for uploads, aggregate in calls:
        total = sum(n for _, n in uploads)
        for key, value in aggregate.items():
            expected = sum(t[key].double() * n for t, n in uploads) / total
            assert torch.allclose(value.double(), expected, atol=1e-6), key
    final = Adapter.load(run_dir / "adapter.safetensors")
    last = calls[-1][1]
    assert all(torch.equal(final.tensors[k], last[k].to(final.tensors[k].dtype)) for k in last)


def traffic_by_round(exchanges) -> list[dict]:
    """What crossed the Grid per round (each round ends with its training exchange): bundle
    messages and their payload, training messages' payload, and the payload of the training
    replies that came back without an error."""
    rounds, bundles, bundle_payload = [], 0, 0
    for messages, replies in exchanges:
        kinds = {m.metadata.message_type for m in messages}
        if kinds == {f"query.{protocol.BUNDLE_ACTION}"}:
            bundles += len(messages)
            bundle_payload += sum(received_bytes(m) for m in messages)
        elif kinds == {"train"}:
            rounds.append({"bundles": bundles, "bundle_payload": bundle_payload,
                           "adapters_down": sum(received_bytes(m) for m in messages),
                           "up": sum(received_bytes(r) for r in replies if not r.has_error())})
            bundles, bundle_payload = 0, 0
    return rounds


def test_the_bundle_reaches_each_data_owner_once_and_traffic_is_what_they_got(crashing_run):
    """Under shared-path (the default) no bundle byte is in a message: each data owner reads
    the bundle's files in place, and its receipt says how many bytes it read."""
    cfg, _, summary, _, exchanges = crashing_run
    wire = traffic_by_round(exchanges)
    assert [w["bundles"] for w in wire] == [cfg.num_clients, 0]
    assert [w["bundle_payload"] for w in wire] == [0, 0]
    for record, seen in zip(summary["rounds"], wire, strict=True):
        assert record["bundles_sent"] == seen["bundles"]
        read = seen["bundles"] * summary["bundle"]["bytes"]
        assert (record["bytes_down"], record["bytes_up"]) == (seen["adapters_down"] + read,
                                                              seen["up"])


def test_by_message_traffic_is_the_payload_that_crossed_the_wire(tmp_path, wire):
    cfg = configs.load(None, {**BASE, "num_clients": 2, "clients_per_round": 2,
                              "bundle_transport": "message"})
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    seen = traffic_by_round(wire)
    assert [s["bundles"] for s in seen] == [2, 0]
    assert seen[0]["bundle_payload"] > 2 * 0.9 * summary["bundle"]["bytes"]  # the tensors
    for record, s in zip(summary["rounds"], seen, strict=True):
        assert (record["bytes_down"], record["bytes_up"]) == (
            s["bundle_payload"] + s["adapters_down"], s["up"])


def test_a_crashing_data_owner_is_counted_and_the_round_goes_on(crashing_run):
    cfg, _, summary, _, _ = crashing_run
    faults = cfg.faults.model_dump()
    for record in summary["rounds"]:
        crashed = sum(injected_fault(faults, record["round"], who) == "crash" for who in range(3))
        assert record["clients_failed"] == crashed
        assert record["clients_ok"] == 3 - crashed
    assert sum(r["clients_failed"] for r in summary["rounds"]) > 0
    assert all(r["updated"] for r in summary["rounds"])


def test_run_directory_summary_and_tensorboard(crashing_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, summary, _, _ = crashing_run
    for name in ("config.yaml", "summary.json", "adapter.safetensors", "bundle/offsite.json"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "checkpoints").glob("round-*.safetensors"))) == 2
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["zero_shot"]["ppl"] > 0 and len(on_disk["rounds"]) == 2
    for record in on_disk["rounds"]:
        for key in ("round", "plugin", "emulator", "clients_ok", "clients_failed", "bytes_down",
                    "bytes_up", "seconds"):
            assert key in record, key
        assert math.isfinite(record["plugin"]["ppl"]) and math.isfinite(record["emulator"]["ppl"])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("plugin/ppl", "emulator/ppl", "zero_shot/ppl", "clients/ok", "clients/failed",
                "clients/train_loss_mean", "traffic/bytes_down_total", "traffic/bytes_up_total",
                "aggregate/update_norm", "round/seconds"):
        assert tag in tags, tag
        assert all(math.isfinite(e.value) for e in events.Scalars(tag))
    assert "config/text_summary" in events.Tags()["tensors"]
    assert list((run_dir / "ray").iterdir())  # Ray kept its session files in the run
    import ray
    assert not ray.is_initialized()


def test_ray_is_up_before_the_model_owner_starts_and_down_after_it_fails(tmp_path, monkeypatch):
    """Ray must not fork its processes while the ServerApp's thread runs (a fork under a held
    lock hangs); a failed run must not leave Ray running."""
    import ray
    from fl_offsite.federation import server

    seen = []

    def failing_owner(grid, cfg, run_dir, resume):
        seen.append(ray.is_initialized())
        raise RuntimeError("the model owner failed")

    monkeypatch.setattr(server, "run_federation", failing_owner)
    cfg = configs.load(None, {**BASE, "rounds": 1})
    with pytest.raises(RuntimeError, match="model owner failed"):
        simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    assert seen == [True]
    assert not ray.is_initialized()


def test_offsite_mode_over_the_message_transport(tmp_path):
    """Single data owner; the bundle travels inside Flower messages, as in a deployment."""
    from fl_offsite.cli.federated import OFFSITE_OVERRIDES

    cfg = configs.load(None, {**BASE, **OFFSITE_OVERRIDES, "rounds": 1,
                              "bundle_transport": "message", "tuning": {"kind": "lora"},
                              "train": {"lr": 0.01, "max_steps": 2, "batch_size": 4}})
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    (record,) = summary["rounds"]
    assert record["clients_ok"] == 1 and record["bundles_sent"] == 1
    assert record["update_norm"] > 0 and math.isfinite(record["plugin"]["ppl"])
    assert summary["bundle"]["adapter_bytes"] < 0.1 * summary["bundle"]["bytes"]  # LoRA only
    assert list((tmp_path / "run" / "cache" / "bundles").iterdir())  # written by the client


def test_the_demo_improves_on_zero_shot(tmp_path):
    """The README's first command, as users run it (fewer rounds to keep the suite short)."""
    import subprocess

    out = tmp_path / "demo"
    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"
    proc = subprocess.run(["fl-offsite", "simulate", "--config", str(demo),
                           "--set", "rounds=2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 2/2" in proc.stdout and "done: plug-in ppl" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][-1]["plugin"]["ppl"] < summary["zero_shot"]["ppl"]


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "median"])
def test_strategy_families_end_to_end_with_corrupted_uploads(name, tmp_path):
    """Proximal, server-optimizer and robust families; a third of the uploads are NaN."""
    cfg = configs.load(None, {**BASE, "rounds": 2, "strategy": {"name": name},
                              "train": {"lr": 0.002, "max_steps": 1, "batch_size": 4},
                              "faults": {"nan_update": 0.34, "seed": 1}})
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    faults = cfg.faults.model_dump()
    for record in summary["rounds"]:
        corrupted = sum(injected_fault(faults, record["round"], who) == "nan_update"
                        for who in range(3))
        assert record["clients_rejected"] == corrupted
        assert all("non-finite" in r["reason"] for r in record["rejections"])
        assert record["clients_ok"] == 3 - corrupted
        assert math.isfinite(record["plugin"]["ppl"])
    assert sum(r["clients_rejected"] for r in summary["rounds"]) > 0


def test_a_data_owner_claiming_a_billion_examples_weighs_as_three_typical_ones(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(strategies.FedAvg, "flower_strategy_class", lambda self: RecordingFedAvg)
    monkeypatch.setattr(RecordingFedAvg, "calls", [])
    cfg = configs.load(None, {**BASE, "faults": {"inflated_count": 0.34, "seed": 4}})
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    faults = cfg.faults.model_dump()
    assert len(RecordingFedAvg.calls) == len(summary["rounds"]) == 2
    for record, (uploads, _) in zip(summary["rounds"], RecordingFedAvg.calls):
        liars = [who for who in range(3)
                 if injected_fault(faults, record["round"], who) == "inflated_count"]
        (capped,) = record["weights_capped"]
        assert len(liars) == 1 and capped["announced"] == 10**9
        weights = sorted(n for _, n in uploads)
        assert weights[-1] == capped["used"] == 3 * weights[1]  # 3 x the round's median


def test_plug_in_is_evaluated_every_n_rounds_and_after_the_last(tmp_path, capsys):
    from fl_offsite.federation.report import render

    cfg = configs.load(None, {**BASE, "rounds": 3, "eval_every": 2,
                              "train": {"lr": 0.002, "max_steps": 1, "batch_size": 4}})
    run_dir = new_run_dir(cfg, tmp_path / "run")
    summary = simulate(cfg, run_dir)
    assert [bool(r["plugin"]) for r in summary["rounds"]] == [False, True, True]
    assert [bool(r["emulator"]) for r in summary["rounds"]] == [False, True, True]
    printed = [line for line in capsys.readouterr().out.splitlines() if "round " in line]
    assert "plug-in" not in next(line for line in printed if line.startswith("round 1/3"))
    assert "plug-in ppl" in next(line for line in printed if line.startswith("round 2/3"))
    assert len(render(run_dir)) == 3


def test_report_renders_the_curves(crashing_run, capsys):
    from fl_offsite.cli import main

    _, run_dir, _, _, _ = crashing_run
    assert main(["report", str(run_dir)]) == 0
    for name in ("report_metric.png", "report_client_loss.png", "report_traffic.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(run_dir / "checkpoints")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_a_round_without_enough_valid_uploads_keeps_the_adapter(tmp_path, capsys):
    cfg = configs.load(None, {**BASE, "num_clients": 2, "clients_per_round": 2, "rounds": 1,
                              "faults": {"nan_update": 1.0}})
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    (record,) = summary["rounds"]
    assert record["clients_rejected"] == 2 and not record["updated"]
    assert record["update_norm"] == 0.0
    assert "adapter kept" in capsys.readouterr().out


def test_a_hanging_data_owner_times_out_and_the_run_goes_on(tmp_path):
    cfg = configs.load(None, {**BASE, "rounds": 2, "round_timeout": 20,
                              "faults": {"hang": 0.34, "seed": 4}})
    faults = cfg.faults.model_dump()
    hangs = [[injected_fault(faults, rnd, who) == "hang" for who in range(3)] for rnd in (1, 2)]
    assert any(map(any, hangs)), "pick a seed where someone hangs"
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    for record, hung in zip(summary["rounds"], hangs):
        assert record["clients_failed"] >= sum(hung)
        assert record["clients_ok"] + record["clients_failed"] == 3
    assert summary["rounds"][0]["clients_failed"] == sum(hangs[0])


def test_client_side_dp_reports_the_privacy_spent(tmp_path):
    cfg = configs.load(None, {**BASE, "rounds": 2, "dp": {"clip_norm": 0.5,
                                                           "noise_multiplier": 1.0}})
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    first, second = summary["rounds"]
    assert 0 < first["dp"]["epsilon"] < second["dp"]["epsilon"]
    assert second["dp"]["max_participations"] == 2 and second["dp"]["delta"] == 1e-5
    assert all(r["update_norm"] > 0 and math.isfinite(r["plugin"]["ppl"]) for r in (first, second))


def test_a_worker_that_dies_hard_is_replaced_and_later_rounds_are_whole(tmp_path):
    cfg = configs.load(None, {**BASE, "rounds": 3, "faults": {"die": 0.2, "seed": 3}})
    faults = cfg.faults.model_dump()
    deaths = [sum(injected_fault(faults, rnd, who) == "die" for who in range(3))
              for rnd in (1, 2, 3)]
    assert deaths[0] >= 1, "pick a seed where a worker dies in round 1"
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    for record, died in zip(summary["rounds"], deaths):
        assert record["clients_failed"] == died
        assert record["clients_ok"] == 3 - died


def test_a_float16_checkpoint_federates_in_float16(tmp_path, monkeypatch):
    """Its bundle and adapters stay float16 end to end (half the bytes on the wire); the data
    owners train through float32 master weights, so rounds update the adapter and plug-in
    improves on the untrained model."""
    from transformers import AutoModelForCausalLM

    from fl_offsite.models.loading import resolve_model_path
    from fl_offsite.offsite.emulated import bundle_adapter

    source = Path(resolve_model_path("fl-offsite/tiny-opt"))
    checkpoint = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((source / name).read_bytes())
    monkeypatch.setattr(strategies.FedAvg, "flower_strategy_class", lambda self: RecordingFedAvg)
    monkeypatch.setattr(RecordingFedAvg, "calls", [])
    cfg = configs.load(None, {**BASE, "model": str(checkpoint),
                              "train": {"lr": 0.002, "max_steps": 4, "batch_size": 4}})
    run_dir = new_run_dir(cfg, tmp_path / "run")
    summary = simulate(cfg, run_dir)
    start = bundle_adapter(run_dir / "bundle").tensors
    assert {t.dtype for t in start.values()} == {torch.float16}
    for uploads, aggregate in RecordingFedAvg.calls:
        assert {t.dtype for tensors, _ in uploads for t in tensors.values()} == {torch.float16}
    last = Adapter.load(run_dir / "checkpoints" / f"round-{cfg.rounds:04d}.safetensors").tensors
    assert {t.dtype for t in last.values()} == {torch.float16}
    assert any(not torch.equal(last[k], start[k]) for k in start)
    assert all(r["updated"] for r in summary["rounds"])
    assert summary["rounds"][-1]["plugin"]["ppl"] < summary["zero_shot"]["ppl"]
