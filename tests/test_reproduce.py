"""`fl-offsite reproduce --quick`: every setting of the paper's comparison, on every task
(the text tasks on the reference OPT, the image task on the reference ViT)."""

from __future__ import annotations

import json

import pytest

from fl_offsite.cli import main
from fl_offsite.reference.reproduce import SETTINGS

pytestmark = pytest.mark.slow


def test_quick_reproduction_writes_the_table_and_results(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"devil", "wordnet-define", "digits"}
    for task, settings in results["tasks"].items():
        assert set(settings) == set(SETTINGS)
        metric = results["main_metric"][task]
        assert all(metric in settings[s] for s in SETTINGS)
    devil = results["tasks"]["devil"]
    assert devil["plugin"]["ppl"] < devil["zero_shot"]["ppl"]
    assert devil["full_ft"]["ppl"] < devil["zero_shot"]["ppl"]
    digits = results["tasks"]["digits"]  # on its own model, fl-offsite/ref-vit
    assert results["main_metric"]["digits"] == "acc" and digits["zero_shot"]["acc"] > 0.2
    assert {p.name for p in out.iterdir() if p.name.startswith("bundle-")} == {
        "bundle-ref-opt", "bundle-ref-opt-distilled", "bundle-ref-vit", "bundle-ref-vit-distilled"}
    table = (out / "results.md").read_text()
    assert "| plugin |" in table and "federated_dirichlet" in table
    assert "| setting |" in capsys.readouterr().out

    # an interrupted reproduction resumes: done tasks and seeds are kept, missing ones rerun
    kept = (out / "seeds" / "devil-seed0.json").stat().st_mtime_ns
    (out / "seeds" / "digits-seed0.json").unlink()
    assert main(["reproduce", "--quick", "--resume", str(out)]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert (out / "seeds" / "devil-seed0.json").stat().st_mtime_ns == kept
    assert resumed["tasks"]["devil"] == results["tasks"]["devil"]
    assert resumed["tasks"]["digits"]["zero_shot"] == digits["zero_shot"]
    assert set(resumed["tasks"]["digits"]) == set(SETTINGS)
    capsys.readouterr()
    assert main(["reproduce", "--resume", str(out)]) == 2  # not the --quick plan it started with
    assert "--resume:" in capsys.readouterr().err and (out / "results.json").is_file()


def test_the_full_fine_tuning_baseline_takes_its_best_lr_on_validation():
    """Of a negligible lr, one too large for validation (though not for test) and a working
    one, the baseline reports the one best on the validation split, with its test metrics."""
    from fl_offsite.models.loading import load_model, load_processor
    from fl_offsite.reference.reproduce import Plan, full_finetune
    from fl_offsite.training import data
    from fl_offsite.training.evaluate import evaluate

    plan = Plan(model="fl-offsite/tiny-opt", full_ft_lrs=[1e-9, 3e-3, 3e-4], epochs=1, max_train=64,
                max_eval=20, block_size=32)
    task = "fl-offsite/pydoc"
    processor = load_processor(plan.model)
    train_data = data.prepare(task, "train", processor, plan.block_size, plan.max_train)
    test_data = data.prepare(task, "test", processor, plan.block_size, plan.max_eval)
    baseline = full_finetune(plan, task, train_data, test_data, processor, seed=0)
    assert baseline["lr"] == 3e-4
    assert baseline["ppl"] < 0.9 * evaluate(load_model(plan.model), test_data, processor)["ppl"]
    plan.full_ft_lrs = None  # one lr: the plan's own, no validation pass
    assert full_finetune(plan, task, train_data, test_data, processor, seed=0)["lr"] == plan.lr
