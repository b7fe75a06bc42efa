"""Task data through ``datasets``: local files (json/jsonl/csv/parquet/txt) or hub names.

Three task kinds, told apart by their columns:

- ``lm`` (``text``): causal language modelling, concatenated and cut into fixed blocks;
- ``multiple-choice`` (``context``, ``choices``, ``label``): trained on the gold continuation,
  scored by log-likelihood of each choice;
- ``image`` (``image`` or ``pixels``, ``label``): image classification.

A local directory holds one file per split (``train.jsonl``, ``validation.jsonl``,
``test.jsonl``); a single file serves every split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, first_line

EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
              ".txt": "text"}
TASK_KINDS = ("lm", "multiple-choice", "image")


def _local_file(path: Path, split: str) -> Path | None:
    if path.is_file():
        return path
    for ext in EXTENSIONS:
        candidate = path / f"{split}{ext}"
        if candidate.is_file():
            return candidate
    return None


PACKAGED_DIR = Path(__file__).parents[1] / "datasets"
PACKAGED_PREFIX = "fl-offsite/"


def resolve_data_path(spec: str) -> str:
    """``fl-offsite/<name>`` -> the task shipped in this package; anything else unchanged."""
    if spec.startswith(PACKAGED_PREFIX) and (PACKAGED_DIR / spec[len(PACKAGED_PREFIX):]).is_dir():
        return str(PACKAGED_DIR / spec[len(PACKAGED_PREFIX):])
    return spec


def check_file(file: Path) -> None:
    """Refuse, with the line and the fix, what ``datasets`` reports badly or too late: an empty
    file, text that is not UTF-8 (it fails only when a row is read), a JSON-lines row that is
    not JSON."""
    raw = file.read_bytes()
    if not raw.strip():
        raise UserError(f"--data: {file} is empty; give it rows (e.g. {{\"text\": ...}} per "
                        "line)")
    if file.suffix == ".parquet":
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"--data: {file} line {line} is not UTF-8 ({exc.reason}); convert the "
                        f"file, e.g. iconv -f latin1 -t utf-8") from None
    if file.suffix == ".csv" and len([line for line in text.splitlines() if line.strip()]) < 2:
        raise UserError(f"--data: {file} has a header but no rows; give it one row per "
                        "example below the header")
    if file.suffix == ".jsonl":
        import json

        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"--data: {file} line {number} is not valid JSON "
                                    f"({exc.msg}); one JSON object per line") from None


CHOOSE_SPLIT = "choose one with --split / data.eval_split"


def _splits_in(path: Path) -> list[str]:
    return sorted({f.stem for f in path.iterdir() if f.suffix in EXTENSIONS}) if path.is_dir() else []


def _from_disk(path: Path, split: str):
    """A directory written by ``datasets``' ``save_to_disk``: a ``Dataset`` (it serves every
    split, as a single file does) or a ``DatasetDict`` (its ``split``)."""
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(f"--data: {path} (a saved DatasetDict) has no {split!r} split; it "
                            f"has {', '.join(saved)}: {CHOOSE_SPLIT}")
        return saved[split]
    return saved


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json",
                                                                  "dataset_dict.json"))


def load_split(spec: str, split: str):
    """One split of a dataset as a ``datasets.Dataset``."""
    import datasets

    spec = resolve_data_path(spec)
    path = Path(spec)
    if _is_saved_dataset(path):
        return _from_disk(path, split)
    if path.exists():
        file = _local_file(path, split)
        if file is None:
            present = _splits_in(path)
            hint = f"; it has {', '.join(present)}: {CHOOSE_SPLIT}" if present else ""
            raise UserError(f"--data: {spec} has no {split} file; expected {split}.jsonl "
                            f"(or {', '.join(EXTENSIONS)}) in that directory{hint}")
        builder = EXTENSIONS.get(file.suffix)
        if builder is None:
            raise UserError(f"--data: {file} has an unsupported extension; use one of "
                            f"{', '.join(EXTENSIONS)}")
        check_file(file)
        try:
            return datasets.load_dataset(builder, data_files=str(file), split="train")
        except Exception as exc:
            raise UserError(f"--data: cannot read {file}: {first_line(exc)}") from None
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:
        raise UserError(f"--data: {spec!r} is neither a local path nor a loadable dataset "
                        f"({first_line(exc, 200)})") from None


def task_kind(ds) -> str:
    cols = set(ds.column_names)
    if {"choices", "label"} <= cols:
        return "multiple-choice"
    if "text" in cols:
        return "lm"
    if "label" in cols and cols & {"image", "pixels"}:
        return "image"
    raise UserError(f"--data: columns {sorted(cols)} match no task; use 'text' (language "
                    "modelling), 'context'+'choices'+'label' (multiple choice) or "
                    "'image'+'label' (image classification)")


@dataclass
class TaskData:
    """A split ready for training and evaluation."""

    kind: str
    train_items: list[dict]  # model inputs with labels, one dict per example
    raw: object  # the datasets.Dataset (multiple-choice scoring reads it)

    def __len__(self) -> int:
        return len(self.train_items)


def lm_items(texts, tokenizer, block_size: int) -> list[dict]:
    """Every text (one tokenizer call for all), each ended by EOS, concatenated and cut into
    ``block_size`` blocks."""
    eos = tokenizer.eos_token_id
    texts = [text for text in texts if text and text.strip()]
    ids: list[int] = []
    for tokens in (tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
        ids.extend(tokens + [eos])
    n = len(ids) // block_size
    if n == 0:
        raise UserError(f"--data: only {len(ids)} tokens, fewer than one block of "
                        f"{block_size}; add text or lower block_size")
    arr = torch.tensor(ids[: n * block_size]).view(n, block_size)
    return [{"input_ids": row, "labels": row} for row in arr]


def context_text(example: dict) -> str:
    return example.get("context", example.get("query", ""))


def mc_items(ds, tokenizer, block_size: int, source: str = "--data") -> list[dict]:
    """Context + gold choice; loss only on the choice's tokens (all rows checked, then
    tokenised in one call each for contexts and choices)."""
    rows = list(ds)
    for row, ex in enumerate(rows):
        label = ex["label"]
        if isinstance(label, bool) or not isinstance(label, int) or \
                not 0 <= label < len(ex["choices"]):
            raise UserError(f"{source}: row {row}: label {label!r} is not the index of one of its "
                            f"{len(ex['choices'])} choices; use 0..{len(ex['choices']) - 1}")
    contexts = tokenizer([context_text(ex) for ex in rows], add_special_tokens=False)["input_ids"]
    golds = tokenizer([ex["choices"][ex["label"]] for ex in rows],
                      add_special_tokens=False)["input_ids"]
    items = []
    for ctx, cont in zip(contexts, golds):
        ids = (ctx + cont)[-block_size:]
        labels = ([-100] * len(ctx) + cont)[-block_size:]
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return items


def image_items(ds, processor) -> list[dict]:
    items = []
    column = "image" if "image" in ds.column_names else "pixels"
    for ex in ds:
        image = ex[column]
        if not hasattr(image, "convert"):  # nested lists / arrays of pixel values
            from PIL import Image
            array = np.asarray(image, dtype=np.float32)
            array = (255 * (array - array.min()) / max(np.ptp(array), 1e-8)).astype(np.uint8)
            image = Image.fromarray(array)
        pixels = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        items.append({"pixel_values": pixels, "labels": torch.tensor(int(ex["label"]))})
    return items


def prepare(spec: str, split: str, processor, block_size: int = 128,
            max_examples: int | None = None) -> TaskData:
    ds = load_split(spec, split)
    if max_examples is not None and len(ds) > max_examples:
        ds = ds.select(range(max_examples))
    if len(ds) == 0:
        raise UserError(f"--data: {spec} split {split!r} is empty")
    return prepare_dataset(ds, processor, block_size, f"--data: {spec} ({split})")


def prepare_dataset(ds, processor, block_size: int = 128, source: str = "--data") -> TaskData:
    kind = task_kind(ds)
    if processor is None:
        raise UserError("model: has no tokenizer or image processor; save one beside the model")
    if kind == "lm":
        items = lm_items(ds["text"], processor, block_size)
    elif kind == "multiple-choice":
        items = mc_items(ds, processor, block_size, source)
    else:
        items = image_items(ds, processor)
    return TaskData(kind, items, ds)


def collate(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack a batch; token sequences are right-padded (labels with -100)."""
    if "pixel_values" in items[0]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = it["input_ids"]
        labels[row, :n] = it["labels"]
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
