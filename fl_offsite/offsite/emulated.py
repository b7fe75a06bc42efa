"""The data owner's side: a bundle loaded into a runnable model whose adapter can be swapped.

One ``EmulatedModel`` is built per bundle and kept for as long as the process lives (the
federated client caches it), so each round only moves adapter tensors in and out.
"""

from __future__ import annotations

from pathlib import Path

from . import adapter as adapters
from .adapter import Adapter
from ..models.families import resolve
from .bundle import BundleInfo, load_bundle, read_info
from ..errors import UserError
from ..fileio import load_tensors


class EmulatedModel:
    def __init__(self, bundle_dir: str | Path, verify: bool = True):
        self.model, self.info = load_bundle(bundle_dir, verify=verify)
        self.arch = resolve(self.model)
        self.order = self.info.plan.order
        self.template: Adapter | None = None

    def prepare(self, kind: str = "blocks", lora: dict | None = None, seed: int = 0) -> Adapter:
        """Make the adapter of ``kind`` trainable; returns the initial adapter."""
        if self.template is not None:
            if self.template.kind != kind or (kind == "lora" and self.template.lora != lora):
                raise UserError(f"tuning: this bundle is already prepared for "
                                f"{self.template.kind!r}; load it again for {kind!r}")
            return self.adapter()
        if kind == "lora" and lora is None:
            lora = adapters.lora_config(self.arch)
        initial = adapters.initial_adapter(self.model, self.arch, self.order,
                                           self.info.plan.adapter, kind, self.info.bundle_hash,
                                           self.info.source_hash, lora, seed)
        self.template = initial.with_tensors({})
        return initial

    def adapter(self) -> Adapter:
        return adapters.extract(self.model, self.arch, self.order, self._template())

    def set_adapter(self, adapter: Adapter) -> None:
        template = self._template()
        if adapter.bundle_hash != self.info.bundle_hash:
            raise UserError("--adapter: belongs to a different bundle (bundle hash mismatch)")
        if adapter.kind != template.kind:
            raise UserError(f"--adapter: is a {adapter.kind!r} adapter, the model is prepared "
                            f"for {template.kind!r}; pass --tuning {adapter.kind}")
        adapters.load_into(self.model, self.arch, self.order, adapter)

    def _template(self) -> Adapter:
        if self.template is None:
            raise UserError("internal: call prepare() before using the adapter")
        return self.template


def bundle_adapter(bundle_dir: str | Path) -> Adapter:
    """The untouched adapter shipped in a bundle (full adapter blocks)."""
    info: BundleInfo = read_info(bundle_dir)
    return Adapter(load_tensors(Path(bundle_dir) / "adapter.safetensors"), "blocks",
                   info.bundle_hash, info.source_hash, info.plan.adapter)


def load_adapter(path: str | Path) -> Adapter:
    """An adapter file, or a bundle directory (its initial adapter)."""
    path = Path(path)
    if path.is_dir() and (path / "offsite.json").is_file():
        return bundle_adapter(path)
    return Adapter.load(path)
