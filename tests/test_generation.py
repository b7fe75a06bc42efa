"""Generation with the KV cache from emulated models: the same tokens as without it."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from fl_offsite.emulators.channels import ChannelPruning
from fl_offsite.emulators.int8 import Int8Compression
from fl_offsite.emulators.lowrank import LowRankCompression
from fl_offsite.emulators.similarity import similarity_plan
from fl_offsite.models.generation import generate, shares_blocks
from fl_offsite.offsite.bundle import load_bundle, write_bundle
from fl_offsite.offsite.plan import make_plan

COMPRESSIONS = {"drop": None, "int8": Int8Compression(), "lowrank": LowRankCompression(),
                "channels": ChannelPruning(importance="weights")}


def greedy(model, ids, cached: bool) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          min_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=cached)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "vit"])
def test_emulated_models_generate_the_same_tokens_with_the_cache(family, tmp_path):
    model = tiny_model(family)
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    for name, compression in COMPRESSIONS.items():
        write_bundle(model, make_plan(8, 2, 2, 2), tmp_path / name, "tiny",
                     compression=compression)
        emulated, _ = load_bundle(tmp_path / name)
        assert not shares_blocks(emulated)
        assert torch.equal(greedy(emulated, ids, cached=True), greedy(emulated, ids, False)), name
        got = generate(emulated, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                       pad_token_id=0)
        assert torch.equal(got, greedy(emulated, ids, cached=False)), name


@pytest.mark.parametrize("family", ["llama", "gemma2", "falcon"])
def test_a_bundle_whose_blocks_repeat_generates_without_the_cache(family, tmp_path):
    """One module at two depths would write both depths' keys into one cache slot (on these
    families the cached tokens differ or the shapes clash)."""
    model = tiny_model(family)
    plan = similarity_plan([0.3, 0.1, 0.2, 0.05], 8, 2, 2, emulator_layers=2, repeat=True)
    write_bundle(model, plan, tmp_path / "b", "tiny")
    emulated, _ = load_bundle(tmp_path / "b")
    ids = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    assert shares_blocks(emulated)
    got = generate(emulated, ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                   pad_token_id=0)
    assert torch.equal(got, greedy(emulated, ids, cached=False))
