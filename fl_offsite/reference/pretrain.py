"""Pretrain a small OPT and its byte-level BPE tokenizer on any folder of text files.

``fl-offsite pretrain --data DIR --out MODEL_DIR`` is how the packaged reference model was
made (see its model card for the exact command), and how users make one from their own
corpus. Seeded, resumable (``--resume`` continues from ``MODEL_DIR.work/checkpoint.pt``, saved
atomically every ``--checkpoint-every`` steps), with a progress bar. The result is a plain
Hugging Face model directory (fp16 safetensors + tokenizer + README model card).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_dir


@dataclass
class PretrainConfig:
    layers: int = 12
    hidden: int = 128
    heads: int = 4
    ffn: int = 512
    vocab: int = 8192
    context: int = 128
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 200
    tokens: int = 4_000_000
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 200


def documents(data_dir: Path) -> list[tuple[str, str]]:
    """(file, document) pairs: every non-empty line of every .txt file, in a stable order."""
    files = sorted(data_dir.rglob("*.txt"))
    if not files:
        raise UserError(f"--data: no .txt files under {data_dir}")
    return [(str(f.relative_to(data_dir)), line) for f in files
            for line in f.read_text(errors="replace").splitlines() if line.strip()]


def _is_validation(doc: str) -> bool:
    return int(hashlib.sha256(doc.encode()).hexdigest()[:8], 16) % 100 == 0


def tokenize_corpus(data_dir: Path, work: Path, cfg: PretrainConfig):
    """Tokenizer + train/validation token arrays, cached in ``work`` for resuming."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok_dir = work / "tokenizer"
    docs = [d for _, d in documents(data_dir)]
    if not (tok_dir / "tokenizer.json").is_file():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator((d for d in docs if not _is_validation(d)),
                                vocab_size=cfg.vocab, min_frequency=2,
                                special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>",
                                            eos_token="</s>", pad_token="<pad>",
                                            unk_token="<unk>")
        tokenizer.save_pretrained(tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    if not (work / "train.npy").is_file():
        eos = tokenizer.eos_token_id
        train, val = [], []
        for start in range(0, len(docs), 10_000):
            chunk = docs[start:start + 10_000]
            for doc, ids in zip(chunk, tokenizer(chunk, add_special_tokens=False)["input_ids"]):
                (val if _is_validation(doc) else train).extend(ids + [eos])
        np.save(work / "val.npy", np.array(val, dtype=np.uint16))
        np.save(work / "train.npy", np.array(train, dtype=np.uint16))
    return tokenizer, np.load(work / "train.npy"), np.load(work / "val.npy")


def build_model(cfg: PretrainConfig, tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(cfg.seed)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden,
                       num_hidden_layers=cfg.layers, ffn_dim=cfg.ffn,
                       num_attention_heads=cfg.heads, max_position_embeddings=cfg.context,
                       word_embed_proj_dim=cfg.hidden, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       dropout=0.0, use_cache=False)
    return OPTForCausalLM(config)


@torch.no_grad()
def validation_loss(model, val: np.ndarray, context: int, max_blocks: int = 200) -> float:
    model.eval()
    n = min(len(val) // context, max_blocks)
    blocks = torch.from_numpy(val[: n * context].astype(np.int64)).view(n, context)
    total = 0.0
    for i in range(0, n, 16):
        batch = blocks[i:i + 16]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train()
    return total / n


def _checkpoint(ckpt: Path, cfg, model, opt, sched, gen, step: int, best: float,
                history: list) -> None:
    """Everything ``--resume`` needs, written atomically."""
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"config": asdict(cfg), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "step": step, "best": best,
                "history": history}, tmp)
    tmp.replace(ckpt)


def _restore(ckpt: Path, cfg, model, opt, sched, gen) -> tuple[int, float, list]:
    """Load a checkpoint made with the same settings; (step, best loss, history)."""
    state = torch.load(ckpt, weights_only=False)
    if state["config"] != asdict(cfg):
        raise UserError(f"--resume: {ckpt} was made with other settings {state['config']}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return state["step"], state["best"], state["history"]


def pretrain(data_dir: Path, out: Path, cfg: PretrainConfig, resume: bool = False,
             command: str = "", stop_at: int | None = None) -> dict | None:
    """Train to ``cfg.tokens`` and write ``out``; with ``stop_at``, checkpoint after that step
    and return None (continue later with ``resume=True``)."""
    from tqdm import tqdm

    work = out.parent / f"{out.name}.work"
    if work.exists() and not resume and (work / "checkpoint.pt").exists():
        raise UserError(f"--out: {work} holds an unfinished run; pass --resume to continue it "
                        "or remove it")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, train, val = tokenize_corpus(data_dir, work, cfg)
    model = build_model(cfg, tokenizer)
    steps = max(1, cfg.tokens // (cfg.batch * cfg.context))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) *
                                              0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, best, history = 0, float("inf"), []
    ckpt = work / "checkpoint.pt"
    if resume and ckpt.exists():
        step, best, history = _restore(ckpt, cfg, model, opt, sched, gen)
    model.train()
    bar = tqdm(total=steps, initial=step, desc="pretrain", unit="step", file=sys.stdout,
               mininterval=10)
    started = time.time()
    while step < steps:
        batch = _sample_batch(train, cfg, gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % cfg.eval_every == 0 or step == steps:
            val_loss = validation_loss(model, val, cfg.context)
            best = min(best, val_loss)
            history.append({"step": step, "tokens": step * cfg.batch * cfg.context,
                            "val_ppl": math.exp(val_loss),
                            "seconds": time.time() - started})
            bar.write(f"step {step}: validation perplexity {math.exp(val_loss):.1f}")
        if step % cfg.checkpoint_every == 0 or step == steps or step == stop_at:
            _checkpoint(ckpt, cfg, model, opt, sched, gen, step, best, history)
        if stop_at is not None and step >= stop_at and step < steps:
            bar.close()
            return None
    bar.close()
    val_ppl = math.exp(validation_loss(model, val, cfg.context, max_blocks=10**9))
    card = {"tokens_trained": steps * cfg.batch * cfg.context, "corpus_train_tokens": int(len(train)),
            "validation_tokens": int(len(val)), "validation_perplexity": val_ppl,
            "parameters": sum(p.numel() for p in model.parameters()), "config": asdict(cfg),
            "history": history, "command": command}
    _write_model(out, model, tokenizer, card)
    return card


def _sample_batch(train: np.ndarray, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """``cfg.batch`` random ``cfg.context``-token windows of the training tokens."""
    starts = torch.randint(len(train) - cfg.context - 1, (cfg.batch,), generator=gen)
    return torch.stack([torch.from_numpy(train[s:s + cfg.context].astype(np.int64))
                        for s in starts.tolist()])


def _write_model(out: Path, model, tokenizer, card: dict) -> None:
    """The finished model stored in float16 (half the package) but declared float32, the dtype
    it was trained and is run in (``load_model`` loads a checkpoint in its declared dtype), its
    tokenizer and card, written atomically."""
    with atomic_dir(out, overwrite=True) as tmp:
        model.half().save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2)
                                         + "\n")
        tokenizer.save_pretrained(tmp)
        (tmp / "pretraining.json").write_text(json.dumps(card, indent=2) + "\n")
