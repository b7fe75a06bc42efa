"""The vision side of the reference set (commands; ``digits.py`` has the data, ``vit.py`` the
model): a ViT pretrained offline on rendered digits, and a
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
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .digits import build_data
from .vit import VitConfig, pretrain


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
