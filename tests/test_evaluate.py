"""The one evaluation path: perplexity, multiple choice (lm-eval's acc / acc_norm), image
classification, and the lm-eval-harness adapter, each checked against a direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import ViTImageProcessor

from fl_offsite.training import data
from fl_offsite.training.evaluate import evaluate
from fl_offsite.models.loading import load_model, load_processor

from conftest import tiny_model


@pytest.fixture(scope="module")
def opt():
    return load_model("fl-offsite/tiny-opt"), load_processor("fl-offsite/tiny-opt")


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


MC_ROWS = [
    {"context": "Return the number of items in a", "choices": [" list.", " banana split",
                                                               " the"], "label": 0},
    {"context": "The function raises a", "choices": [" ValueError if", " purple elephant"],
     "label": 0},
    {"context": "Open the", "choices": [" file and read it", " zzz"], "label": 1},
]


def test_multiple_choice_acc_and_acc_norm_as_lm_eval_defines_them(opt, tmp_path):
    model, tokenizer = opt
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    metrics = evaluate(model, data.prepare(str(path), "test", tokenizer), tokenizer)
    acc = acc_norm = 0
    for row in MC_ROWS:
        lls = [direct_loglikelihood(model, tokenizer, row["context"], c) for c in row["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == row["label"]
        normed = [ll / len(c) for ll, c in zip(lls, row["choices"])]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == row["label"]
    assert metrics["acc"] == pytest.approx(acc / 3) and metrics["acc_norm"] == pytest.approx(acc_norm / 3)


def test_perplexity_is_exp_of_the_token_mean_loss(opt, pydoc_data):
    model, tokenizer = opt
    task = data.prepare(pydoc_data, "test", tokenizer, block_size=32, max_examples=5)
    metrics = evaluate(model, task, tokenizer)
    with torch.no_grad():
        ids = torch.stack([it["input_ids"] for it in task.train_items])
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_image_classification_accuracy(tmp_path):
    model = tiny_model("vit")
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    g = torch.Generator().manual_seed(0)
    rows = [{"pixels": (torch.rand(8, 8, generator=g) * 16).tolist(), "label": i % 3}
            for i in range(9)]
    path = tmp_path / "digits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = data.prepare(str(path), "test", processor)
    assert task.kind == "image"
    metrics = evaluate(model, task, processor)
    labels = torch.tensor([r["label"] for r in rows])
    with torch.no_grad():
        pixels = torch.stack([it["pixel_values"] for it in task.train_items])
        logits = model(pixel_values=pixels).logits
    expected = float((logits.argmax(-1) == labels).float().mean())
    assert metrics["acc"] == pytest.approx(expected)
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)),
                                            rel=1e-5)


def test_lm_eval_adapter_scores_like_the_direct_computation(opt):
    from lm_eval.api.instance import Instance

    from fl_offsite.training.lm_eval import OffsiteLM

    model, tokenizer = opt
    lm = OffsiteLM(model, tokenizer, batch_size=2)
    requests = [Instance("loglikelihood", {}, (r["context"], c), i)
                for i, r in enumerate(MC_ROWS) for c in r["choices"]]
    got = lm.loglikelihood(requests)
    expected = [direct_loglikelihood(model, tokenizer, r.args[0], r.args[1]) for r in requests]
    assert [ll for ll, _ in got] == pytest.approx(expected, rel=1e-4)
    assert all(isinstance(greedy, bool) for _, greedy in got)
    text = "Return a new list of the items."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = [tokenizer.bos_token_id]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([start + ids])).logits[0].log_softmax(-1)
    assert rolling == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(ids)), rel=1e-4)
    (generated,) = lm.generate_until([Instance("generate_until", {},
                                               ("Return the", {"until": ["\n"],
                                                               "max_gen_toks": 5}), 0)])
    assert isinstance(generated, str) and "\n" not in generated
