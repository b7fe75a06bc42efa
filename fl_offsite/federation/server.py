"""The model owner's federation loop: a plain function shared by every way of running it.

``run_federation(grid, cfg, run_dir)`` is called by the ServerApp, whether the run is an
in-process simulation (``fl-offsite simulate``), ``flwr run .`` or a real deployment. Flower
strategies do the sampling and the aggregation; this loop adds what offsite-tuning needs
around them: ship the bundle once per data owner, count traffic, plug the aggregate into the
full model and evaluate it (and the emulator) every round, and record everything.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from flwr.serverapp import Grid

from strategies.validation import screen, update_norm

from ..config import Config, dump
from . import accounting, checkpoint, protocol, secagg
from .nodes import NodeDirectory
from .owner import ModelOwner, realigned_bundle
from .shipping import BundleShipper
from .tracking import RunLog


def _realign(owner: ModelOwner, current, rnd: int, run_dir: Path, cfg: Config) -> dict:
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


def run_federation(grid: Grid, cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Run all rounds (with ``resume``: those after the checkpoint); returns the summary (also
    in ``run_dir/summary.json``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = ModelOwner(cfg, run_dir, resume)
    log = RunLog(run_dir, dump(cfg), owner.eval_data.kind)
    try:
        Federation(grid, cfg, run_dir, owner, log).run(resume)
    finally:
        log.close()
    return log.summary


class Federation:
    """One run's rounds: sample, ship, train, screen, aggregate, evaluate, checkpoint."""

    def __init__(self, grid: Grid, cfg: Config, run_dir: Path, owner: ModelOwner, log: RunLog):
        self.grid, self.cfg, self.run_dir, self.owner, self.log = grid, cfg, run_dir, owner, log
        self.strategy = cfg.strategy.build(cfg.num_clients, cfg.clients_per_round)
        self.nodes = NodeDirectory(grid, cfg.connect_timeout)
        self.shipper = BundleShipper(owner, cfg.bundle_transport, cfg.connect_timeout,
                                     self.nodes.name)
        self.fingerprint = checkpoint.fingerprint(cfg, owner.info.bundle_hash)
        self.checkpoints = run_dir / "checkpoints"

    def run(self, resume: bool) -> None:
        current, first_round = self._resume() if resume else self._start()
        self.train_config = protocol.task_config(self.owner.info.bundle_hash, self.owner.task())
        self.checkpoints.mkdir(exist_ok=True)
        for rnd in range(first_round, self.cfg.rounds + 1):
            current = self.round(rnd, current)

    def _start(self):
        owner, current = self.owner, self.owner.initial
        self.log.start(owner.plugin_metrics(None), owner.emulator_metrics(current),
                       {"path": str(owner.bundle_dir), "hash": owner.info.bundle_hash,
                        "bytes": self.shipper.size, "notation": owner.info.plan.notation(),
                        "adapter_bytes": protocol.adapter_bytes(current)})
        return current, 1

    def _resume(self):
        state = checkpoint.load(self.run_dir, self.strategy, self.fingerprint)
        self.log.resume(state.round, state.bytes_down_total, state.bytes_up_total)
        self.shipper.delivered = dict(state.delivered)
        if state.adapter.bundle_hash != self.owner.info.bundle_hash:  # a re-aligned emulator
            self.owner.use_bundle(realigned_bundle(self.run_dir, state.adapter.bundle_hash))
        print(f"resuming after round {state.round}", flush=True)
        return state.adapter, state.round + 1

    def round(self, rnd: int, current):
        """One round; returns the new global adapter."""
        cfg, start = self.cfg, time.time()
        sampled, replies, ok, traffic, seconds_clients = self._train(rnd, current)
        secure = traffic["secure"]
        valid, rejected, capped = self._screen(rnd, ok, current, secure)
        updated = len(valid) >= cfg.min_clients and (secure is None or bool(secure.aggregate))
        previous = current
        if updated:
            aggregated, _ = self.strategy.aggregate_train(rnd, secure.aggregate if secure
                                                          else valid)
            current = previous.with_tensors({k: v.to(previous.tensors[k].dtype) for k, v in
                                             protocol.record_tensors(aggregated).items()})
        record = self._record(rnd, current, previous, sampled, replies, ok, valid, rejected,
                              updated, traffic)
        if capped:
            record["weights_capped"] = [{"node": self.nodes.name(c.node_id), "announced":
                                         c.announced, "used": c.used} for c in capped]
        if cfg.realign.every and rnd % cfg.realign.every == 0 and rnd < cfg.rounds:
            record["realign"] = _realign(self.owner, current, rnd, self.run_dir, cfg)
            current = replace(current, bundle_hash=self.owner.info.bundle_hash)
            self.train_config = protocol.task_config(self.owner.info.bundle_hash,
                                                     self.owner.task())
        self._save(rnd, current)
        if cfg.dp.active:
            record["dp"] = accounting.privacy_spent(self.log.summary["rounds"] + [record], cfg.dp,
                                                    ok, self.nodes.name)
        record["seconds_clients"] = seconds_clients
        record["seconds"] = time.time() - start
        self.log.round(record, cfg.rounds)  # summary first: a checkpoint never runs ahead of it
        checkpoint.save(self.run_dir, checkpoint.RunState(rnd, current, self.log.bytes_down,
                                                          self.log.bytes_up,
                                                          self.shipper.delivered),
                        self.strategy, self.fingerprint)
        return current

    def _train(self, rnd: int, current):
        """Sample, bring the sampled data owners' bundles up to date, send the adapter and
        collect the replies (sorted by data owner, as arrival order varies) and those without
        an error."""
        cfg, nodes = self.cfg, self.nodes
        nodes.refresh(cfg.clients_per_round)
        with nodes.sampling(cfg.seed * 100_003 + rnd, cfg.clients_per_round) as order:
            messages = list(self.strategy.configure_train(rnd, protocol.adapter_record(current),
                                                          self.train_config, nodes))
        messages.sort(key=lambda m: order.index(m.metadata.dst_node_id))
        sampled = {m.metadata.dst_node_id for m in messages}
        shipping_from = time.time()
        undelivered, bundles, deltas, bundle_bytes = self.shipper.ship(self.grid, sampled)
        messages = [m for m in messages if m.metadata.dst_node_id not in undelivered]
        sent_at = time.time()
        secure = None
        if cfg.secagg.enabled:  # SecAgg+: the model owner only ever sees the sum (secagg.py)
            secure = secagg.train_round(self.grid, messages, current, rnd, cfg)
            replies, down = secure.replies, secure.bytes_down
        else:
            replies = list(self.grid.send_and_receive(messages, timeout=cfg.round_timeout))
            down = sum(protocol.content_bytes(m.content) for m in messages)
        seconds_clients = time.time() - sent_at
        replies.sort(key=lambda r: nodes.key(r.metadata.src_node_id))
        for r in replies:
            if r.has_error() and protocol.MISSING_BUNDLE in (r.error.reason or ""):
                self.shipper.forget(r.metadata.src_node_id)
        ok = [r for r in replies if not r.has_error()]
        up = secure.bytes_up if secure else sum(accounting.upload_bytes(r) for r in ok)
        traffic = {"bundles": bundles, "deltas": deltas, "down": bundle_bytes + down, "up": up,
                   "secure": secure, "seconds_bundles": sent_at - shipping_from}
        return sampled, replies, ok, traffic, seconds_clients

    def _screen(self, rnd: int, ok: list, current, secure):
        """(valid uploads, rejections, capped weights); SecAgg+ leaves nothing to screen."""
        if secure:
            return ok, [], []
        reference = protocol.record_tensors(protocol.adapter_record(current))
        strategy = self.cfg.strategy
        valid, rejected, capped = screen(ok, reference, strategy.max_update_norm,
                                         strategy.clip_norm, strategy.max_weight)
        for rejection in rejected:
            print(f"round {rnd}: rejected the upload of data owner "
                  f"{self.nodes.name(rejection.node_id)}: {rejection.reason}", flush=True)
        for c in capped:
            print(f"round {rnd}: data owner {self.nodes.name(c.node_id)} announced "
                  f"{c.announced} examples, weighted as {c.used} (strategy.max_weight "
                  f"{strategy.max_weight:g} x the round's median)", flush=True)
        return valid, rejected, capped

    def _record(self, rnd, current, previous, sampled, replies, ok, valid, rejected, updated,
                traffic) -> dict:
        name = self.nodes.name
        evaluated = rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds
        started = time.time()
        plugin = self.owner.plugin_metrics(current) if evaluated else {}
        emulator = self.owner.emulator_metrics(current) \
            if evaluated and self.cfg.evaluate_emulator else {}
        record = {
            "round": rnd,
            "plugin": plugin,
            "emulator": emulator,
            "seconds_evaluation": time.time() - started,
            "clients_sampled": len(sampled),
            "clients_ok": len(valid),
            "clients_failed": len(sampled) - len(ok),
            "clients_rejected": len(rejected),
            "rejections": [{"node": name(r.node_id), "reason": r.reason} for r in rejected],
            "failures": [{"node": name(r.metadata.src_node_id),
                          "reason": accounting.failure(r)} for r in replies if r.has_error()],
            "updated": updated,
            "train_loss": accounting.train_losses(valid),
            "update_norm": update_norm(current.tensors, previous.tensors),
            "participants": sorted(name(r.metadata.src_node_id) for r in ok),
            "bundles_sent": traffic["bundles"],
            "bytes_down": traffic["down"],
            "bytes_up": traffic["up"],
            "seconds_bundles": traffic["seconds_bundles"],
        }
        if traffic["deltas"]:
            record["bundle_deltas_sent"] = traffic["deltas"]
        if traffic["secure"]:
            record["secagg"] = traffic["secure"].info
        return record

    def _save(self, rnd: int, current) -> None:
        current.save(self.checkpoints / f"round-{rnd:04d}.safetensors")
        for old in sorted(self.checkpoints.glob("round-*.safetensors"))[:-self.cfg.keep_checkpoints]:
            old.unlink()
        current.save(self.run_dir / "adapter.safetensors")
