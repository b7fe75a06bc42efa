"""Build the reference tasks from the offline corpus (``python -m fl_offsite.reference.corpus`` first).

``python -m fl_offsite.reference.tasks --corpus corpus --out fl_offsite/datasets`` writes, each with
train / validation / test splits disjoint by construction (split by a hash of the item):

- ``devil``: language-modelling adaptation to a held-out domain, The Devil's Dictionary (never
  in the pretraining text), like the paper's WikiText column;
- ``wordnet-define``: multiple choice, "word (pos):" followed by its WordNet gloss or three
  glosses of other words of the same part of speech: it needs what pretraining stored about
  each word (the glosses are pretraining text), not surface features an adapter can learn;
- ``bible-cloze``: multiple choice, the first half of a verse of the World English Bible
  followed by its true second half or the second halves of three other verses;
- ``public-text``: the model owner's public text for distilling a real model's emulator:
  passages of about 1,000 characters of consecutive lines of the Python docs and WordNet
  glosses (the Devil's Dictionary, the Jargon File and the Bible held out, so ``devil`` and
  ``bible-cloze`` stay unseen by the model owner).

Every row has a ``group`` column (first letter, part of speech, first word of the verse) for
non-IID partitioning (``partition.by: group``). Seeded and deterministic. The image task
(``digits``) and the ViT's public data are built by ``python -m fl_offsite.reference.vision data``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from ..fileio import atomic_dir


def split_of(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def write_task(out: Path, name: str, rows: list[tuple[str, dict]], readme: str) -> dict:
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for key, row in rows:
        splits[split_of(key)].append(row)
    with atomic_dir(out / name, overwrite=True) as tmp:
        for split, items in splits.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        (tmp / "README.md").write_text(f"# {name}\n\n{readme}\n\nRows: {counts}.\nRebuild: "
                                       "`python -m fl_offsite.reference.tasks --corpus corpus --out "
                                       "fl_offsite/datasets`.\n")
    return {k: len(v) for k, v in splits.items()}


def devil_rows(corpus: Path) -> list[tuple[str, dict]]:
    lines = (corpus / "heldout" / "devil.txt").read_text().splitlines()
    return [(line, {"text": line, "group": line[0]}) for line in lines if len(line) > 40]


def define_rows(corpus: Path, n: int, rng: random.Random) -> list[tuple[str, dict]]:
    by_pos: dict[str, list[tuple[str, str]]] = {}
    for line in (corpus / "pretrain" / "wordnet.txt").read_text().splitlines():
        head, _, gloss = line.partition(": ")
        lemma, _, pos = head.rpartition(" (")
        gloss = gloss.split(";")[0].strip()
        if lemma.isalpha() and 15 <= len(gloss) <= 80:
            by_pos.setdefault(pos.rstrip(")"), []).append((lemma, gloss))
    entries = [(pos, lemma, gloss) for pos, items in sorted(by_pos.items()) for lemma, gloss in items]
    rows = []
    for pos, lemma, gloss in rng.sample(entries, n):
        others = [g for _, g in rng.sample(by_pos[pos], 8) if g != gloss][:3]
        choices = others + [gloss]
        rng.shuffle(choices)
        rows.append((lemma, {"context": f"{lemma} ({pos}):", "choices": [" " + c for c in choices],
                             "label": choices.index(gloss), "group": pos}))
    return rows


def cloze_rows(corpus: Path, n: int, rng: random.Random) -> list[tuple[str, dict]]:
    verses = [v for v in (corpus / "pretrain" / "bible.txt").read_text().splitlines()
              if 60 <= len(v) <= 160 and not v.startswith("Preface")]
    halves = []
    for verse in rng.sample(verses, n + 3 * n // 4):
        words = verse.split()
        cut = len(words) // 2
        halves.append((verse, " ".join(words[:cut]), " " + " ".join(words[cut:])))
    rows = []
    for i, (verse, first, second) in enumerate(halves[:n]):
        others = [h[2] for h in rng.sample(halves, 6) if h[2] != second][:3]
        choices = others + [second]
        rng.shuffle(choices)
        rows.append((verse, {"context": first, "choices": choices, "label": choices.index(second),
                             "group": verse.split()[0].strip("“‘\"'").lower()}))
    return rows


def public_rows(corpus: Path, per_source: int, rng: random.Random,
                sources: tuple[str, ...] = ("python-docs", "wordnet"), chars: int = 1000
                ) -> list[tuple[str, dict]]:
    """``per_source`` passages of consecutive lines (about ``chars`` characters) from each
    source file of the pretraining corpus, in a seeded random order."""
    rows = []
    for source in sources:
        lines = [line for line in (corpus / "pretrain" / f"{source}.txt").read_text()
                 .splitlines() if line.strip()]
        passages, current = [], []
        for line in lines:
            current.append(line)
            if sum(len(x) + 1 for x in current) >= chars:
                passages.append("\n".join(current))
                current = []
        rows += [(text, {"text": text, "group": source}) for text in
                 rng.sample(passages, min(per_source, len(passages)))]
    rng.shuffle(rows)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--items", type=int, default=3000, help="items per multiple-choice task")
    p.add_argument("--public-passages", type=int, default=2000,
                   help="public-text passages per source")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    made = {
        "devil": write_task(args.out, "devil", devil_rows(args.corpus),
                            "The Devil's Dictionary (Ambrose Bierce, public domain; Debian "
                            "dict-devil), one entry per row (`text`); held out of pretraining."),
        "wordnet-define": write_task(args.out, "wordnet-define",
                                     define_rows(args.corpus, args.items, rng),
                                     "Pick a word's WordNet 3.0 gloss among four of the same "
                                     "part of speech (WordNet 3.0 licence)."),
        "bible-cloze": write_task(args.out, "bible-cloze", cloze_rows(args.corpus, args.items, rng),
                                  "Complete a verse of the World English Bible (public "
                                  "domain) among four second halves."),
        "public-text": write_task(args.out, "public-text",
                                  public_rows(args.corpus, args.public_passages,
                                              random.Random(f"{args.seed}-public-text")),
                                  "The model owner's public text (distillation of a real model's "
                                  "emulator): passages of ~1,000 characters of the Python 3.11 "
                                  "docs (PSF licence) and WordNet 3.0 glosses (WordNet licence); "
                                  "`group` names the source. The Devil's Dictionary, the Jargon "
                                  "File and the Bible are held out."),
    }
    for name, counts in made.items():
        print(name, counts)


if __name__ == "__main__":
    main()
