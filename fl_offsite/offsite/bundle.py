"""The bundle: everything that leaves the model owner, and nothing more.

A bundle directory holds

- ``config.json``: the emulated model's config (``l + k + r`` blocks), buildable without the
  original checkpoint;
- ``emulator.safetensors`` and ``adapter.safetensors``: the kept middle blocks and the
  initial adapter blocks, keyed ``"<original block index>.<parameter path in the block>"``;
- ``shared.safetensors``: the frozen parts outside the blocks (embeddings, final norm, head);
- the tokenizer or image processor, when the model has one;
- ``offsite.json``: source model id, layer plan, how the emulator was made (layer selection,
  distillation, quantisation), and two hashes: ``bundle_hash`` (the frozen content a data
  owner caches by) and ``source_hash`` (the shared parts, which the model owner recomputes
  from the full model to check that an adapter belongs to it).

Dropped blocks are never read into any of these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights

from .. import __version__
from ..models.families import Arch, Family, resolve, use_family
from ..errors import UserError
from ..fileio import atomic_dir, load_tensors, save_tensors, tensors_hash
from ..models.loading import AUTO_CLASSES
from .plan import LayerPlan

FORMAT_VERSION = 1
META_FILE = "offsite.json"


def block_of(name: str, blocks_path: str) -> tuple[int, str] | None:
    """(block index, path inside the block) of a state-dict name; None for a shared part."""
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return None
    index, rest = name[len(prefix):].split(".", 1)
    return int(index), rest


def place(name: str, tensor: torch.Tensor, blocks_path: str, shared: dict,
          blocks: dict[int, dict]) -> None:
    """Put a state-dict tensor with the shared parts or under its block."""
    where = block_of(name, blocks_path)
    if where is None:
        shared[name] = tensor
    else:
        blocks.setdefault(where[0], {})[where[1]] = tensor


def split_state(model: torch.nn.Module, arch: Arch) -> tuple[dict, dict[int, dict]]:
    """(shared tensors, {original block index: {param path in block: tensor}}).

    Tied parameters (e.g. an LM head tied to the embeddings) appear once, under their first name.
    A model whose weights are offloaded to disk (``models.offload``) gives its checkpoint's
    tensors instead, each block read when first used.
    """
    from ..models.offload import CHECKPOINT_ATTRIBUTE

    checkpoint = getattr(model, CHECKPOINT_ATTRIBUTE, None)
    if checkpoint is not None:
        return checkpoint.on_demand()
    shared: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        place(name, tensor, arch.blocks_path, shared, blocks)
    return shared, blocks


def keyed(blocks: dict[int, dict], indices) -> dict[str, torch.Tensor]:
    """Flatten chosen blocks into ``"<index>.<path>"`` keys."""
    return {f"{i}.{k}": v for i in indices for k, v in blocks[i].items()}


def unkeyed(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, rest = key.split(".", 1)
        out.setdefault(int(index), {})[rest] = value
    return out


def compress_emulator(model, arch: Arch, emulator: dict, compression) -> dict:
    """``emulator`` (``"<index>.<path>"`` tensors) with each block rewritten by ``compression``."""
    by_block = unkeyed(emulator)
    return keyed({i: compression.compress_block(arch.blocks(model)[i], by_block[i], i)
                  for i in by_block}, by_block)


def middle_share(model, arch: Arch, plan: LayerPlan, emulator: dict,
                 dtype: torch.dtype | None = None) -> dict:
    """What of the secret middle the bundle ships: the emulator's bytes against the bytes of
    the middle blocks it stands in for (the size budget an emulator is held to), those counted
    in the bundle's ``dtype`` where the model is held in another."""
    def size(t: torch.Tensor) -> int:
        return t.numel() * (dtype.itemsize if dtype and t.is_floating_point() else t.element_size())

    modules = arch.blocks(model)
    middle = sum(size(t) for i in range(len(plan.bottom), plan.depth - len(plan.top))
                 for t in modules[i].state_dict().values())
    shipped = sum(t.numel() * t.element_size() for t in emulator.values())
    return {"emulator_bytes": shipped, "middle_bytes": middle,
            "share_of_middle": round(shipped / max(middle, 1), 4)}


def emulated_config(config, plan: LayerPlan):
    """Copy of ``config`` with only the planned blocks (per-layer lists sliced to match)."""
    cfg = config.__class__.from_dict(config.to_dict())
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == plan.depth:
            setattr(cfg, key, [value[i] for i in plan.order])
    cfg.num_hidden_layers = len(plan.order)
    cfg.use_cache = False
    return cfg


@dataclass
class BundleInfo:
    path: Path
    source_model: str
    model_type: str
    task: str
    plan: LayerPlan
    bundle_hash: str
    source_hash: str
    emulator: dict  # how the emulator was made: layer_selection, distill, quantize
    family: Family | None = None  # where the model's parts are, as the model owner resolved it


def read_info(bundle_dir: str | Path) -> BundleInfo:
    bundle_dir = Path(bundle_dir)
    meta_path = bundle_dir / META_FILE
    if not meta_path.is_file():
        raise UserError(f"--bundle: {bundle_dir} is not a bundle (no {META_FILE}); "
                        "build one with `fl-offsite emulator --model ... --out DIR`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"--bundle: {bundle_dir} has bundle format {meta.get('format')!r}, "
                        f"this fl-offsite reads format {FORMAT_VERSION}; rebuild the bundle")
    return BundleInfo(bundle_dir, meta["source_model"], meta["model_type"], meta["task"],
                      LayerPlan.from_dict(meta["plan"]), meta["bundle_hash"], meta["source_hash"],
                      meta.get("emulator", {}),
                      Family.from_dict(meta["family"]) if "family" in meta else None)


def frozen_hash(config_json: str, plan: LayerPlan, emulator: dict, shared: dict) -> str:
    """Hash of what a data owner caches: config, plan, emulator blocks and shared parts."""
    return tensors_hash({**{"emulator." + k: v for k, v in emulator.items()},
                         **{"shared." + k: v for k, v in shared.items()}},
                        extra=config_json + json.dumps(plan.to_dict(), sort_keys=True))


def write_bundle(model: torch.nn.Module, plan: LayerPlan, out_dir: str | Path,
                 source_model: str, processor=None, emulator: dict | None = None,
                 compression=None, record: dict | None = None,
                 overwrite: bool = False, state: tuple[dict, dict] | None = None,
                 compressed: bool = False, dtype: torch.dtype | None = None) -> BundleInfo:
    """Write the bundle of ``model`` for ``plan``.

    ``emulator`` (``"<index>.<path>"`` tensors) replaces the kept middle blocks, e.g. with a
    distilled emulator; by default they are copied from the model. ``compression`` (an
    ``emulators`` compression method, e.g. int8) rewrites them before they are stored
    (``compressed``: ``emulator`` is in its format already, compressed before distillation);
    ``record`` (how the emulator was made) goes into the metadata. ``state`` (shared
    tensors, planned blocks) stands in for the model's weights when ``model`` is a skeleton
    (``streaming.py``). ``dtype`` is the bundle's when the model was computed in another
    (the model owner distils in float32, then ships the checkpoint's half precision).
    """
    arch = resolve(model)
    if plan.depth != len(arch.blocks(model)):
        raise UserError(f"plan: made for {plan.depth} blocks but the model has "
                        f"{len(arch.blocks(model))}")
    shared, blocks = state or split_state(model, arch)
    emulator = emulator or keyed(blocks, plan.emulator)
    record = dict(record or {})
    if compression is not None:
        if not compressed:
            emulator = compress_emulator(model, arch, emulator, compression)
        record["uncompressed"] = sorted({name for state in unkeyed(emulator).values()
                                         for name in compression.left_uncompressed(state)})
    adapter = keyed(blocks, plan.adapter)
    cfg = emulated_config(model.config, plan)
    if dtype is not None:
        shared, emulator, adapter = (_cast(part, dtype) for part in (shared, emulator, adapter))
        cfg.dtype = dtype
    record.update(middle_share(model, arch, plan, emulator, dtype))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        cfg.save_pretrained(tmp)
        config_json = (tmp / "config.json").read_text()
        save_tensors(tmp / "emulator.safetensors", emulator)
        save_tensors(tmp / "adapter.safetensors", adapter)
        save_tensors(tmp / "shared.safetensors", shared)
        if processor is not None:
            processor.save_pretrained(tmp)
        meta = {
            "format": FORMAT_VERSION,
            "fl_offsite_version": __version__,
            "source_model": source_model,
            "model_type": arch.model_type,
            "family": arch.family.to_dict(),  # the data owner uses exactly this
            "task": arch.task,
            "plan": plan.to_dict(),
            "notation": plan.notation(),
            "emulator": {"layer_selection": "uniform", **record,
                         "quantize": compression.name if compression
                         else record.get("quantize")},  # a re-aligned version keeps its own
            "bundle_hash": frozen_hash(config_json, plan, emulator, shared),
            "source_hash": tensors_hash(shared),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return read_info(out_dir)


def _cast(tensors: dict, dtype: torch.dtype) -> dict:
    """Floating-point tensors in ``dtype``; integer ones (int8 weights) as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def build_emulated_model(config, plan: LayerPlan, shared: dict, emulator: dict, adapter: dict,
                         task: str, family: Family | None = None) -> torch.nn.Module:
    """Assemble the emulated model from its parts, without ever materialising random weights.

    A block repeated in the plan is one module at several positions (shared weights); a
    compressed emulator block is prepared by its compression method (int8: ``Int8Linear``),
    one with a harmonizer gets it.
    """
    from ..emulators import BLOCK_PREPARERS

    with init_empty_weights(include_buffers=False):
        model = AUTO_CLASSES[task].from_config(config)
    arch = resolve(use_family(model, family))
    modules = arch.blocks(model)
    blocks = unkeyed({**emulator, **adapter})
    state = dict(shared)
    first_position: dict[int, int] = {}
    for position, index in enumerate(plan.order):
        if index not in blocks:
            raise UserError(f"bundle: block {index} is missing from the emulator/adapter files")
        if index in first_position:
            modules[position] = modules[first_position[index]]
            continue
        first_position[index] = position
        for method in BLOCK_PREPARERS:
            method.prepare_block(modules[position], blocks[index])
        for path, tensor in blocks[index].items():
            state[f"{arch.blocks_path}.{position}.{path}"] = tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UserError(f"bundle: tensors {result.unexpected_keys[:3]} do not fit a "
                        f"{config.model_type} model; the bundle is corrupted or foreign")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise UserError(f"bundle: no weights for {still_empty[:3]}; the bundle is incomplete")
    model.config.use_cache = False
    return model.eval()


def _content_hash(path: Path, info: BundleInfo, emulator: dict, shared: dict) -> str:
    return frozen_hash((path / "config.json").read_text(), info.plan, emulator, shared)


def content_hash(bundle_dir: str | Path, emulator: dict | None = None,
                 shared: dict | None = None) -> str:
    """The hash of what ``bundle_dir`` holds (not its metadata's), from its tensor files, or
    from the ``emulator`` / ``shared`` tensors just written into it (saves reading them)."""
    info = read_info(bundle_dir)
    if emulator is None:
        emulator = load_tensors(info.path / "emulator.safetensors")
    if shared is None:
        shared = load_tensors(info.path / "shared.safetensors")
    return _content_hash(info.path, info, emulator, shared)


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> tuple[torch.nn.Module, BundleInfo]:
    """The data owner's runnable emulated model (adapter = the bundle's initial adapter)."""
    from transformers import AutoConfig

    info = read_info(bundle_dir)
    path = info.path
    config = AutoConfig.from_pretrained(path)
    emulator = load_tensors(path / "emulator.safetensors")
    shared = load_tensors(path / "shared.safetensors")
    adapter = load_tensors(path / "adapter.safetensors")
    if verify:
        actual = _content_hash(path, info, emulator, shared)
        if actual != info.bundle_hash:
            raise UserError(f"--bundle: {path} content hash {actual[:12]} does not match its "
                            f"metadata ({info.bundle_hash[:12]}); the bundle was modified or "
                            "corrupted, fetch it again from the model owner")
    model = build_emulated_model(config, info.plan, shared, emulator, adapter, info.task,
                                 info.family)
    return model, info
