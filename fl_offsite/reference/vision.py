"""The vision side of the reference set: a ViT pretrained offline on rendered digits, and a
handwritten-digits task it has never seen.

``python -m fl_offsite.reference.vision data --out fl_offsite/datasets`` writes

- ``digits``: scikit-learn's bundled copy of the UCI optical handwritten digits (8 x 8, values
  0..16), train / validation / test by a hash of the item's index (about 70 / 10 / 20), rows
  ``pixels`` (8 x 8 nested list of ints), ``label`` and ``group`` (= label, for Dirichlet
  partitioning);
- ``rendered-digits``: the model owner's public data (for distilling its emulator): printed
  digits rendered as below with a seed the pretraining never uses.

``python -m fl_offsite.reference.vision pretrain --out fl_offsite/zoo/ref-vit --threads 1`` pretrains
``fl-offsite/ref-vit`` on freshly rendered printed digits: digits 0-9 drawn with Pillow's
built-in fonts (its FreeType default font and its bitmap font), randomly rotated, sheared,
stretched, thickened and speckled, scaled to fill a 32 x 32 bitmap as NIST's preprocessing does
for the handwritten ones, and area-downsampled to 8 x 8 counts 0..16, the task's format. The
handwritten task is a domain shift from that (printed -> handwritten). Seeded and
deterministic on one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_dir

SIDE = 32  # the bitmap the digits are drawn on (as in the UCI data); 8 x 8 after 4 x 4 counts
PUBLIC_SEED = 1_000_003  # rendered-digits; pretraining draws from seeds 0.. and its held-out set
HELD_OUT_SEED = 2_000_003


# ---- rendering ------------------------------------------------------------------------------

def _fonts() -> list:
    from PIL import ImageFont

    fonts = [ImageFont.load_default_imagefont()]  # the 5 x 7 bitmap font
    try:
        fonts.insert(0, ImageFont.load_default(size=40))  # Aileron (needs Pillow's FreeType)
    except (ImportError, OSError, TypeError):
        pass
    return fonts


_FONTS: list | None = None


def render_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One printed ``digit`` as an 8 x 8 array of ints 0..16 (UCI optical-digits format)."""
    from PIL import Image, ImageDraw, ImageFilter

    global _FONTS
    if _FONTS is None:
        _FONTS = _fonts()
    bitmap_font = len(_FONTS) == 1 or rng.random() < 0.25
    font = _FONTS[-1] if bitmap_font else _FONTS[0]
    glyph = Image.new("L", (96, 96))
    ImageDraw.Draw(glyph).text((48, 48), str(digit), font=font, fill=255, anchor="mm")
    shear = rng.uniform(-0.35, 0.35)
    glyph = glyph.transform(glyph.size, Image.Transform.AFFINE, (1, shear, -shear * 48, 0, 1, 0),
                            resample=Image.Resampling.BILINEAR)
    glyph = glyph.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR)
    glyph = glyph.crop(glyph.point(lambda v: 255 if v > 96 else 0).getbbox())
    # NIST-style size normalisation: fill the height, keep the aspect ratio (a little stretched)
    height = int(rng.integers(26, SIDE + 1))
    width = glyph.width / glyph.height * height * rng.uniform(0.7, 1.15)
    width = int(np.clip(round(width), 3, SIDE))
    glyph = glyph.resize((width, height), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (SIDE, SIDE))
    x = int(np.clip((SIDE - width) // 2 + rng.integers(-2, 3), 0, SIDE - width))
    y = int(np.clip((SIDE - height) // 2 + rng.integers(-1, 2), 0, SIDE - height))
    canvas.paste(glyph, (x, y))
    bitmap = canvas.point(lambda v: 255 if v > 100 else 0)
    thickness = 0 if bitmap_font else rng.choice([0, 0, 3])  # pen width: dilate the strokes
    if thickness:
        bitmap = bitmap.filter(ImageFilter.MaxFilter(int(thickness)))
    on = np.asarray(bitmap) > 0
    on ^= rng.random(on.shape) < rng.uniform(0, 0.015)  # speckle
    return on.reshape(8, 4, 8, 4).sum(axis=(1, 3))


def render(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered digits (n x 8 x 8 ints) and their labels, balanced, for ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    return np.stack([render_digit(int(d), rng) for d in labels]), labels


# ---- the image format the model sees ----------------------------------------------------------

def make_processor():
    """The saved image processor: 8 x 8 -> 32 x 32 by nearest neighbour (each pixel becomes a
    4 x 4 block, so nothing is invented or blurred), scaled to [-1, 1]."""
    from PIL import Image
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": SIDE, "width": SIDE},
                             resample=Image.Resampling.NEAREST, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """What ``data.image_items`` + the processor make of 8 x 8 arrays, computed in one batch:
    each image scaled to 0..255 by its own range (as uint8), upscaled 4 x by repetition,
    normalised, on 3 channels. ``pretrain`` checks it matches the processor exactly."""
    x = torch.as_tensor(images, dtype=torch.float32)
    low = x.amin(dim=(1, 2), keepdim=True)
    span = (x.amax(dim=(1, 2), keepdim=True) - low).clamp(min=1e-8)
    x = (255 * (x - low) / span).to(torch.uint8).float()
    x = x.repeat_interleave(SIDE // x.shape[1], 1).repeat_interleave(SIDE // x.shape[2], 2)
    x = (x / 255 - 0.5) / 0.5
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def processor_pixel_values(images: np.ndarray, processor) -> torch.Tensor:
    """The same through the real path (``data.image_items``), for the check."""
    import datasets

    from ..training.data import image_items

    ds = datasets.Dataset.from_dict({"pixels": [im.tolist() for im in images],
                                     "label": [0] * len(images)})
    return torch.stack([it["pixel_values"] for it in image_items(ds, processor)])


# ---- the data sets ----------------------------------------------------------------------------

def split_of(key: str) -> str:
    """About 70 / 10 / 20 train / validation / test, by a hash of ``key``."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket < 2 else "validation" if bucket == 2 else "train"


def _write(out: Path, splits: dict[str, list[dict]], readme: str) -> dict[str, int]:
    with atomic_dir(out, overwrite=True) as tmp:
        for split, rows in splits.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "README.md").write_text(readme)
    return {k: len(v) for k, v in splits.items()}


DIGITS_README = """# digits

Handwritten digits, 8 x 8, pixel values 0..16: the `fl-offsite/ref-vit` model's downstream
task (it was pretrained on printed digits only, so this is a printed -> handwritten shift).

- Source: scikit-learn's bundled copy (`sklearn.datasets.load_digits`, offline) of the test
  set of the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak,
  1998; https://archive.ics.uci.edu/dataset/80). Preprocessed by NIST's programs: 32 x 32
  bitmaps, counts of on pixels in 4 x 4 blocks.
- Licence: the UCI data set is CC BY 4.0 (credit: E. Alpaydin and C. Kaynak, UCI Machine
  Learning Repository); scikit-learn, which ships this copy, is BSD-3-Clause.
- Rows: `pixels` (8 x 8 nested list of ints), `label` (0-9), `group` (= label, so
  `partition.by: group` gives Dirichlet label skew). Split by a hash of the row's index in
  `load_digits()`: {counts}.
- Rebuild (scikit-learn {sklearn}): `python -m fl_offsite.reference.vision data --out fl_offsite/datasets`.
"""

RENDERED_README = """# rendered-digits

Printed digits 0-9 rendered by `fl_offsite.reference.vision.render` (Pillow's built-in fonts, random
rotation, shear, stretch, stroke width and speckle, 32 x 32 bitmap counted into 8 x 8, values
0..16, the format of `fl-offsite/digits`), balanced over the labels. It is the model owner's
*public* data for `fl-offsite/ref-vit` (distilling its emulator); the same kind of images as
its pretraining but another seed ({seed}), and nothing of the handwritten task.

- Licence: generated here, with the fonts embedded in Pillow (MIT-CMU licence; Aileron by
  dotcolon.net, CC0).
- Rows: `pixels`, `label`, `group` (= label): {counts}.
- Rebuild: `python -m fl_offsite.reference.vision data --out fl_offsite/datasets`.
"""


def build_data(out: Path, rendered: int = 2000) -> dict[str, dict[str, int]]:
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        splits[split_of(f"digits-{index}")].append(
            {"pixels": image.astype(int).tolist(), "label": int(label), "group": int(label)})
    made = {"digits": {k: len(v) for k, v in splits.items()}}
    counts = ", ".join(f"{k} {v}" for k, v in made["digits"].items())
    _write(out / "digits", splits, DIGITS_README.format(counts=counts, sklearn=sklearn.__version__))
    images, labels = render(rendered, PUBLIC_SEED)
    rows = [{"pixels": im.tolist(), "label": int(y), "group": int(y)}
            for im, y in zip(images, labels)]
    cut = len(rows) * 4 // 5
    made["rendered-digits"] = {"train": cut, "validation": len(rows) - cut}
    counts = ", ".join(f"{k} {v}" for k, v in made["rendered-digits"].items())
    _write(out / "rendered-digits", {"train": rows[:cut], "validation": rows[cut:]},
           RENDERED_README.format(seed=PUBLIC_SEED, counts=counts))
    return made


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
    from ..training.evaluate import classification_accuracy

    if not (data.PACKAGED_DIR / "digits").is_dir():
        return None
    task = data.prepare("fl-offsite/digits", split, processor)
    return classification_accuracy(model.eval(), task.train_items)


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the digits task and the public rendered digits")
    d.add_argument("--out", type=Path, required=True, help="e.g. fl_offsite/datasets")
    d.add_argument("--rendered", type=int, default=2000, help="rendered public images")
    t = sub.add_parser("pretrain", help="pretrain the reference ViT on rendered digits")
    t.add_argument("--out", type=Path, required=True, help="e.g. fl_offsite/zoo/ref-vit")
    t.add_argument("--threads", type=int, default=1)
    for name, value in asdict(VitConfig()).items():
        t.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    if args.command == "data":
        for name, counts in build_data(args.out, args.rendered).items():
            print(name, counts)
        return
    torch.set_num_threads(args.threads)
    cfg = VitConfig(**{k: getattr(args, k) for k in asdict(VitConfig())})
    card = pretrain(args.out, cfg, "python -m fl_offsite.reference.vision " + " ".join(
        sys.argv[1:] if argv is None else argv))
    print(f"{args.out}: {card['parameters']:,} parameters, {card['seconds'] / 60:.1f} minutes, "
          f"held-out rendered accuracy {card['held_out_rendered_acc']:.3f}, zero-shot on "
          f"fl-offsite/digits test {card['digits_test_zero_shot_acc']}")


if __name__ == "__main__":
    main()
