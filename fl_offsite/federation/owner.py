"""The model owner in a federated run: the full model, the bundle it ships, the emulator copy
that measures the privacy gap, the evaluation data, and per-round re-alignment."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import Config
from ..errors import UserError
from ..fileio import load_tensors, tensors_hash
from ..models.families import resolve
from ..models.loading import load_model, load_processor, resolve_device
from ..offsite import adapter as adapters
from ..offsite.adapter import Adapter
from ..offsite.bundle import keyed, split_state, write_bundle
from ..offsite.owner import build_bundle
from ..offsite.emulated import EmulatedModel
from ..training import data
from ..training.evaluate import evaluate


class ModelOwner:
    """The full model, its bundle, the emulator copy for measuring the gap, and the eval data."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg = cfg
        self.bundle_dir = Path(cfg.bundle) if cfg.bundle else run_dir / "bundle"
        # a resumed run reuses the bundle its first start wrote (atomically); one that needs
        # no forward pass is read in parts from the checkpoint (offsite/owner.py)
        if not cfg.bundle and not (resume and (self.bundle_dir / "offsite.json").is_file()):
            build_bundle(cfg.model, self.bundle_dir, cfg.split, cfg.dtype, family=cfg.family)
        self.model = load_model(cfg.model, cfg.dtype, cfg.family)
        self.arch = resolve(self.model)
        self.processor = load_processor(cfg.model)
        shared, blocks = split_state(self.model, self.arch)
        self.device = resolve_device(cfg.owner_device)
        self.model.to(self.device)
        self.emulated = EmulatedModel(self.bundle_dir)
        self.emulated.model.to(self.device)
        self.info = self.emulated.info
        if tensors_hash(shared) != self.info.source_hash:
            raise UserError(f"bundle: {self.bundle_dir} was not built from {cfg.model}; "
                            "remove the bundle key to build a fresh one")
        self.pristine = Adapter({k: v.clone() for k, v in keyed(blocks, self.info.plan.adapter)
                                 .items()}, "blocks", self.info.bundle_hash,
                                self.info.source_hash, self.info.plan.adapter)
        lora = None
        if cfg.tuning.kind == "lora":
            lora = adapters.lora_config(self.arch, cfg.tuning.lora_r, cfg.tuning.lora_alpha,
                                        cfg.tuning.lora_dropout)
        self.lora = lora
        self.initial = self.emulated.prepare(cfg.tuning.kind, lora, seed=cfg.seed)
        self.eval_data = data.prepare(cfg.data.path, cfg.data.eval_split, self.processor,
                                      cfg.data.block_size, cfg.data.max_eval_examples)
        self.public = None  # public text for re-alignment, loaded when first needed

    def plugin_metrics(self, adapter: Adapter | None) -> dict:
        """Metrics of the full model with ``adapter`` plugged in (None: zero-shot)."""
        order = tuple(range(self.info.plan.depth))
        adapters.load_into(self.model, self.arch, order, self.pristine)
        if adapter is not None:
            adapters.plug(self.model, self.arch, adapter)
        return evaluate(self.model, self.eval_data, self.processor)

    def emulator_metrics(self, adapter: Adapter) -> dict:
        self.emulated.set_adapter(adapter)
        return evaluate(self.emulated.model, self.eval_data, self.processor)

    def use_bundle(self, bundle_dir: Path) -> None:
        """Switch to another version of the bundle (a re-aligned emulator)."""
        self.bundle_dir = bundle_dir
        self.emulated = EmulatedModel(bundle_dir)
        self.emulated.model.to(self.device)
        self.info = self.emulated.info
        self.emulated.prepare(self.cfg.tuning.kind, self.lora, seed=self.cfg.seed)

    def realign(self, adapter: Adapter, rnd: int, run_dir: Path) -> tuple[Adapter, dict]:
        """Re-distil the emulator against the full model with ``adapter`` plugged in
        (FedBiOT-style), write that bundle version and switch to it. Returns the adapter,
        re-stamped for the new bundle, and the distillation report."""
        from ..emulators.distill import Objective, distill, emulated_from_full
        from ..emulators.pipeline import public_items

        if self.public is None:
            self.public = public_items(self.cfg.split.distill, self.processor)
        plan, d, r = self.info.plan, self.cfg.split.distill, self.cfg.realign
        order = tuple(range(plan.depth))
        adapters.load_into(self.model, self.arch, order, self.pristine)
        adapters.plug(self.model, self.arch, adapter)
        student = emulated_from_full(self.model, self.arch, plan,
                                     load_tensors(self.bundle_dir / "emulator.safetensors"))
        tensors, report = distill(self.model, student, self.arch, plan, *self.public,
                                  Objective.from_config(plan, d), r.steps, r.lr, d.batch_size,
                                  eval_every=r.steps, seed=d.seed + rnd,
                                  pad_id=getattr(self.processor, "pad_token_id", 0) or 0,
                                  autocast=d.mixed_precision == "bf16")
        adapters.load_into(self.model, self.arch, order, self.pristine)
        record = {**self.info.emulator, "realigned_after_round": rnd, "realign": report}
        target = run_dir / "bundles" / f"round-{rnd:04d}"
        write_bundle(self.model, plan, target, self.cfg.model, self.processor, tensors,
                     record=record, overwrite=True)
        self.use_bundle(target)
        return replace(adapter, bundle_hash=self.info.bundle_hash), report

    def task(self) -> dict:
        """What every data owner needs to know to train (sent as JSON in each train message)."""
        cfg = self.cfg
        return {
            "data": cfg.data.path, "block_size": cfg.data.block_size,
            "max_train_examples": cfg.data.max_train_examples,
            "partition": cfg.partition.model_dump(),
            "tuning": {"kind": cfg.tuning.kind, "lora": self.lora},
            "train": cfg.train.model_dump(),
            "seed": cfg.seed,
            "faults": cfg.faults.model_dump(),
            "dp": cfg.dp.model_dump() if cfg.dp.active else None,
            "round_timeout": cfg.round_timeout,
            # where a restarted data owner finds the bundle without it being sent again
            "bundle_path": str(self.bundle_dir) if cfg.bundle_transport == "shared-path"
            else None,
        }


def realigned_bundle(run_dir: Path, bundle_hash: str) -> Path:
    """The re-aligned bundle version with ``bundle_hash`` in ``run_dir`` (for --resume)."""
    from ..offsite.bundle import read_info

    for candidate in sorted((run_dir / "bundles").glob("round-*")):
        if read_info(candidate).bundle_hash == bundle_hash:
            return candidate
    raise UserError(f"--resume: the checkpoint's adapter belongs to bundle {bundle_hash[:12]}, "
                    f"which is not in {run_dir / 'bundles'}; start a new run")


