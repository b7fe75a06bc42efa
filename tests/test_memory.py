"""The memory check: a data owner that would not fit refuses cleanly; so does a simulation."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from fl_offsite import config as configs
from fl_offsite.offsite.bundle import write_bundle
from fl_offsite.cli import main
from fl_offsite.federation import memory
from fl_offsite.models.loading import load_model, load_processor
from fl_offsite.offsite.plan import make_plan

DEMO_CONFIG = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
BASE = {"model": "fl-offsite/tiny-opt", "split": {"emulator_layers": 2},
        "data": {"path": "fl-offsite/pydoc", "block_size": 32},
        "train": {"batch_size": 4}}
FIXES = ("train.batch_size", "data.block_size", "resources.num_cpus", "split.compression.name=int8")


@pytest.fixture(autouse=True)
def no_limit(monkeypatch):
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    monkeypatch.delenv(memory.PARALLEL_ENV, raising=False)


def fake_available(monkeypatch, megabytes: float) -> None:
    import psutil

    memory_info = namedtuple("svmem", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory_info(int(megabytes * memory.MB)))


def test_the_estimate_before_the_bundle_exists_matches_the_bundles(tmp_path):
    model = load_model("fl-offsite/tiny-opt")
    write_bundle(model, make_plan(8, 2, 2, 2), tmp_path / "b", "fl-offsite/tiny-opt",
                 load_processor("fl-offsite/tiny-opt"))
    cfg = configs.load(None, BASE)
    task = {"train": {"batch_size": 4}, "block_size": 32, "dp": None}
    before, after = memory.config_estimate(cfg), memory.bundle_estimate(tmp_path / "b", task)
    assert before.weights == pytest.approx(after.weights, rel=0.1)
    assert before.training == pytest.approx(after.training, rel=0.01)
    bigger = [memory.bundle_estimate(tmp_path / "b", {**task, **change}).training for change in
              ({"train": {"batch_size": 8}}, {"block_size": 64}, {"dp": {"mode": "dpsgd"}})]
    assert all(b > after.training for b in bigger)
    assert memory.bundle_estimate(tmp_path / "b").training == 0  # bundle only


def test_a_data_owner_over_its_budget_is_refused_with_the_fix(monkeypatch):
    estimate = memory.Estimate(weights=300 * memory.MB, training=500 * memory.MB,
                               batch_size=8, tokens=128)
    with pytest.raises(memory.MemoryBudgetError) as error:
        memory.check_data_owner(estimate, {"memory-limit-mb": 700}, who="data owner 3")
    message = str(error.value)
    assert message.startswith("memory: data owner 3 needs about 800 MB") and "\n" not in message
    assert "700 MB (memory-limit-mb)" in message and all(fix in message for fix in FIXES)
    memory.check_data_owner(estimate, {"memory-limit-mb": 900})
    fake_available(monkeypatch, 2000)
    memory.check_data_owner(estimate, {})  # 2000 MB free, one data owner at a time
    monkeypatch.setenv(memory.PARALLEL_ENV, "4")
    with pytest.raises(memory.MemoryBudgetError, match="2000 MB available / 4 data owners"):
        memory.check_data_owner(estimate, {})
    memory.check_data_owner(estimate, {}, resident=300 * memory.MB)  # bundle already loaded


@pytest.mark.parametrize("setting, expected", [
    ("limit", "over the 1 MB of $FL_OFFSITE_MEMORY_LIMIT_MB"),
    ("available", "2 data owners at once need about"),
])
def test_a_simulation_that_does_not_fit_is_refused_in_one_line(tmp_path, capsys, monkeypatch,
                                                              setting, expected):
    if setting == "limit":
        monkeypatch.setenv(memory.LIMIT_ENV, "1")
    else:
        fake_available(monkeypatch, 600)  # two 0.5 GB worker processes alone exceed it
        monkeypatch.setattr("os.cpu_count", lambda: 2)
    out = tmp_path / "run"
    assert main(["simulate", "--config", DEMO_CONFIG, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: memory: ") and "\n" not in err and expected in err, err
    assert all(fix in err for fix in FIXES)
    assert not out.exists()


@pytest.mark.slow
def test_a_data_owner_short_of_memory_fails_cleanly_and_the_run_goes_on(tmp_path, monkeypatch):
    from fl_offsite.federation.runtime import new_run_dir
    from fl_offsite.federation.simulation import simulate

    monkeypatch.setenv(memory.LIMIT_ENV, "30")  # the bundle (3 MB) fits, training does not
    cfg = configs.load(None, {**BASE, "num_clients": 2, "clients_per_round": 2, "rounds": 2,
                              "data": {**BASE["data"], "max_eval_examples": 10},
                              "train": {"max_steps": 1, "batch_size": 4}})
    summary = simulate(cfg, new_run_dir(cfg, tmp_path / "run"))
    first, second = summary["rounds"]
    assert first["bundles_sent"] == 2 and second["bundles_sent"] == 0  # loaded, kept
    for record in (first, second):
        assert record["clients_failed"] == 2 and record["clients_ok"] == 0
        assert not record["updated"]
        assert sorted(f["node"] for f in record["failures"]) == ["0", "1"]
        for failure in record["failures"]:  # the data owner's own error, not a dead worker
            assert failure["reason"].startswith("memory: data owner ")
            assert "but has 30 MB ($FL_OFFSITE_MEMORY_LIMIT_MB)" in failure["reason"]
            assert all(fix in failure["reason"] for fix in FIXES)
