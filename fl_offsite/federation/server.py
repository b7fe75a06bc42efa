"""The model owner's federation loop: a plain function shared by every way of running it.

``run_federation(grid, cfg, run_dir)`` is called by the ServerApp, whether the run is an
in-process simulation (``fl-offsite simulate``), ``flwr run .`` or a real deployment. Flower
strategies do the sampling and the aggregation; this loop adds what offsite-tuning needs
around them: ship the bundle once per data owner, count traffic, plug the aggregate into the
full model and evaluate it (and the emulator) every round, and record everything.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from strategies.validation import screen, update_norm

from ..offsite import adapter as adapters
from ..training import data
from ..offsite.adapter import Adapter
from ..models.families import resolve
from ..offsite.bundle import keyed, split_state, write_bundle
from ..config import Config, dump
from ..offsite.emulated import EmulatedModel
from ..errors import UserError
from ..training.evaluate import evaluate
from ..fileio import load_tensors, tensors_hash
from ..models.loading import load_model, load_processor
from ..emulators.pipeline import make_emulator
from . import checkpoint, protocol, secagg
from .tracking import RunLog


class ModelOwner:
    """The full model, its bundle, the emulator copy for measuring the gap, and the eval data."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg = cfg
        self.model = load_model(cfg.model, cfg.dtype)
        self.arch = resolve(self.model)
        self.processor = load_processor(cfg.model)
        shared, blocks = split_state(self.model, self.arch)
        self.bundle_dir = Path(cfg.bundle) if cfg.bundle else run_dir / "bundle"
        # a resumed run reuses the bundle its first start wrote (atomically)
        if not cfg.bundle and not (resume and (self.bundle_dir / "offsite.json").is_file()):
            plan, emulator, record = make_emulator(self.model, self.processor, cfg.split)
            write_bundle(self.model, plan, self.bundle_dir, cfg.model, self.processor, emulator,
                         cfg.split.compression, record)
        self.emulated = EmulatedModel(self.bundle_dir)
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
        self.info = self.emulated.info
        self.emulated.prepare(self.cfg.tuning.kind, self.lora, seed=self.cfg.seed)

    def realign(self, adapter: Adapter, rnd: int, run_dir: Path) -> tuple[Adapter, dict]:
        """Re-distil the emulator against the full model with ``adapter`` plugged in
        (FedBiOT-style), write that bundle version and switch to it. Returns the adapter,
        re-stamped for the new bundle, and the distillation report."""
        from ..emulators.distill import distill, emulated_from_full
        from ..emulators.pipeline import public_items

        if self.public is None:
            self.public = public_items(self.cfg.split.distill, self.processor)
        plan, d, r = self.info.plan, self.cfg.split.distill, self.cfg.realign
        order = tuple(range(plan.depth))
        adapters.load_into(self.model, self.arch, order, self.pristine)
        adapters.plug(self.model, self.arch, adapter)
        student = emulated_from_full(self.model, self.arch, plan,
                                     load_tensors(self.bundle_dir / "emulator.safetensors"))
        tensors, report = distill(self.model, student, self.arch, plan, *self.public, r.steps,
                                  r.lr, d.batch_size, d.kd_weight, d.lm_weight, d.layer_weight,
                                  eval_every=r.steps, seed=d.seed + rnd,
                                  pad_id=getattr(self.processor, "pad_token_id", 0) or 0)
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
        }


def _realign(owner: ModelOwner, current: Adapter, rnd: int, run_dir: Path, cfg: Config) -> dict:
    """Re-align the emulator after round ``rnd``; what the round record says about it."""
    started = time.time()
    adapter, report = owner.realign(current, rnd, run_dir)
    print(f"round {rnd}: re-aligned the emulator, held-out nmse "
          f"{report['held_out_before']['nmse']:.4f} -> {report['held_out_best']['nmse']:.4f}",
          flush=True)
    return {"bundle_hash": owner.info.bundle_hash, "path": str(owner.bundle_dir),
            "nmse_before": report["held_out_before"]["nmse"],
            "nmse_after": report["held_out_best"]["nmse"],
            "delta_bytes": protocol.delta_size(owner.bundle_dir),
            "emulator": owner.emulator_metrics(adapter) if cfg.evaluate_emulator else {},
            "seconds": time.time() - started}


def _privacy_spent(rounds: list[dict], dp, replies: list[Message], node_name) -> dict:
    """(epsilon, delta) of the data owner that has uploaded most often so far (``update``), or
    the data owners' DP-SGD accounting (``dpsgd``)."""
    from collections import Counter

    if dp.mode == "dpsgd":
        return _dpsgd_spent(rounds, dp, replies, node_name)

    from .privacy import epsilon

    counts = Counter(name for r in rounds for name in r.get("participants", []))
    most = max(counts.values(), default=0)
    return {"epsilon": epsilon(most, dp.noise_multiplier, dp.delta), "delta": dp.delta,
            "max_participations": most}


def _dpsgd_spent(rounds: list[dict], dp, replies: list[Message], node_name) -> dict:
    """``epsilon``: the largest a data owner of this round reported (its own RDP accountant, over
    its rounds in this run); ``epsilon_run``: the largest over every data owner so far,
    recounted here from the (sample rate, steps) each reported per round in ``owners``, so a
    resumed run (whose data owners start new accountants) still counts earlier rounds. An
    infinite epsilon (no noise) is written as null."""
    import math
    from collections import defaultdict

    from ..training.dpsgd import epsilon

    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
    owners = {}
    for reply in replies:
        metrics = reply.content["metrics"]
        if "dp-steps" in metrics:
            owners[node_name(reply.metadata.src_node_id)] = {
                "epsilon": float(metrics["dp-epsilon"]),
                "sample_rate": float(metrics["dp-sample-rate"]),
                "steps": int(metrics["dp-steps"])}
    history = defaultdict(list)
    for record in rounds + [{"dp": {"owners": owners}}]:
        for who, spent in ((record.get("dp") or {}).get("owners") or {}).items():
            history[who].append((dp.noise_multiplier, spent["sample_rate"], spent["steps"]))
    reported = max((o["epsilon"] for o in owners.values()), default=math.nan)
    run = max((epsilon(h, dp.delta) for h in history.values()), default=0.0)
    for spent in owners.values():
        spent["epsilon"] = finite(spent["epsilon"])
    return {"mode": "dpsgd", "epsilon": finite(reported), "epsilon_run": finite(run),
            "delta": dp.delta, "noise_multiplier": dp.noise_multiplier,
            "max_grad_norm": dp.max_grad_norm, "owners": owners}


def _failure(reply: Message) -> str:
    """The data owner's own error line out of Flower's error reason (which adds tracebacks)."""
    lines = [line.strip() for line in (reply.error.reason or "").splitlines() if line.strip()]
    said = [line.split("Message: ", 1)[1].removesuffix("'>") for line in lines
            if "Message: " in line]
    return (said or lines or [f"error code {reply.error.code}"])[-1][:500]


def _upload_bytes(reply: Message) -> int:
    return sum(protocol.record_bytes(a) for a in reply.content.array_records.values())


def _train_losses(replies: list[Message]) -> dict:
    losses = [float(r.content["metrics"]["train_loss"]) for r in replies]
    if not losses:
        return {}
    return {"mean": sum(losses) / len(losses), "min": min(losses), "max": max(losses)}


class NodeDirectory:
    """Stable names of the connected data owners (asked once per node with ``query.hello``).

    Flower's node ids are random per run; ordering nodes by name makes sampling (Flower's
    ``random.sample`` over ``get_node_ids()``) and aggregation order reproducible for a seed.
    """

    def __init__(self, grid: Grid, timeout: float):
        self.grid = grid
        self.timeout = timeout
        self.names: dict[int, str] = {}

    def refresh(self, wanted: int) -> None:
        """Learn the names of new nodes; waits until at least ``wanted`` are known."""
        deadline = time.time() + self.timeout
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in self.names]
            if new:
                messages = [Message(RecordDict(), dst_node_id=n,
                                    message_type=f"query.{protocol.HELLO_ACTION}") for n in new]
                for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
                    if not reply.has_error():
                        self.names[reply.metadata.src_node_id] = str(reply.content["node"]["name"])
            if len(self.names) >= wanted:
                return
            if time.time() > deadline:
                raise RuntimeError(f"only {len(self.names)} of {wanted} data owners answered "
                                   f"within connect_timeout={self.timeout}s")
            time.sleep(0.5)

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, str(node_id))

    def key(self, node_id: int):
        name = self.name(node_id)
        return (0, int(name)) if name.isdigit() else (1, name)

    def get_node_ids(self) -> list[int]:
        """What Flower's samplers see: the named nodes, in name order."""
        return sorted(self.names, key=self.key)

    def __getattr__(self, attr):  # everything else is the real Grid
        return getattr(self.grid, attr)


class BundleShipper:
    """Sends the bundle to each data owner once, and after a re-alignment only the new
    emulator (a delta of the version the data owner has); remembers who has which version."""

    def __init__(self, owner: ModelOwner, transport: str, timeout: float):
        self.owner = owner
        self.transport = transport
        self.timeout = timeout
        self.delivered: dict[int, str] = {}  # node id -> bundle hash it holds
        self.size = protocol.bundle_size(owner.bundle_dir)
        self._content: dict[tuple, RecordDict] = {}

    def ship(self, grid: Grid, node_ids: set[int]) -> tuple[set[int], int, int, int]:
        """Bring those of ``node_ids`` that lack the current version up to date; returns
        (failed nodes, full bundles sent, deltas sent, bytes sent)."""
        current = self.owner.info.bundle_hash
        missing = sorted(n for n in node_ids if self.delivered.get(n) != current)
        if not missing:
            return set(), 0, 0, 0
        messages, full, deltas, sent = [], 0, 0, 0
        for n in missing:
            base = self.delivered.get(n)
            messages.append(Message(self._payload(base), dst_node_id=n,
                                    message_type=f"query.{protocol.BUNDLE_ACTION}"))
            size = int(messages[-1].content["bundle"]["bytes"])
            full, deltas, sent = full + (base is None), deltas + (base is not None), sent + size
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
        self.delivered.update({n: current for n in ok})
        return set(missing) - ok, full, deltas, sent

    def _payload(self, base: str | None) -> RecordDict:
        info = self.owner.info
        key = (info.bundle_hash, base)
        if key not in self._content:
            self._content[key] = protocol.bundle_content(
                self.owner.bundle_dir, info.bundle_hash, self.transport) if base is None else \
                protocol.bundle_delta_content(self.owner.bundle_dir, info.bundle_hash, base)
        return self._content[key]

    def forget(self, node_id: int) -> None:
        self.delivered.pop(node_id, None)


def realigned_bundle(run_dir: Path, bundle_hash: str) -> Path:
    """The re-aligned bundle version with ``bundle_hash`` in ``run_dir`` (for --resume)."""
    from ..offsite.bundle import read_info

    for candidate in sorted((run_dir / "bundles").glob("round-*")):
        if read_info(candidate).bundle_hash == bundle_hash:
            return candidate
    raise UserError(f"--resume: the checkpoint's adapter belongs to bundle {bundle_hash[:12]}, "
                    f"which is not in {run_dir / 'bundles'}; start a new run")


def run_federation(grid: Grid, cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Run all rounds (with ``resume``: those after the checkpoint); returns the summary (also
    in ``run_dir/summary.json``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = ModelOwner(cfg, run_dir, resume)
    log = RunLog(run_dir, dump(cfg), owner.eval_data.kind)
    try:
        _rounds(grid, cfg, run_dir, owner, log, resume)
    finally:
        log.close()
    return log.summary


def _rounds(grid: Grid, cfg: Config, run_dir: Path, owner: ModelOwner, log: RunLog,
            resume: bool) -> None:
    strategy = cfg.strategy.build(cfg.num_clients, cfg.clients_per_round)
    nodes = NodeDirectory(grid, cfg.connect_timeout)
    shipper = BundleShipper(owner, cfg.bundle_transport, cfg.connect_timeout)
    run_print = checkpoint.fingerprint(cfg, owner.info.bundle_hash)
    if resume:
        state = checkpoint.load(run_dir, strategy, run_print)
        log.resume(state.round, state.bytes_down_total, state.bytes_up_total)
        current, first_round = state.adapter, state.round + 1
        if current.bundle_hash != owner.info.bundle_hash:  # a re-aligned emulator
            owner.use_bundle(realigned_bundle(run_dir, current.bundle_hash))
        print(f"resuming after round {state.round}", flush=True)
    else:
        current, first_round = owner.initial, 1
        log.start(owner.plugin_metrics(None), owner.emulator_metrics(current),
                  {"path": str(owner.bundle_dir), "hash": owner.info.bundle_hash,
                   "bytes": shipper.size, "notation": owner.info.plan.notation(),
                   "adapter_bytes": protocol.adapter_bytes(current)})
    train_config = protocol.task_config(owner.info.bundle_hash, owner.task())
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    for rnd in range(first_round, cfg.rounds + 1):
        start = time.time()
        nodes.refresh(cfg.clients_per_round)
        random.seed(cfg.seed * 100_003 + rnd)  # Flower samples nodes with `random`
        messages = list(strategy.configure_train(rnd, protocol.adapter_record(current),
                                                 train_config, nodes))
        sampled = {m.metadata.dst_node_id for m in messages}
        undelivered, bundles_sent, deltas_sent, bundle_bytes = shipper.ship(grid, sampled)
        messages = [m for m in messages if m.metadata.dst_node_id not in undelivered]
        bytes_down = bundle_bytes + protocol.adapter_bytes(current) * len(messages)
        sent_at = time.time()
        if cfg.secagg.enabled:  # SecAgg+: the model owner only ever sees the sum (secagg.py)
            secure = secagg.train_round(grid, messages, current, rnd, cfg)
            replies = secure.replies
            bytes_down = bundle_bytes + secure.bytes_down
        else:
            secure = None
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        seconds_clients = time.time() - sent_at
        replies.sort(key=lambda r: nodes.key(r.metadata.src_node_id))  # arrival order varies
        ok = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error() and protocol.MISSING_BUNDLE in (r.error.reason or ""):
                shipper.forget(r.metadata.src_node_id)
        bytes_up = secure.bytes_up if secure else sum(_upload_bytes(r) for r in ok)
        reference = protocol.record_tensors(protocol.adapter_record(current))
        valid, rejected = (ok, []) if secure else screen(ok, reference,
                                                         cfg.strategy.max_update_norm,
                                                         cfg.strategy.clip_norm)
        for rejection in rejected:
            print(f"round {rnd}: rejected the upload of data owner "
                  f"{nodes.name(rejection.node_id)}: {rejection.reason}",
                  flush=True)
        updated = len(valid) >= cfg.min_clients and (secure is None or bool(secure.aggregate))
        previous = current
        if updated:
            aggregated, _ = strategy.aggregate_train(rnd, secure.aggregate if secure else valid)
            tensors = {k: v.to(previous.tensors[k].dtype)
                       for k, v in protocol.record_tensors(aggregated).items()}
            current = previous.with_tensors(tensors)
        record = {
            "round": rnd,
            "plugin": owner.plugin_metrics(current),
            "emulator": owner.emulator_metrics(current) if cfg.evaluate_emulator else {},
            "clients_sampled": len(sampled),
            "clients_ok": len(valid),
            "clients_failed": len(sampled) - len(ok),
            "clients_rejected": len(rejected),
            "rejections": [{"node": nodes.name(r.node_id), "reason": r.reason}
                           for r in rejected],
            "failures": [{"node": nodes.name(r.metadata.src_node_id), "reason": _failure(r)}
                         for r in replies if r.has_error()],
            "updated": updated,
            "train_loss": _train_losses(valid),
            "update_norm": update_norm(current.tensors, previous.tensors),
            "participants": sorted(nodes.name(r.metadata.src_node_id) for r in ok),
            "bundles_sent": bundles_sent,
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
        }
        if deltas_sent:
            record["bundle_deltas_sent"] = deltas_sent
        if cfg.realign.every and rnd % cfg.realign.every == 0 and rnd < cfg.rounds:
            record["realign"] = _realign(owner, current, rnd, run_dir, cfg)
            current = replace(current, bundle_hash=owner.info.bundle_hash)
            train_config = protocol.task_config(owner.info.bundle_hash, owner.task())
        current.save(checkpoints / f"round-{rnd:04d}.safetensors")
        for old in sorted(checkpoints.glob("round-*.safetensors"))[:-cfg.keep_checkpoints]:
            old.unlink()
        current.save(run_dir / "adapter.safetensors")
        if secure:
            record["secagg"] = secure.info
        if cfg.dp.active:
            record["dp"] = _privacy_spent(log.summary["rounds"] + [record], cfg.dp, ok,
                                          nodes.name)
        record["seconds_clients"] = seconds_clients
        record["seconds"] = time.time() - start
        log.round(record, cfg.rounds)  # summary first: a checkpoint never runs ahead of it
        checkpoint.save(run_dir, checkpoint.RunState(rnd, current, log.bytes_down, log.bytes_up),
                        strategy, run_print)
