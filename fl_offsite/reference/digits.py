"""The digits of the vision reference set: printed digits rendered from Pillow's fonts (what
the reference ViT is pretrained on, and the model owner's public data) and the handwritten UCI
digits task, in the 8 x 8 format the model sees. See ``vision.py`` for the commands."""

from __future__ import annotations

import hashlib
import json
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


