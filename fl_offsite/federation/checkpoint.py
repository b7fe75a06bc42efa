"""The model owner's checkpoint: everything needed to continue a run after its last round.

``RUN_DIR/checkpoint.safetensors`` holds the global adapter and the strategy's state
(server-optimizer moments) as tensors, and as metadata the round, the byte counters, which
data owner holds which bundle version (so nothing is sent twice after a resume) and a
fingerprint of the config and bundle. It is written atomically after every round, so a crash
leaves the last complete round; a checkpoint of another run or config is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from strategies.state import export_state, import_state

from ..offsite.adapter import Adapter
from ..config import Config
from ..errors import UserError
from ..fileio import load_tensors, save_tensors

FILE = "checkpoint.safetensors"
# keys that may change when a run is resumed (more rounds, other machine or resources)
RESUMABLE = {"rounds", "round_timeout", "connect_timeout", "keep_checkpoints", "ray_address",
             "resources"}


def fingerprint(cfg: Config, bundle_hash: str) -> str:
    fixed = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUMABLE}
    return hashlib.sha256((json.dumps(fixed, sort_keys=True) + bundle_hash).encode()).hexdigest()


@dataclass
class RunState:
    round: int
    adapter: Adapter
    bytes_down_total: int
    bytes_up_total: int
    delivered: dict[str, str] = field(default_factory=dict)  # data owner -> bundle hash held


def save(run_dir: Path, state: RunState, strategy, print_: str) -> None:
    strategy_tensors, kinds = export_state(strategy)
    tensors = {**{f"adapter/{k}": v for k, v in state.adapter.tensors.items()},
               **{f"strategy/{k}": v for k, v in strategy_tensors.items()}}
    meta = {"round": state.round, "bytes_down_total": state.bytes_down_total,
            "bytes_up_total": state.bytes_up_total, "delivered": state.delivered,
            "fingerprint": print_,
            "adapter": state.adapter.meta(), "strategy": kinds}
    save_tensors(run_dir / FILE, tensors, metadata={"fl_offsite_checkpoint": json.dumps(meta)})


def _read_meta(run_dir: Path) -> dict:
    path = run_dir / FILE
    if not path.is_file():
        raise UserError(f"--resume: {run_dir} has no {FILE}; the run finished no round, "
                        "start it again")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["fl_offsite_checkpoint"])
            for key in f.keys():  # reads every tensor: a truncated file fails here
                f.get_tensor(key)
    except Exception:
        raise UserError(f"--resume: {path} is corrupted (not a readable fl-offsite "
                        "checkpoint); resume from a copy or start a new run") from None
    return meta


def check(run_dir: Path, print_: str) -> dict:
    """The checkpoint's metadata, if it is this run's; a clear error otherwise."""
    meta = _read_meta(run_dir)
    if meta["fingerprint"] != print_:
        raise UserError(f"--resume: {run_dir / FILE} belongs to another run (its config or "
                        "bundle differs); only rounds, round_timeout, keep_checkpoints, "
                        "resources and ray_address may change on resume")
    return meta


def load(run_dir: Path, strategy, print_: str) -> RunState:
    """The saved state, restored into ``strategy``."""
    meta = check(run_dir, print_)
    tensors = load_tensors(run_dir / FILE)
    a = meta["adapter"]
    adapter = Adapter({k[len("adapter/"):]: v for k, v in tensors.items()
                       if k.startswith("adapter/")}, a["kind"], a["bundle_hash"],
                      a["source_hash"], tuple(a["indices"]), a.get("lora") or {})
    import_state(strategy, {k[len("strategy/"):]: v for k, v in tensors.items()
                            if k.startswith("strategy/")}, meta["strategy"])
    return RunState(meta["round"], adapter, meta["bytes_down_total"], meta["bytes_up_total"],
                    meta.get("delivered", {}))
