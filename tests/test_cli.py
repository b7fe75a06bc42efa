"""The fl-offsite command line: the model-owner / data-owner round trip, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fl_offsite.cli import main
from fl_offsite.models.loading import resolve_model_path

DEMO_CONFIG = str(Path(__file__).parents[1] / "configs" / "demo.yaml")


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_round_trip_emulator_train_plug_evaluate(tmp_path, pydoc_data, capsys):
    bundle, adapter, plugged = tmp_path / "bundle", tmp_path / "a.safetensors", tmp_path / "m"
    assert run("emulator", "--model", "fl-offsite/tiny-opt", "--out", bundle,
               "--emulator-layers", "2") == 0
    assert "2-2-2" in capsys.readouterr().out
    assert run("train", "--bundle", bundle, "--data", pydoc_data, "--out", adapter,
               "--max-steps", "3", "--block-size", "32", "--lr", "2e-3") == 0
    printed = capsys.readouterr()
    stats = json.loads(printed.out.strip().splitlines()[-1])
    assert stats["steps"] == 3 and stats["train_loss"] > 0
    progress = [line for line in printed.err.splitlines() if line.startswith("train step")]
    assert [line.split(":")[0] for line in progress] == [f"train step {i}/3" for i in (1, 2, 3)]
    assert run("plug", "--model", "fl-offsite/tiny-opt", "--adapter", adapter, "--out",
               plugged) == 0
    model = AutoModelForCausalLM.from_pretrained(plugged)  # loads as is
    assert model.config.num_hidden_layers == 8
    capsys.readouterr()
    for source in (["--model", plugged], ["--bundle", bundle, "--adapter", adapter],
                   ["--model", "fl-offsite/tiny-opt", "--adapter", adapter]):
        out = tmp_path / "metrics.json"
        assert run("evaluate", *source, "--data", pydoc_data, "--block-size", "32",
                   "--max-examples", "10", "--out", out) == 0
        metrics = json.loads(out.read_text())
        assert metrics["task"] == "lm" and metrics["ppl"] > 1
    # the plugged directory and plug-in through --adapter give the same numbers
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed[0]["ppl"] == pytest.approx(printed[2]["ppl"], rel=1e-5)


def test_a_half_precision_checkpoint_stays_half_from_bundle_to_plugged_model(tmp_path,
                                                                             pydoc_data):
    """A float16 checkpoint gives a float16 bundle by default (read in parts, or computed in
    float32 and distilled, then cast), whose adapter trains and comes back in float16; the
    plugged model is written in float16 unless --dtype says otherwise."""
    from safetensors import safe_open

    def dtypes(path):
        with safe_open(str(path), "pt") as f:
            return {f.get_tensor(k).dtype for k in f.keys()}

    checkpoint = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(
        resolve_model_path("fl-offsite/tiny-opt"), dtype=torch.float16).save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((Path(resolve_model_path("fl-offsite/tiny-opt")) /
                                         name).read_bytes())
    bundle, distilled = tmp_path / "bundle", tmp_path / "distilled"
    adapter = tmp_path / "a.safetensors"
    assert run("emulator", "--model", checkpoint, "--out", bundle, "--emulator-layers", "2") == 0
    assert run("emulator", "--model", checkpoint, "--out", distilled, "--emulator-layers", "2",
               "--distill-data", pydoc_data, "--distill-steps", "2") == 0
    for path in (bundle, distilled):
        for part in ("adapter", "emulator", "shared"):
            assert dtypes(path / f"{part}.safetensors") == {torch.float16}
        # both measured in float16: a middle of 4 blocks, 2 of them shipped
        assert json.loads((path / "offsite.json").read_text())["emulator"][
            "share_of_middle"] == 0.5
    assert run("train", "--bundle", distilled, "--data", pydoc_data, "--out", adapter,
               "--max-steps", "2", "--block-size", "32") == 0
    assert dtypes(adapter) == {torch.float16}
    for flags, dtype in (([], torch.float16), (["--dtype", "float32"], torch.float32)):
        out = tmp_path / f"plugged-{dtype}"
        assert run("plug", "--model", checkpoint, "--adapter", adapter, "--out", out,
                   *flags) == 0
        assert dtypes(out / "model.safetensors") == {dtype}
        assert AutoModelForCausalLM.from_pretrained(out).config.dtype == dtype


def test_lora_adapter_is_small_and_plugs_in(tmp_path, pydoc_data):
    bundle, adapter = tmp_path / "bundle", tmp_path / "lora.safetensors"
    run("emulator", "--model", "fl-offsite/tiny-opt", "--out", bundle)
    assert run("train", "--bundle", bundle, "--data", pydoc_data, "--out", adapter,
               "--tuning", "lora", "--max-steps", "2", "--block-size", "32") == 0
    assert adapter.stat().st_size < 0.1 * (bundle / "adapter.safetensors").stat().st_size
    assert run("plug", "--model", "fl-offsite/tiny-opt", "--adapter", adapter, "--out",
               tmp_path / "m") == 0


def test_full_fine_tuning_baseline(tmp_path, pydoc_data):
    assert run("train", "--model", "fl-offsite/tiny-opt", "--tuning", "full", "--data",
               pydoc_data, "--out", tmp_path / "full", "--max-steps", "2",
               "--block-size", "32") == 0
    assert (tmp_path / "full" / "config.json").is_file()


def _bad_inputs(tmp_path, pydoc_data):
    bundle = tmp_path / "bundle"
    run("emulator", "--model", "fl-offsite/tiny-opt", "--out", bundle)
    no_test = tmp_path / "no-test"
    no_test.mkdir()
    for split in ("train", "validation"):
        (no_test / f"{split}.jsonl").write_text('{"text": "a line"}\n')
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "x"}\n')
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    bad = {"empty.jsonl": b"", "latin1.jsonl": b'{"text": "caf\xe9 au lait"}\n',
           "latin1.csv": b"text\ncaf\xe9\n", "broken.jsonl": b'{"text": "no end"\n',
           "label5.jsonl": b'{"context": "a", "choices": ["x", "y"], "label": 5}\n',
           "label-1.jsonl": b'{"context": "a", "choices": ["x", "y"], "label": -1}\n',
           "empty.csv": b"", "empty.txt": b"\n", "latin1.txt": b"ok\ncaf\xe9\n",
           "header-only.csv": b"text\n"}
    expected = {"empty.jsonl": "is empty", "latin1.jsonl": "line 1 is not UTF-8",
                "latin1.csv": "line 2 is not UTF-8", "broken.jsonl": "line 1 is not valid JSON",
                "label5.jsonl": "row 0: label 5", "label-1.jsonl": "row 0: label -1",
                "empty.csv": "is empty", "empty.txt": "is empty",
                "latin1.txt": "line 2 is not UTF-8", "header-only.csv": "has a header but no rows"}
    data_cases = []
    for name, content in bad.items():
        (tmp_path / "bad-data").mkdir(exist_ok=True)
        (tmp_path / "bad-data" / name).write_bytes(content)
        data_cases.append((["evaluate", "--model", "fl-offsite/tiny-opt", "--data",
                            tmp_path / "bad-data" / name, "--out", tmp_path / "never.json"],
                           expected[name]))
    return data_cases + [
        (["emulator", "--model", tmp_path / "missing-model", "--out", tmp_path / "o1"], "--model"),
        (["emulator", "--model", "fl-offsite/nope", "--out", tmp_path / "o2"], "no zoo model"),
        (["emulator", "--model", "fl-offsite/tiny-opt", "--out", tmp_path / "o3",
          "--emulator-layers", "9"], "emulator_layers"),
        (["emulator", "--model", "fl-offsite/tiny-opt", "--out", occupied], "pass --overwrite"),
        (["train", "--tuning", "full", "--model", "fl-offsite/tiny-opt", "--data", pydoc_data,
          "--out", occupied], "pass --overwrite"),
        (["plug", "--model", "fl-offsite/tiny-opt", "--adapter", bundle, "--out", occupied],
         "pass --overwrite"),
        (["train", "--bundle", tmp_path / "nope", "--data", pydoc_data, "--out",
          tmp_path / "o4.safetensors"], "--bundle"),
        (["train", "--bundle", bundle, "--data", tmp_path / "nodata", "--out",
          tmp_path / "o5.safetensors"], "--data"),
        (["evaluate", "--model", "fl-offsite/tiny-opt", "--data", no_test, "--out",
          tmp_path / "never.json"], "has no test file; expected test.jsonl (or .jsonl, .json, "
                                    ".csv, .parquet, .txt) in that directory; it has train, "
                                    "validation: choose one with --split"),
        (["train", "--bundle", bundle, "--data", wrong, "--out", tmp_path / "o6.safetensors"],
         "--data: columns"),
        (["train", "--tuning", "full", "--bundle", bundle, "--data", pydoc_data, "--out",
          tmp_path / "o7"], "--tuning full"),
        (["plug", "--model", "fl-offsite/tiny-opt", "--adapter", tmp_path / "none.safetensors",
          "--out", tmp_path / "o8"], "--adapter"),
        (["plug", "--model", "fl-offsite/tiny-opt", "--adapter", wrong, "--out",
          tmp_path / "o9"], "--adapter"),
        (["evaluate", "--data", pydoc_data], "exactly one of --model or --bundle"),
        (["simulate", "--config", tmp_path / "none.yaml"], "--config"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "rounds=abc"], "rounds"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "roundz=2"], "roundz: unknown key"),
        # one GPU more than this machine has (none here: refused as no GPU visible)
        (["simulate", "--config", DEMO_CONFIG, "--set",
          f"resources.num_gpus={torch.cuda.device_count() + 1}"], "resources.num_gpus"),
        (["simulate", "--config", DEMO_CONFIG, "--set",
          f"owner_device=cuda:{torch.cuda.device_count()}"], "owner_device: cuda:"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "owner_device=gpu"], "owner_device"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "clients_per_round=20"],
         "clients_per_round"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "strategy.name=fedfoo"], "strategy.name"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "split.emulator_layers=9"],
         "emulator_layers"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "data.path=/no/such/data"],
         "data.path: "),
        (["simulate", "--config", DEMO_CONFIG, "--set", "model=/no/such/model"],
         "model: /no/such/model does not exist"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "rounds=0"], "--set rounds: "),
        (["simulate", "--config", DEMO_CONFIG, "--set", "rounds"], "key=value"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "split.distill.data=/no/such/text",
          "--set", "split.distill.steps=5"], "split.distill.data"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "realign.every=1"], "realign.every"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "split.selection.name=similarity"],
         "distill.data is missing"),
        (["simulate", "--config", DEMO_CONFIG, "--set", "split.compression.name=int4"],
         "split.compression.name"),
        (["simulate", "--config", DEMO_CONFIG, "--out", occupied], "--out"),
    ], occupied


def test_bad_input_gets_one_clear_line_and_leaves_nothing(tmp_path, pydoc_data, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run directory created by mistake would show up here
    cases, occupied = _bad_inputs(tmp_path, pydoc_data)
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, expected in cases:
        assert run(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial outputs
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_console_script_exit_code_and_help():
    proc = subprocess.run(["fl-offsite", "emulator", "--model", "/no/such/model", "--out",
                           "/tmp/never-written"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --model")
    for command in ("emulator", "train", "plug", "evaluate", "simulate", "offsite", "report"):
        proc = subprocess.run(["fl-offsite", command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: fl-offsite" in proc.stdout


def test_a_bad_config_is_refused_before_torch_flower_or_datasets_load():
    """What makes a refusal take seconds is importing the heavy libraries: none is needed."""
    check = ("import sys; from fl_offsite.cli import main; "
             f"code = main(['simulate', '--config', {DEMO_CONFIG!r}, '--set', 'rounds=0']); "
             "print(code, sorted(m for m in ('torch', 'flwr', 'datasets', 'transformers', 'ray') "
             "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    assert "--set rounds" in proc.stderr


def test_datasets_saved_to_disk_are_read_as_they_are(tmp_path, pydoc_data):
    """A ``save_to_disk`` directory, as many users keep data: a DatasetDict gives its splits, a
    single Dataset serves every split (as a single file does)."""
    import datasets

    rows = [json.loads(line) for line in (Path(pydoc_data) / "train.jsonl").read_text()
            .splitlines()[:40]]
    saved_dict, saved_one = tmp_path / "dict", tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:30]),
                          "test": datasets.Dataset.from_list(rows[30:])}).save_to_disk(saved_dict)
    datasets.Dataset.from_list(rows).save_to_disk(saved_one)
    bundle = tmp_path / "bundle"
    assert run("emulator", "--model", "fl-offsite/tiny-opt", "--out", bundle) == 0
    for saved in (saved_dict, saved_one):
        adapter = tmp_path / f"{saved.name}.safetensors"
        assert run("train", "--bundle", bundle, "--data", saved, "--block-size", "32",
                   "--max-steps", "2", "--out", adapter) == 0
        out = tmp_path / f"{saved.name}.json"
        assert run("evaluate", "--bundle", bundle, "--adapter", adapter, "--data", saved,
                   "--block-size", "32", "--out", out) == 0
        assert json.loads(out.read_text())["ppl"] > 1
    assert run("evaluate", "--bundle", bundle, "--data", saved_dict, "--split", "validation",
               "--out", tmp_path / "never.json") == 2
    assert not (tmp_path / "never.json").exists()


def test_a_terminated_emulator_leaves_nothing_behind(tmp_path, pydoc_data):
    """SIGTERM mid-distillation: exit status 128 + 15, and no bundle, temporary directory or
    offload folder beside --out."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_offsite.cli", "emulator", "--model", "fl-offsite/tiny-opt",
         "--out", str(out / "bundle"), "--emulator-layers", "2", "--distill-data",
         str(pydoc_data), "--distill-steps", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:  # wait until it is distilling, its bundle not yet written
            if line.startswith("distill step"):
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert list(out.iterdir()) == []


def test_the_emulator_starts_from_a_recipe_and_the_flags_written_win(tmp_path):
    bundle = tmp_path / "b"
    # --distill-lr 1e-4 is the flag's own default: written, it still overrides the recipe's 2e-4
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--recipe", "pretrained-llm",
                 "--out", str(bundle), "--adapter-top", "1", "--keep-ratio", "0.5",
                 "--distill-steps", "1", "--distill-max-examples", "16",
                 "--distill-lr", "1e-4"]) == 0
    info = json.loads((bundle / "offsite.json").read_text())
    made = info["emulator"]
    # the recipe on 8 blocks: a 3-block bottom adapter, every middle block kept, channels
    assert info["plan"]["bottom"] == [0, 1, 2] and info["plan"]["top"] == [7]
    assert info["plan"]["emulator"] == [3, 4, 5, 6]
    assert made["quantize"] == "channels" and made["compression"]["keep_ratio"] == 0.5
    assert made["distill"]["data"] == "fl-offsite/public-text"
    assert (made["distill"]["steps"], made["distill"]["lr"], made["distill"]["nmse"],
            made["distill"]["batch_size"]) == (1, 1e-4, "per_token", 4)


def test_a_recipe_flag_is_not_abbreviated(capsys):
    with pytest.raises(SystemExit):
        main(["emulator", "--model", "fl-offsite/tiny-opt", "--recipe", "pretrained-llm",
              "--out", "x", "--distill-st", "1"])
    assert "unrecognized arguments: --distill-st" in capsys.readouterr().err
