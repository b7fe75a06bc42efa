"""The data owner: receive the bundle once, then train the adapter on its own data each round.

State that must outlive one message lives in this process, keyed by content:

- ``_EMULATED``: emulated models by bundle hash (built once per process, reused every round,
  whichever virtual node the process is serving);
- ``_DATA``: prepared training items by (data, partition) key.

``context.state`` holds only the bundle hash and its directory (a few bytes), so a node that
lands in a fresh process finds its bundle on disk without asking the model owner again, and
with DP-SGD the node's (noise, sample rate, steps) per round, for its epsilon over the run.
Before loading a bundle and before training, a node checks that it fits in memory
(``memory.py``) and answers with a clear error if not.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from ..offsite.emulated import EmulatedModel
from ..config.sections import FaultsConfig
from ..errors import UserError
from ..models.loading import load_processor
from ..training.config import TrainConfig
from ..training.loop import train
from . import memory, protocol

_EMULATED: dict[str, EmulatedModel] = {}
_PROCESSORS: dict[str, object] = {}
_DATA: dict[tuple, list] = {}


def cache_root(context: Context) -> Path:
    """Where this node keeps bundles: node config ``cache-dir``, $FL_OFFSITE_CACHE, or ~/.cache."""
    configured = context.node_config.get("cache-dir") or os.environ.get("FL_OFFSITE_CACHE")
    return Path(configured or Path.home() / ".cache" / "fl-offsite") / "bundles"


def node_name(context: Context) -> str:
    """Stable name of this data owner: ``node-name`` in its node config, or its partition id."""
    name = context.node_config.get("node-name", context.node_config.get("partition-id"))
    return str(context.node_id if name is None else name)


def hello(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": ConfigRecord({"name": node_name(context)})}), reply_to=msg)


def receive_bundle(msg: Message, context: Context) -> Message:
    meta = msg.content["bundle"]
    bundle_hash = protocol.checked_hash(meta["hash"])
    if "base" in meta:  # a re-aligned emulator: rebuild from the cached version
        base = _cached_bundle(protocol.checked_hash(meta["base"]), context)
        bundle_dir = cache_root(context) / bundle_hash
        protocol.apply_bundle_delta(msg.content, base.info.path, bundle_dir)
        _EMULATED.pop(base.info.bundle_hash, None)  # other nodes still on it reload from disk
    elif "path" in meta:  # shared-path: nothing in the message, the files are read in place
        bundle_dir = Path(str(meta["path"]))
    else:
        bundle_dir = cache_root(context) / bundle_hash
        protocol.write_bundle_content(msg.content, bundle_dir)
    if bundle_hash not in _EMULATED:  # will it fit? (memory.py) a clean error reply if not
        memory.check_data_owner(memory.bundle_estimate(bundle_dir), context.node_config,
                                who=f"data owner {node_name(context)}")
    # load now, so a bad bundle fails here; a copy written from the message was hash-checked
    # before it was kept (protocol.py), one read in place from the shared path is checked now
    emulated_model(bundle_hash, bundle_dir, verify="path" in meta)
    context.state["bundle"] = ConfigRecord({"hash": bundle_hash, "path": str(bundle_dir)})
    # the receipt: what reached this data owner, by message or read from the shared path
    received = protocol.bundle_size(bundle_dir) if "path" in meta else \
        protocol.content_bytes(msg.content)
    return Message(RecordDict({"bundle": ConfigRecord({"hash": bundle_hash, "bytes": received})}),
                   reply_to=msg)


def emulated_model(bundle_hash: str, bundle_dir: Path, verify: bool = True) -> EmulatedModel:
    if bundle_hash not in _EMULATED:
        emulated = EmulatedModel(bundle_dir, verify=verify)  # verify: the content hash
        if emulated.info.bundle_hash != bundle_hash:
            raise UserError(f"bundle: {bundle_dir} has hash {emulated.info.bundle_hash[:12]}, "
                            f"the model owner announced {bundle_hash[:12]}; refusing it")
        _EMULATED[bundle_hash] = emulated
        _PROCESSORS[bundle_hash] = load_processor(str(bundle_dir))
    return _EMULATED[bundle_hash]


def _cached_bundle(bundle_hash: str, context: Context, task: dict | None = None
                   ) -> EmulatedModel:
    """The bundle with this hash: in memory, where this node was told it is, or (a node
    restarted with a resumed run) in its own cache or at the model owner's shared path; else
    the error that makes the model owner send it again."""
    if bundle_hash in _EMULATED:
        return _EMULATED[bundle_hash]
    known = context.state.get("bundle")
    if known is not None and known["hash"] == bundle_hash and Path(str(known["path"])).is_dir():
        return emulated_model(bundle_hash, Path(str(known["path"])))
    shared = (task or {}).get("bundle_path")
    for candidate in [cache_root(context) / bundle_hash] + ([Path(shared)] if shared else []):
        if (candidate / "offsite.json").is_file():
            try:
                emulated = emulated_model(bundle_hash, candidate)  # checks the content hash
            except UserError:
                continue
            context.state["bundle"] = ConfigRecord({"hash": bundle_hash, "path": str(candidate)})
            return emulated
    raise RuntimeError(f"{protocol.MISSING_BUNDLE} {bundle_hash[:12]}")


def _check_memory(bundle_hash: str, task: dict, context: Context) -> None:
    """Refuse, with a clean error reply, a round this data owner lacks memory for."""
    if bundle_hash in _EMULATED:
        bundle_dir = _EMULATED[bundle_hash].info.path
    else:
        known = context.state.get("bundle")
        if known is None or known["hash"] != bundle_hash:
            return  # _cached_bundle reports the missing bundle
        bundle_dir = Path(str(known["path"]))
    if not (Path(bundle_dir) / "config.json").is_file():
        return
    estimate = memory.bundle_estimate(bundle_dir, task)
    memory.check_data_owner(estimate, context.node_config,
                            resident=estimate.weights if bundle_hash in _EMULATED else 0,
                            who=f"data owner {node_name(context)}")


def _dpsgd_metrics(spent: dict, delta: float, context: Context) -> dict:
    """This round's DP-SGD steps joined to this node's earlier ones (``context.state``, for
    the run); the reply's epsilons come from Opacus' RDP accountant."""
    from ..training.dpsgd import epsilon

    old = context.state.get("dp-sgd")
    history = list(zip(old["noise"], old["rate"], old["steps"])) if old is not None else []
    history.append((spent["noise_multiplier"], spent["sample_rate"], spent["steps"]))
    context.state["dp-sgd"] = ConfigRecord({"noise": [float(h[0]) for h in history],
                                            "rate": [float(h[1]) for h in history],
                                            "steps": [int(h[2]) for h in history]})
    return {"dp-epsilon": epsilon(history, delta), "dp-epsilon-round": spent["epsilon"],
            "dp-sample-rate": spent["sample_rate"], "dp-steps": spent["steps"]}


def _training_items(task: dict, context: Context, processor) -> list:
    """This node's examples: its own ``data-path`` (deployment) or its simulated partition."""
    from ..training import data
    from .partition import partition

    own = context.node_config.get("data-path")
    part = task["partition"]
    if own:
        key = (str(own), task["block_size"])
    else:
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
        key = (task["data"], task["block_size"], json.dumps(part, sort_keys=True), num, pid)
    if key not in _DATA:
        ds = data.load_split(str(own or task["data"]), "train")
        if not own:
            ds = partition(ds, num, pid, part["name"], part["by"], part["alpha"],
                           part["shards_per_client"], part["seed"])
        if task.get("max_train_examples"):
            ds = ds.select(range(min(len(ds), task["max_train_examples"])))
        _DATA[key] = data.prepare_dataset(ds, processor, task["block_size"]).train_items
    return _DATA[key]


INFLATED_COUNT = 10**9  # what a lying data owner claims in the drill


def injected_fault(faults: dict, server_round: int, who: int) -> str | None:
    """The fault the drill injects into data owner ``who`` in ``server_round``, if any.

    One seeded draw per (round, owner); the kinds take consecutive slices of [0, 1).
    """
    draw = random.Random(f"{faults.get('seed', 0)}-{server_round}-{who}").random()
    edge = 0.0
    for kind in FaultsConfig.KINDS:
        edge += faults.get(kind, 0.0)
        if draw < edge:
            return kind
    return None


def _corrupt(tensors: dict, kind: str) -> dict:
    """An upload broken the way the fault drill asks."""
    key = sorted(tensors)[0]
    tensors = dict(tensors)
    if kind == "nan_update":
        tensors[key] = tensors[key].clone().fill_(float("nan"))
    elif kind == "wrong_shape":
        tensors[key] = tensors[key].reshape(-1)[:-1].clone()
    elif kind == "huge_norm":
        tensors = {k: v * 1e6 for k, v in tensors.items()}
    return tensors


def _hang_past_deadline(msg: Message, round_timeout: float) -> None:
    """Fault drill: stay silent until the model owner has stopped waiting (its deadline counts
    from when it sent the message, not from when this worker picked it up), then give up
    without training, so the worker is free for the next round."""
    now = time.time()
    sent = float(msg.metadata.created_at or now)
    if not now - round_timeout <= sent <= now:  # another machine's clock: count from now
        sent = now
    time.sleep(sent + round_timeout + 1.0 - now)
    raise RuntimeError("fault drill: hung past the round's deadline")


def train_adapter(msg: Message, context: Context) -> Message:
    start = time.time()
    cfg = msg.content["config"]
    task = json.loads(str(cfg["task"]))
    who = int(context.node_config.get("partition-id", context.node_id))
    fault = injected_fault(task.get("faults") or {}, int(cfg.get("server-round", 0)), who)
    if fault == "crash":
        raise RuntimeError(f"fault drill: injected crash (node {who})")
    if fault == "hang":
        _hang_past_deadline(msg, float(task["round_timeout"]))
    if fault == "die":  # no exception, no cleanup: like an out-of-memory kill
        os._exit(1)
    bundle_hash = str(cfg["bundle-hash"])
    _check_memory(bundle_hash, task, context)
    emulated = _cached_bundle(bundle_hash, context, task)
    processor = _PROCESSORS[bundle_hash]
    tuning = task["tuning"]
    lora = tuning.get("lora")
    emulated.prepare(tuning["kind"], lora, seed=task["seed"])
    template = emulated.adapter()
    received = protocol.record_tensors(msg.content["arrays"])
    global_tensors = {k: v.to(template.tensors[k].dtype) if k in template.tensors else v
                      for k, v in received.items()}  # bfloat16 travels as float32
    emulated.set_adapter(template.with_tensors(global_tensors))
    items = _training_items(task, context, processor)
    round_seed = task["seed"] + 1000 * int(cfg.get("server-round", 0)) + \
        int(context.node_config.get("partition-id", 0))
    train_cfg = TrainConfig(**task["train"])
    prox_mu = float(cfg.get("proximal-mu", 0.0))
    pad_id = getattr(processor, "pad_token_id", 0) or 0
    dp = task.get("dp") or {}
    if dp.get("mode") == "dpsgd":  # per-example clipping and noise while training (dpsgd.py)
        from ..training.dpsgd import train_dpsgd
        stats = train_dpsgd(emulated.model, items, train_cfg, dp["noise_multiplier"],
                            dp["max_grad_norm"], dp["delta"], pad_id, round_seed, prox_mu)
    else:
        stats = train(emulated.model, items, train_cfg, pad_id, round_seed, prox_mu)
    trained = emulated.adapter()
    if dp and dp.get("mode", "update") == "update":
        from .privacy import privatize
        trained = trained.with_tensors(privatize(trained.tensors, global_tensors,
                                                 dp["clip_norm"], dp["noise_multiplier"]))
    if fault in FaultsConfig.CORRUPTED_UPLOADS:
        trained = trained.with_tensors(_corrupt(trained.tensors, fault))
    claimed = INFLATED_COUNT if fault == "inflated_count" else len(items)
    metrics = MetricRecord({"num-examples": claimed, "train_loss": stats["train_loss"],
                            "train_loss_last": stats["train_loss_last"],
                            "steps": stats["steps"], "seconds": time.time() - start,
                            **(_dpsgd_metrics(stats["dp"], dp["delta"], context)
                               if "dp" in stats else {})})
    return Message(RecordDict({"arrays": protocol.adapter_record(trained), "metrics": metrics}),
                   reply_to=msg)
