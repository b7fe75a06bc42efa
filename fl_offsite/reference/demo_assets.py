"""Rebuild the embedded demo assets: the ``fl-offsite/tiny-opt`` model and the ``pydoc`` task.

Run ``python -m fl_offsite.reference.demo_assets`` (about three minutes on two CPU cores). The outputs
are committed as package data, so nobody needs to run this to use the demo; it exists so the
assets are reproducible and so users can see how a model is made offline.

Text: docstrings of the Python standard library (PSF licence) of the interpreter running the
script. Modules are split by a stable hash: most form the pretraining corpus, the rest are
held out and become the demo's language-modelling task (train / validation / test by module,
so no docstring appears in two splits or in the pretraining text).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from ..fileio import atomic_dir

PACKAGE = Path(__file__).parents[1]
MODEL_DIR = PACKAGE / "zoo" / "tiny-opt"
TASK_DIR = PACKAGE / "datasets" / "pydoc"


def _bucket(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10


def stdlib_docstrings() -> dict[str, list[str]]:
    """{module: [docstrings of the module, its classes, functions and methods]}."""
    warnings.simplefilter("ignore")
    out: dict[str, list[str]] = {}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"this", "antigravity", "idlelib", "tkinter", "turtle"}:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific or optional modules
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, obj in inspect.getmembers(module):
            if getattr(obj, "__module__", None) != name:
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                docs += [inspect.getdoc(m) or "" for _, m in vars(obj).items()
                         if inspect.isfunction(m)]
        docs = [d.strip() for d in docs if d and len(d.strip()) > 40]
        if docs:
            out[name] = sorted(set(docs))
    return out


def write_task(modules: dict[str, list[str]]) -> None:
    """Held-out modules (bucket 0) -> jsonl splits, 8:1:1 by docstring hash."""
    splits = {"train": [], "validation": [], "test": []}
    for name, docs in modules.items():
        if _bucket(name) != 0:
            continue
        for doc in docs:
            sub = int(hashlib.sha256(doc.encode()).hexdigest(), 16) % 10
            split = "test" if sub == 0 else "validation" if sub == 1 else "train"
            splits[split].append({"text": doc, "module": name})
    with atomic_dir(TASK_DIR, overwrite=True) as tmp:
        for split, rows in splits.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "README.md").write_text(
            "# pydoc: held-out Python standard-library docstrings\n\n"
            "Language-modelling task of the fl-offsite demo (column `text`). Source: docstrings "
            f"of Python {sys.version.split()[0]}'s standard library (PSF licence), modules whose "
            "hash bucket is 0 (never seen in the tiny-opt pretraining text), split by docstring "
            "hash: "
            + ", ".join(f"{k} {len(v)} docstrings" for k, v in splits.items())
            + ".\nRebuild: `python -m fl_offsite.reference.demo_assets`.\n")


def pretrain(texts: list[str], seconds: float, seed: int = 0) -> None:
    """Train a byte-level BPE tokenizer and a small OPT on ``texts`` for ``seconds``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=2048, min_frequency=2,
                            special_tokens=["<pad>", "</s>", "<unk>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=8,
                       ffn_dim=256, num_attention_heads=4, max_position_embeddings=256,
                       word_embed_proj_dim=64, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       dropout=0.0, use_cache=False)
    model = OPTForCausalLM(config)
    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    block = 128
    data = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    val, train = data[:64], data[64:]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    start, step, tokens = time.time(), 0, 0
    model.train()
    while time.time() - start < seconds:
        batch = train[torch.randint(len(train), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        step += 1
        tokens += batch.numel()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        val_loss = model(input_ids=val, labels=val).loss.item()
    with atomic_dir(MODEL_DIR, overwrite=True) as tmp:
        model.half().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            "# fl-offsite/tiny-opt\n\nA tiny OPT (8 blocks, hidden 64, 2k byte-level BPE "
            "vocabulary) for the demo and the tests; not a useful language model.\n\n"
            f"- command: `python -m fl_offsite.reference.demo_assets --seconds {seconds:g}`\n"
            f"- data: docstrings of Python {sys.version.split()[0]}'s standard library "
            "(PSF licence), modules outside the held-out `pydoc` task\n"
            f"- trained on {tokens:,} tokens ({step} steps of 16 x {block}), seed {seed}\n"
            f"- validation perplexity {math.exp(val_loss):.1f}\n")
    print(f"tiny-opt: {tokens:,} tokens, validation perplexity {math.exp(val_loss):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="pretraining time budget")
    parser.add_argument("--task-only", action="store_true", help="rebuild only the task files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modules = stdlib_docstrings()
    write_task(modules)
    if not args.task_only:
        pretrain([d for name, docs in modules.items() if _bucket(name) != 0 for d in docs],
                 args.seconds)


if __name__ == "__main__":
    main()
