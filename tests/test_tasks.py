"""The reference tasks: built from a corpus deterministically, splits disjoint, labels right."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fl_offsite.reference import corpus

VERSES = [f"And the {i}th man of the tribe went up to the city of the hills with his {i} sons "
          f"and daughters in the morning" for i in range(400)]
GLOSSES = [f"word{chr(97 + i % 26)}{chr(97 + i // 26 % 26)} ({'noun' if i % 2 else 'verb'}): "
           f"a made up meaning number {i} for testing the builder" for i in range(400)]

DOCS = [f"The function number {i} returns a value computed from its arguments." for i in range(400)]


@pytest.fixture
def small_corpus(tmp_path):
    (tmp_path / "c" / "pretrain").mkdir(parents=True)
    (tmp_path / "c" / "heldout").mkdir()
    (tmp_path / "c" / "pretrain" / "bible.txt").write_text("\n".join(VERSES))
    (tmp_path / "c" / "pretrain" / "wordnet.txt").write_text("\n".join(GLOSSES))
    (tmp_path / "c" / "pretrain" / "python-docs.txt").write_text("\n".join(DOCS))
    (tmp_path / "c" / "heldout" / "devil.txt").write_text(
        "\n".join(f"ENTRY{i}, n. A definition long enough to count as an entry, number {i}."
                  for i in range(200)))
    return tmp_path / "c"


def build(corpus_dir, out):
    subprocess.run([sys.executable, "-m", "fl_offsite.reference.tasks", "--corpus", str(corpus_dir),
                    "--out", str(out), "--items", "200"], check=True, capture_output=True)
    return {task: {split: [json.loads(line) for line in (out / task / f"{split}.jsonl").open()]
                   for split in ("train", "validation", "test")}
            for task in ("devil", "wordnet-define", "bible-cloze", "public-text")}


def test_tasks_are_deterministic_disjoint_and_labelled(small_corpus, tmp_path):
    first, second = build(small_corpus, tmp_path / "a"), build(small_corpus, tmp_path / "b")
    assert first == second
    for task, splits in first.items():
        keys = {split: {json.dumps(r, sort_keys=True) for r in rows} for split, rows in splits.items()}
        assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"], task
        assert all(splits.values()), task
    for row in first["bible-cloze"]["test"]:
        full = row["context"] + row["choices"][row["label"]]
        assert full in VERSES and len(row["choices"]) == 4
    for row in first["wordnet-define"]["test"]:
        lemma_pos = row["context"].rstrip(":")
        assert f"{lemma_pos}:{row['choices'][row['label']]}" in GLOSSES
    public = [row for rows in first["public-text"].values() for row in rows]
    lines = [line for row in public for line in row["text"].split("\n")]
    assert {row["group"] for row in public} == {"python-docs", "wordnet"}
    assert set(lines) <= set(DOCS) | set(GLOSSES)  # the Bible and the held-out texts stay out
    assert all(len(row["text"]) >= 1000 for row in public)


@pytest.mark.skipif(not os.environ.get("CI") and not all(
    p.exists() for p in (corpus.WORDNET, corpus.SWORD, corpus.PYDOCS, corpus.DEVIL,
                         corpus.JARGON)),
    reason="the Debian text packages (wordnet-base sword-text-web python3.11-doc dict-devil "
           "jargon-text) are not installed; .ci/run installs them, and under CI this test runs")
def test_corpus_extraction_from_the_debian_packages(tmp_path):
    sizes = corpus.build(tmp_path)
    assert sizes["pretrain/bible.txt"] > 4e6 and sizes["pretrain/wordnet.txt"] > 5e6
    devil = (tmp_path / "heldout" / "devil.txt").read_text().splitlines()
    assert len(devil) > 900 and devil[0].startswith("ABASEMENT, n.")
