"""Atomic writes and content hashes.

Every output (bundle, adapter, model directory, run files) is written to a temporary sibling
and renamed into place, so a failure never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _default_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give (mkstemp/mkdtemp use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def refuse_occupied(target: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that holds something, before any work that would be lost."""
    target = Path(target)
    if not overwrite and target.exists() and (target.is_file() or any(target.iterdir())):
        from .errors import UserError
        raise UserError(f"--out: {target} already exists and is not empty; choose a new path "
                        "or pass --overwrite")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False,
               content_addressed: bool = False):
    """Yield a temporary directory that becomes ``target`` only if the block succeeds.

    ``content_addressed``: ``target`` is named by its content's hash and shared by processes
    (data owners on one machine), so a directory already there is never removed (another
    process may be reading it) and, when one appears first, this copy is discarded."""
    target = Path(target)
    if not content_addressed:
        refuse_occupied(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(_default_mode(directory=True))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in tmp.rglob("*"):  # some writers (safetensors via transformers) make 0600 files
        if file.is_file() and not file.is_symlink():
            file.chmod(_default_mode())
    if content_addressed:
        try:
            os.rename(tmp, target)  # refused when another writer got there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
        return
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` that replaces it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (contiguous, unshared copies)."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def tensors_hash(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
