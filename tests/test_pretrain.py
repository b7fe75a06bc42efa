"""Pretraining a small OPT on a folder of text: it runs, resumes exactly, refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fl_offsite.errors import UserError
from fl_offsite.reference.pretrain import PretrainConfig, pretrain

CFG = PretrainConfig(layers=2, hidden=16, heads=2, ffn=32, vocab=300, context=16, batch=4,
                     tokens=4 * 16 * 6, warmup=2, checkpoint_every=100, eval_every=3)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    lines = [f"line {i}: the quick brown fox number {i % 7} jumps over {i * 3} lazy dogs"
             for i in range(400)]
    (folder / "a.txt").write_text("\n".join(lines[:200]))
    (folder / "sub" / "b.txt").write_text("\n".join(lines[200:]))
    return folder


def test_pretrain_writes_a_loadable_model_with_a_card(corpus, tmp_path):
    card = pretrain(corpus, tmp_path / "m", CFG, command="fl-offsite pretrain ...")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.num_hidden_layers == 2 and len(tokenizer) <= 300
    assert card["tokens_trained"] == CFG.tokens and card["validation_perplexity"] > 1
    on_disk = json.loads((tmp_path / "m" / "pretraining.json").read_text())
    assert on_disk["command"] == "fl-offsite pretrain ..." and on_disk["history"]


def test_a_stopped_run_resumes_to_the_same_weights(corpus, tmp_path):
    pretrain(corpus, tmp_path / "straight", CFG)
    assert pretrain(corpus, tmp_path / "split", CFG, stop_at=2) is None
    assert not (tmp_path / "split").exists()
    with pytest.raises(UserError, match="--resume"):
        pretrain(corpus, tmp_path / "split", CFG)
    pretrain(corpus, tmp_path / "split", CFG, resume=True)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        pretrain(tmp_path / "empty", tmp_path / "m", CFG)
