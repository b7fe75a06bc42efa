"""Per-block ratios, shared by the in-layer methods (low rank, channel pruning): chosen by
gradient allocation within the budget and recorded with the cosines they were chosen by, or
given by the user per block; their settings are refused without their method, without public
text, or for blocks the emulator does not keep."""

from __future__ import annotations

import json

import pytest

from fl_offsite.cli import main
from fl_offsite.emulators.gradient_scores import allocate
from fl_offsite.fileio import load_tensors

METHODS = {  # flags, the budget, the ratio a block keeps its gradient at, a lossy one
    "lowrank": (["--compression", "lowrank", "--rank-ratio", "0.25"], 0.25, "0.0625", "0.375"),
    "channels": (["--compression", "channels", "--keep-ratio", "0.5"], 0.5, "0.125", "0.75"),
}


def test_allocation_gives_rank_where_the_gradient_is_sensitive():
    ratios = [0.125, 0.25, 0.5]
    costs = {i: {0.125: 10, 0.25: 20, 0.5: 40} for i in (2, 5)}
    scores = {2: {0.125: 0.99, 0.25: 0.995, 0.5: 0.999},  # barely changes: cheap is enough
              5: {0.125: 0.70, 0.25: 0.90, 0.5: 0.98}}  # the adapter's gradient needs rank
    assert allocate(scores, costs, budget=10 + 20) == {2: 0.125, 5: 0.25}
    assert allocate(scores, costs, budget=10 + 40) == {2: 0.125, 5: 0.5}  # uniform: 2 x 0.25
    assert allocate(scores, costs, budget=2 * 10) == {2: 0.125, 5: 0.125}
    assert set(allocate(scores, costs, budget=1000).values()) == {ratios[-1]}


def test_allocation_skips_rungs_that_lower_the_cosine():
    """SmolLM2-135M's blocks 8 and 9 under MLP channel pruning (the cosines measured for the
    recipe's 8-14-8 split): block 8 agrees worse at a fifth of its channels than at a tenth,
    and far better at two fifths."""
    costs = {i: {0.1: 1, 0.2: 2, 0.4: 4} for i in (8, 9)}
    scores = {8: {0.1: 0.3911, 0.2: 0.2049, 0.4: 0.8015},
              9: {0.1: 0.9567, 0.2: 0.9868, 0.4: 0.9909}}
    assert allocate(scores, costs, budget=5) == {8: 0.4, 9: 0.1}
    assert allocate(scores, costs, budget=3) == {8: 0.1, 9: 0.2}  # no room for the jump
    assert allocate({8: scores[8]}, {8: costs[8]}, budget=2) == {8: 0.1}  # a worse rung: not taken


@pytest.mark.parametrize("method", METHODS)
def test_gradient_allocation_from_the_cli_records_its_scores(method, tmp_path, capsys):
    flags, budget, lossy, milder = METHODS[method]
    out = tmp_path / "bundle"
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(out),
                 "--emulator-layers", "4", *flags, "--allocation", "gradient",
                 "--distill-data", "fl-offsite/pydoc"]) == 0
    assert f"uniform + {method}" in capsys.readouterr().out
    made = json.loads((out / "offsite.json").read_text())["emulator"]["compression"]
    assert set(made["ratios"]) == {"2", "3", "4", "5"}
    if method == "channels":  # the budget is a share of channels, the same in every block
        assert sum(made["ratios"].values()) / 4 <= budget + 1e-9
        assert made["importance"] == "activations"
    for scores in made["gradient_cosine"].values():
        assert scores["1.0"] == pytest.approx(1.0)  # an unchanged block: the same gradient
        assert scores[lossy] < scores[milder] <= 1.0 + 1e-9
    assert main(["evaluate", "--bundle", str(out), "--data", "fl-offsite/pydoc",
                 "--block-size", "32", "--max-examples", "8", "--out",
                 str(tmp_path / "metrics.json")]) == 0


GIVEN = {  # flags, the tensor whose first dimension is a block's ratio, that dimension at 1.0
    "lowrank": (["--compression", "lowrank", "--rank-ratio", "0.25"], "fc1.lowrank_b", 64),
    "channels": (["--compression", "channels", "--keep-ratio", "0.25", "--importance",
                  "weights"], "fc1.weight", 256),
}


@pytest.mark.parametrize("method", GIVEN)
def test_given_block_ratios_set_those_blocks_and_the_rest_keep_the_methods(method, tmp_path):
    flags, tensor, full = GIVEN[method]
    out = tmp_path / "bundle"
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(out),
                 "--emulator-layers", "4", *flags, "--block-ratios", "2=0.75,5=0.125"]) == 0
    shipped = load_tensors(out / "emulator.safetensors")
    rows = {i: shipped[f"{i}.{tensor}"].shape[0] for i in (2, 3, 4, 5)}
    assert rows == {2: full * 3 // 4, 3: full // 4, 4: full // 4, 5: full // 8}
    made = json.loads((out / "offsite.json").read_text())["emulator"]["compression"]
    assert made["ratios"] == {"2": 0.75, "5": 0.125}
    assert main(["evaluate", "--bundle", str(out), "--data", "fl-offsite/pydoc",
                 "--block-size", "32", "--max-examples", "8", "--out",
                 str(tmp_path / "metrics.json")]) == 0


@pytest.mark.parametrize("flags, refused", [
    (["--block-ratios", "1=0.5"], "block_ratios: block(s) [1] are not emulator blocks; "
                                  "the emulator keeps [2, 3, 4, 5]"),
    (["--block-ratios", "2=1.5"], "block 2's ratio 1.5 is outside (0, 1]"),
    (["--block-ratios", "2=0.5", "--allocation", "gradient", "--distill-data",
      "fl-offsite/pydoc"], "drop block_ratios or use allocation uniform"),
])
def test_block_ratios_outside_the_emulator_or_the_range_are_refused(flags, refused, tmp_path,
                                                                     capsys):
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(tmp_path / "b"),
                 "--emulator-layers", "4", "--compression", "lowrank", *flags]) == 2
    assert refused in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("flags, needs", [
    (["--keep-ratio", "0.3"], "--keep-ratio: needs --compression channels"),
    (["--allocation", "gradient"], "--compression lowrank or --compression channels"),
    (["--compression", "int8", "--rank-ratio", "0.5"], "--rank-ratio: needs --compression lowrank"),
    (["--compression", "channels"], "distill.data is missing"),  # activations need text
    (["--compression", "lowrank", "--allocation", "gradient"], "distill.data is missing"),
    (["--compression", "int8", "--distill-steps", "5", "--distill-data", "fl-offsite/pydoc",
      "--distill-after-compression"], "distill.after_compression: needs distillation steps"),
])
def test_in_layer_settings_without_their_method_are_refused(flags, needs, tmp_path, capsys):
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(tmp_path / "b"),
                 *flags]) == 2
    assert needs in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
