"""Checkpoints and exact resume: a run killed with SIGKILL mid-round and resumed ends with the
same adapter as an uninterrupted run; foreign or corrupted checkpoints are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_offsite.cli import main

pytestmark = pytest.mark.slow
DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
SETTINGS = ["--set", "rounds=3", "--set", "num_clients=4", "--set", "clients_per_round=2",
            "--set", "data.max_eval_examples=20", "--set", "train.max_steps=2",
            "--set", "strategy.name=fedadam"]  # server-optimizer moments must survive too


def _remove_dangling_ray_links(run_dir: Path) -> None:
    """A killed run cannot remove the short link it gave Ray; do it for the test."""
    for link in Path(tempfile.gettempdir()).glob("flo-*/r"):
        if link.is_symlink() and os.readlink(link) == str((run_dir / "ray").resolve()):
            link.unlink()
            link.parent.rmdir()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    straight, killed = base / "straight", base / "killed"
    assert main(["simulate", "--config", DEMO, *SETTINGS, "--out", str(straight)]) == 0

    proc = subprocess.Popen(["fl-offsite", "simulate", "--config", DEMO, *SETTINGS, "--out",
                             str(killed)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before round 1"
        time.sleep(0.2)
    time.sleep(0.5)  # into round 2
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its Ray processes, mid-round
    proc.wait()
    _remove_dangling_ray_links(killed)
    rounds_at_kill = len(json.loads((killed / "summary.json").read_text())["rounds"])
    assert rounds_at_kill < 3
    assert main(["simulate", "--resume", str(killed)]) == 0
    return straight, killed, rounds_at_kill


def test_resumed_run_ends_with_the_identical_adapter(killed_and_resumed):
    straight, killed, _ = killed_and_resumed
    a = load_file(straight / "adapter.safetensors")
    b = load_file(killed / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_summary_has_every_round_once(killed_and_resumed):
    straight, killed, _ = killed_and_resumed
    s1 = json.loads((straight / "summary.json").read_text())
    s2 = json.loads((killed / "summary.json").read_text())
    assert [r["round"] for r in s2["rounds"]] == [1, 2, 3]
    for r1, r2 in zip(s1["rounds"], s2["rounds"]):  # (reductions may use other thread counts)
        assert r1["plugin"] == pytest.approx(r2["plugin"], rel=1e-9)
        assert r1["update_norm"] == pytest.approx(r2["update_norm"], rel=1e-9)
        assert r1["participants"] == r2["participants"]
        # the data owners keep the bundle across the restart: nothing is sent twice
        for key in ("bundles_sent", "bytes_down", "bytes_up", "bytes_down_total"):
            assert r1[key] == r2[key], (key, r1["round"])


def test_foreign_or_corrupted_checkpoints_are_refused_and_nothing_changes(killed_and_resumed,
                                                                          capsys):
    _, run_dir, _ = killed_and_resumed
    before = {p: p.read_bytes() for p in (run_dir / "config.yaml",
                                          run_dir / "checkpoint.safetensors")}
    assert main(["simulate", "--resume", str(run_dir), "--set", "seed=7"]) == 2
    assert "belongs to another run" in capsys.readouterr().err
    ckpt = run_dir / "checkpoint.safetensors"
    ckpt.write_bytes(before[ckpt][: len(before[ckpt]) // 2])
    assert main(["simulate", "--resume", str(run_dir), "--set", "rounds=4"]) == 2
    assert "corrupted" in capsys.readouterr().err
    ckpt.write_bytes(before[ckpt])
    assert all(p.read_bytes() == data for p, data in before.items())
    assert main(["simulate", "--resume", str(run_dir.parent / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
