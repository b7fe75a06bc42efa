"""What travels between model owner and data owners, and how many bytes it is.

Messages (Flower Message API):

- ``query.hello`` (once per data owner): asks for its stable name (``node-name`` from its node
  config, or its simulated partition id), so sampling and aggregation order do not depend on
  Flower's random node ids and a run is reproducible for a seed.
- ``query.bundle`` (once per data owner): the bundle. With ``shared-path`` transport (one host,
  simulation) it names a directory every virtual data owner can read; with ``message``
  transport (deployment) it carries the bundle's tensors in one ArrayRecord and its small
  files in a ConfigRecord. Either way the byte count is what a real node would receive.
- ``query.bundle`` with a ``base`` hash (after a re-alignment): only the new emulator blocks
  and the bundle's metadata; the data owner rebuilds the new bundle from its cached one
  (shared parts, adapter and tokenizer are unchanged) and checks the announced hash.
- ``train`` (every round): exactly one ArrayRecord, the global adapter (so Flower's client-side
  DP mods apply), and a ConfigRecord with the bundle hash and the training task as JSON.
  The reply holds the trained adapter (one ArrayRecord) and a MetricRecord with
  ``num-examples`` (FedAvg's weight) and the training statistics.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..errors import UserError
from ..offsite.adapter import Adapter
from ..fileio import tensor_bytes

BUNDLE_ACTION = "bundle"
HELLO_ACTION = "hello"
MISSING_BUNDLE = "fl-offsite: bundle not cached"
TENSOR_FILES = ("emulator.safetensors", "shared.safetensors", "adapter.safetensors")


def adapter_record(adapter: Adapter) -> ArrayRecord:
    """bfloat16 travels as float32 (ArrayRecord has no bfloat16); receivers cast back."""
    return ArrayRecord(OrderedDict(
        (k, v.float() if v.dtype == torch.bfloat16 else v) for k, v in sorted(adapter.tensors.items())))


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays: a tensor's from its shape and dtype (nothing is
    deserialised), raw byte arrays (SecAgg+'s) as they are."""
    return sum(math.prod(array.shape) * np.dtype(array.dtype).itemsize if array.dtype
               else len(array.data) for array in record.values())


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message as it is sent: its arrays and the byte strings (bundle
    files, SecAgg+ keys and shares) of its config records. What the traffic counters add up."""
    blobs = sum(len(v) for record in content.config_records.values() for value in record.values()
                for v in (value if isinstance(value, list) else [value]) if isinstance(v, bytes))
    return blobs + sum(record_bytes(r) for r in content.array_records.values())


def bundle_files(bundle_dir: Path) -> dict[str, bytes]:
    """The bundle's small files (config, metadata, tokenizer...), by name."""
    return {p.name: p.read_bytes() for p in sorted(bundle_dir.iterdir())
            if p.is_file() and p.name not in TENSOR_FILES}


def bundle_size(bundle_dir: Path) -> int:
    """Bytes a data owner receives for the bundle (all its files)."""
    return sum(p.stat().st_size for p in Path(bundle_dir).iterdir() if p.is_file())


def bundle_content(bundle_dir: Path, bundle_hash: str, transport: str) -> RecordDict:
    meta = ConfigRecord({"hash": bundle_hash, "bytes": bundle_size(bundle_dir)})
    if transport == "shared-path":
        meta["path"] = str(Path(bundle_dir).resolve())
        return RecordDict({"bundle": meta})
    from ..fileio import load_tensors

    tensors = OrderedDict()
    for name in TENSOR_FILES:
        for key, value in load_tensors(bundle_dir / name).items():
            tensors[f"{name}/{key}"] = value
    files = ConfigRecord({f"file:{n}": b for n, b in bundle_files(bundle_dir).items()})
    return RecordDict({"bundle": meta, "files": files, "arrays": ArrayRecord(tensors)})


def checked_hash(value) -> str:
    """A bundle hash from the model owner; it names a cache directory, so only hex passes."""
    text = str(value)
    if not 16 <= len(text) <= 128 or any(c not in "0123456789abcdef" for c in text):
        raise UserError(f"bundle: refusing bundle hash {text[:40]!r} from the model owner (not "
                        "a hex digest)")
    return text


def file_name(key: str) -> str:
    """The bundle file a ``file:NAME`` key names, refused unless it is a plain file name in the
    bundle directory (a hostile model owner must not write outside the data owner's cache)."""
    name = key.removeprefix("file:")
    if not key.startswith("file:") or not name or name in {".", ".."} or "/" in name or \
            "\\" in name or "\0" in name or name.startswith(".") or name in TENSOR_FILES:
        raise UserError(f"bundle: refusing file name {name!r} from the model owner (only plain "
                        "file names inside the bundle directory are accepted)")
    return name


def _write_files(content: RecordDict, tmp: Path) -> None:
    for key, data in content["files"].items():
        (tmp / file_name(key)).write_bytes(data)


def _check_received(bundle_dir: Path, announced: str, tensors: dict[str, dict]) -> None:
    """Refuse received files whose content is not the announced bundle, before they are kept:
    the cache is addressed by that hash, and a bad copy under it would shadow every good one.
    ``tensors`` (per file) are the ones just written: hashed as received, not read back; a
    file not among them (a delta's copied shared parts) is read."""
    from ..offsite.bundle import content_hash

    actual = content_hash(bundle_dir, tensors.get("emulator.safetensors"),
                          tensors.get("shared.safetensors"))
    if actual != announced:
        raise UserError(f"bundle: the received files hash to {actual[:12]}, the model owner "
                        f"announced {announced[:12]}; nothing was kept")


def write_bundle_content(content: RecordDict, target: Path) -> None:
    """Recreate a bundle directory from a ``message``-transport payload; it is kept (renamed to
    ``target``, named by the announced hash) only if its content has that hash."""
    from ..fileio import atomic_dir, save_tensors

    per_file: dict[str, dict[str, torch.Tensor]] = {n: {} for n in TENSOR_FILES}
    for key, tensor in record_tensors(content["arrays"]).items():
        name, _, tensor_key = key.partition("/")
        if name not in per_file:
            raise UserError(f"bundle: tensor {key!r} names no bundle file "
                            f"({', '.join(TENSOR_FILES)})")
        per_file[name][tensor_key] = tensor
    for key in content["files"]:
        file_name(key)  # all checked before anything is written
    with atomic_dir(target, content_addressed=True) as tmp:
        for name, tensors in per_file.items():
            save_tensors(tmp / name, tensors)
        _write_files(content, tmp)
        _check_received(tmp, str(content["bundle"]["hash"]), per_file)


DELTA_FILES = ("emulator.safetensors",)


def bundle_delta_content(bundle_dir: Path, bundle_hash: str, base_hash: str) -> RecordDict:
    """The part of a re-aligned bundle that differs from any earlier version of it."""
    from ..fileio import load_tensors

    meta = ConfigRecord({"hash": bundle_hash, "base": base_hash,
                         "bytes": delta_size(bundle_dir)})
    files = ConfigRecord({f"file:{n}": b for n, b in bundle_files(bundle_dir).items()})
    tensors = OrderedDict((f"emulator.safetensors/{k}", v) for k, v in
                          load_tensors(bundle_dir / "emulator.safetensors").items())
    return RecordDict({"bundle": meta, "files": files, "arrays": ArrayRecord(tensors)})


def delta_size(bundle_dir: Path) -> int:
    """Bytes of a delta: the emulator file and the small files."""
    return sum(p.stat().st_size for p in Path(bundle_dir).iterdir()
               if p.is_file() and p.name not in set(TENSOR_FILES) - set(DELTA_FILES))


def apply_bundle_delta(content: RecordDict, base_dir: Path, target: Path) -> None:
    """A new bundle directory: ``base_dir``'s unchanged tensor files + the delta's files."""
    import shutil

    from ..fileio import atomic_dir, save_tensors

    emulator = {key.partition("/")[2]: t for key, t in record_tensors(content["arrays"]).items()}
    for key in content["files"]:
        file_name(key)  # all checked before anything is written
    with atomic_dir(target, content_addressed=True) as tmp:
        for name in TENSOR_FILES:
            if name not in DELTA_FILES:
                shutil.copy2(base_dir / name, tmp / name)
        save_tensors(tmp / "emulator.safetensors", emulator)
        _write_files(content, tmp)
        _check_received(tmp, str(content["bundle"]["hash"]), {"emulator.safetensors": emulator})


def task_config(bundle_hash: str, task: dict) -> ConfigRecord:
    return ConfigRecord({"bundle-hash": bundle_hash, "task": json.dumps(task)})


def adapter_bytes(adapter: Adapter) -> int:
    return tensor_bytes(adapter.tensors)
