"""Offline English text from Debian packages, for pretraining the reference model.

``python -m fl_offsite.reference.corpus --out corpus/`` writes plain-text files:

- ``pretrain/wordnet.txt``: WordNet 3.0 glosses and examples, one "word (pos): gloss" per line
  (package ``wordnet-base``, WordNet 3.0 licence: use, copy and redistribution permitted with
  the copyright notice);
- ``pretrain/bible.txt``: the World English Bible, one verse per line (``sword-text-web``,
  public domain);
- ``pretrain/python-docs.txt``: the reST sources of the Python 3.11 documentation
  (``python3.11-doc``, PSF licence);
- ``heldout/devil.txt``: Ambrose Bierce's The Devil's Dictionary (``dict-devil``, public
  domain) and ``heldout/jargon.txt``: the Jargon File (``jargon-text``, public domain): kept out
  of pretraining, for the language-modelling adaptation task.

Install the sources with ``apt-get install wordnet-base sword-text-web python3.11-doc
dict-devil jargon-text``. GPL (dict-gcide) and unclear-licence (fortunes) texts are not used.
"""

from __future__ import annotations

import argparse
import gzip
import html
import re
import struct
import zlib
from pathlib import Path

from ..errors import UserError

WORDNET = Path("/usr/share/wordnet")
SWORD = Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb")
PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")
DEVIL = Path("/usr/share/dictd/devil.dict.dz")
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def wordnet_entries() -> list[tuple[str, str, str]]:
    """(lemma, part of speech, gloss) for every synset's first lemma."""
    entries = []
    for pos, name in POS.items():
        for line in (WORDNET / f"data.{pos}").read_text(errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            lemma = parts[4].replace("_", " ")
            lemma = re.sub(r"\(\w+\)$", "", lemma)  # adjective markers like (a)
            entries.append((lemma, name, gloss.strip()))
    return entries


def bible_verses() -> list[str]:
    verses = []
    for testament in ("ot", "nt"):
        index = (SWORD / f"{testament}.bzs").read_bytes()
        data = (SWORD / f"{testament}.bzz").read_bytes()
        for i in range(len(index) // 12):
            offset, size, _ = struct.unpack("<III", index[i * 12:(i + 1) * 12])
            block = zlib.decompress(data[offset:offset + size]).decode("utf-8", "replace")
            text = re.sub(r"<note.*?</note>", " ", block, flags=re.S)
            text = re.sub(r"<(verse|div|chapter)[^>]*eID[^>]*/>", "\n", text)
            text = re.sub(r"<[^>]+>", " ", text)
            for verse in html.unescape(text).split("\n"):
                verse = " ".join(verse.split())
                if len(verse) > 20:
                    verses.append(verse)
    return verses


def devil_entries() -> list[str]:
    """One entry ("ABATIS, n. Rubbish in front of a fort...") per item, quotations included."""
    text = gzip.decompress(DEVIL.read_bytes()).decode("latin-1")
    entries: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        if re.match(r"^[A-Z][A-Z'\- ]+, ", flat):
            entries.append(flat)
        elif entries and flat:
            entries[-1] += " " + flat
    return entries


def jargon_entries() -> list[str]:
    text = gzip.decompress(JARGON.read_bytes()).decode("utf-8", "replace")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) > 8]


def build(out: Path) -> dict[str, int]:
    missing = [str(p) for p in (WORDNET, SWORD, PYDOCS, DEVIL, JARGON) if not p.exists()]
    if missing:
        raise UserError(f"corpus: missing {', '.join(missing)}; apt-get install wordnet-base "
                        "sword-text-web python3.11-doc dict-devil jargon-text")
    (out / "pretrain").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    files = {
        "pretrain/wordnet.txt": [f"{w} ({p}): {g}" for w, p, g in wordnet_entries()],
        "pretrain/bible.txt": bible_verses(),
        "pretrain/python-docs.txt": [p.read_text(errors="replace")
                                     for p in sorted(PYDOCS.rglob("*.txt"))],
        "heldout/devil.txt": devil_entries(),
        "heldout/jargon.txt": jargon_entries(),
    }
    sizes = {}
    for name, lines in files.items():
        text = "\n".join(lines) + "\n"
        (out / name).write_text(text)
        sizes[name] = len(text)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description="Extract the offline pretraining corpus")
    parser.add_argument("--out", type=Path, required=True)
    for name, size in build(parser.parse_args().out).items():
        print(f"{name}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
