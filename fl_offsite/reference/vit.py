"""The reference ViT (``fl-offsite/ref-vit``): its config, pretraining on freshly rendered
printed digits, and its model card."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..fileio import atomic_dir
from .digits import (HELD_OUT_SEED, SIDE, make_processor, pixel_values,
                     processor_pixel_values, render)

# ---- the model --------------------------------------------------------------------------------

@dataclass
class VitConfig:
    layers: int = 12
    hidden: int = 64
    heads: int = 4
    ffn: int = 256
    patch: int = 8  # 16 patches of 2 x 2 original pixels (+ CLS): a few minutes on one thread
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 250
    held_out: int = 1000


def build_model(cfg: VitConfig):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(cfg.seed)
    config = ViTConfig(image_size=SIDE, patch_size=cfg.patch, num_channels=3,
                       hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       num_labels=10, id2label={i: str(i) for i in range(10)},
                       label2id={str(i): i for i in range(10)})
    return ViTForImageClassification(config)


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    correct = sum(int((model(pixel_values=inputs[i:i + batch]).logits.argmax(-1) ==
                       labels[i:i + batch]).sum()) for i in range(0, len(inputs), batch))
    model.train()
    return correct / len(inputs)


def digits_accuracy(model, processor, split: str = "test") -> float | None:
    """Accuracy on the packaged ``fl-offsite/digits`` split (None if it is not built)."""
    from ..training import data
    from ..training.evaluate import classification_metrics

    if not (data.PACKAGED_DIR / "digits").is_dir():
        return None
    task = data.prepare("fl-offsite/digits", split, processor)
    return classification_metrics(model.eval(), task.train_items)["acc"]


CARD = """# fl-offsite/ref-vit: the offline reference vision model

A 12-block ViT for image classification (hidden {hidden}, {heads} heads, FFN {ffn}, 32 x 32
inputs in {patch} x {patch} patches, 10 labels "0".."9"; {parameters:,} parameters, fp32)
pretrained on this machine with no network on *printed* digits rendered on the fly, so the
offsite-tuning comparison has a vision side: its classifier head already has the downstream
label space (the head is frozen for data owners), and the handwritten `fl-offsite/digits` task
is a domain shift from what it saw. Deep enough for the paper's 2-k-2 splits. Patches are
8 x 8 of the 32 x 32 input, i.e. 2 x 2 pixels of the 8 x 8 digit (16 tokens + CLS): 4 x 4
patches (65 tokens) made a training step about 3.5 times slower on one CPU thread.

## How it was made

```bash
python -m fl_offsite.reference.vision data --out fl_offsite/datasets   # first: the zero-shot check
{command}
```

- data: digits 0-9 drawn with Pillow's built-in fonts (FreeType default font Aileron 3 in 4,
  5 x 7 bitmap font 1 in 4), random shear, rotation (+-15 degrees), height 26-32 px, stretch,
  stroke width and speckle on a 32 x 32 bitmap, counted into 8 x 8 blocks (0..16) exactly like
  the UCI optical digits; a fresh batch every step (`fl_offsite/reference/vision.py`, `render_digit`)
- {steps} steps of {batch} images ({images:,} images), AdamW lr {lr} ({warmup} warm-up steps,
  cosine decay), weight decay {weight_decay}, seed {seed}; {minutes:.1f} minutes on one thread
  (2 shared CPU cores); seeded and deterministic on one thread
- the image processor (`preprocessor_config.json`) upscales 8 x 8 to 32 x 32 by nearest
  neighbour and scales to [-1, 1]; training fed the identical tensors (checked at start)
- accuracy on {held_out:,} held-out rendered digits (another seed): **{synthetic_acc:.3f}**
- zero-shot accuracy on `fl-offsite/digits` test (handwritten, never seen): **{zero_shot:.3f}**
  (chance 0.1)
- `pretraining.json` holds the settings and the accuracy curve
"""


def pretrain(out: Path, cfg: VitConfig, command: str = "") -> dict:
    """Train ``cfg.steps`` steps on freshly rendered digits and write the model to ``out``."""
    from tqdm import tqdm

    processor = make_processor()
    check, _ = render(32, HELD_OUT_SEED + 1)
    if not torch.equal(pixel_values(check), processor_pixel_values(check, processor)):
        raise RuntimeError("vision.pixel_values no longer matches data.image_items + the "
                           "processor; fix it before pretraining")
    held_images, held_labels = render(cfg.held_out, HELD_OUT_SEED)
    held = pixel_values(held_images), torch.as_tensor(held_labels)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) *
                                              0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    history = []
    started = time.time()
    model.train()
    bar = tqdm(range(1, cfg.steps + 1), desc="pretrain ref-vit", unit="step", file=sys.stdout,
               mininterval=10)
    for step in bar:
        images, labels = render(cfg.batch, cfg.seed * 1_000_000 + step)
        loss = model(pixel_values=pixel_values(images), labels=torch.as_tensor(labels)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = accuracy(model, *held)
            history.append({"step": step, "loss": loss.item(), "held_out_acc": acc,
                            "seconds": round(time.time() - started, 1)})
            bar.write(f"step {step}: held-out rendered accuracy {acc:.3f}")
    bar.close()
    seconds = time.time() - started
    model.eval()
    card = {"parameters": sum(p.numel() for p in model.parameters()), "config": asdict(cfg),
            "images": cfg.steps * cfg.batch, "seconds": round(seconds, 1),
            "held_out_rendered_acc": history[-1]["held_out_acc"],
            "digits_test_zero_shot_acc": digits_accuracy(model, processor),
            "history": history, "command": command}
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "pretraining.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(card))
    return card


def model_card(card: dict) -> str:
    """The README of a pretrained model, from its ``pretraining.json``."""
    zero_shot = card["digits_test_zero_shot_acc"]
    return CARD.format(**card["config"], parameters=card["parameters"], command=card["command"],
                       images=card["images"], minutes=card["seconds"] / 60,
                       synthetic_acc=card["held_out_rendered_acc"],
                       zero_shot=float("nan") if zero_shot is None else zero_shot)

