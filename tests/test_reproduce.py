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
