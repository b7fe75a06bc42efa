"""Secure aggregation of the adapter updates with Flower's SecAgg+ (``secagg.enabled``).

Flower 1.41 implements SecAgg+ only for its legacy (FitIns / FitRes) strategies: on the server,
``SecAggPlusWorkflow`` drives the protocol through a ``Grid`` and a ``LegacyContext`` (a legacy
``Strategy``); on the client, ``secaggplus_mod`` wraps a handler that answers a FitIns with a
FitRes. The workflow needs nothing from the ServerApp but the Grid, so the model owner's loop
(``server.py``) stays on the Message API and hands it only the training step of a round:

1. the Message-API strategy samples the data owners and writes their train config, exactly as
   in a plain round (same seed, same data owners);
2. ``SecAggPlusWorkflow`` runs its four message rounds (setup, share keys, collect masked
   vectors, unmask). In the third one each data owner trains as usual; ``client_mod`` turns the
   trained adapter into the *update* (trained - global, float64) and ``secaggplus_mod`` weights
   it by num-examples / max_weight, clips each coordinate to +-clipping_range, quantizes it
   (stochastic rounding to ``quantization_range`` levels) and masks it;
3. the model owner adds the masked vectors and removes the masks of the sum only: ``_SumOnly``
   (the legacy strategy) is handed the example-weighted mean update, never a single one;
4. global + mean update goes to the Message-API strategy as one reply weighted by the total
   example count: FedAvg returns it as is, FedAvgM / FedAdam / ... take their server step on it.

Updates rather than adapters go through the protocol because quantization is uniform over
[-clipping_range, clipping_range] and updates are small: the same levels give finer steps.
Each of the K stochastic roundings is off by less than one step, 2 * clipping_range /
quantization_range, and the sum is divided by the total weight q_total / quantization_range,
q_total = sum_i round(n_i / max_weight * quantization_range); so per coordinate the new adapter
differs from plain FedAvg's by less than ``max_error = 2 * clipping_range * K / q_total`` (the
weights themselves are rounded to 1 / q_total, a relative error below 1 / (2 round(n_i / max_weight
* quantization_range)), and both adapters are rounded to their float dtype). A coordinate of a
weighted update beyond +-clipping_range is clipped: data owners count such coordinates
(``secagg-clipped``, a plain metric) and the round record and a printed line say so.

What the model owner still sees per data owner: that it took part, its num-examples and its
training metrics (train loss, steps, seconds), as in Flower's own SecAgg+ FitRes path. Flower
only warns when a weight num-examples / max_weight exceeds 1, so a data owner claiming 10^9
examples would dominate (or overflow) the sum; the sum cannot be split afterwards, so a round
in which any claim exceeds ``secagg.max_weight`` is not applied.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (Code, FitIns, FitRes, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from . import protocol

MODULUS = 2 ** 32  # masks are drawn from [0, 2**32): Flower's largest modulus_range
KEYS = "secagg-keys"  # FitIns config: the adapter's tensor names, in the order of Parameters
CLIP = "secagg-clip"  # FitIns config: clipping_range * max_weight (coordinate bound * weight)
CLIPPED = "secagg-clipped"  # FitRes metric: coordinates the clipping changed


# --- the data owner's side ---------------------------------------------------------------


def client_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; other train messages pass through."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, lambda m, c: _train_update(m, c, call_next))


def _train_update(msg: Message, context: Context, call_next) -> Message:
    """FitIns in, FitRes out: the train handler runs on a plain train message; the FitRes
    carries its update (trained - global) for ``secaggplus_mod`` to quantize and mask."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config.pop(KEYS)))
    clip = float(config.pop(CLIP))
    received = parameters_to_ndarrays(fitins.parameters)
    msg.content = RecordDict({"arrays": ArrayRecord({k: Array(a) for k, a in zip(keys, received)}),
                              "config": ConfigRecord(config)})
    reply = call_next(msg, context)
    trained = reply.content["arrays"]
    if sorted(trained.keys()) != sorted(keys):
        raise ValueError("secure aggregation: the trained adapter's tensors differ from the "
                         "global adapter's")
    update = [trained[k].numpy().astype(np.float64) - a.astype(np.float64)
              for k, a in zip(keys, received)]
    metrics = dict(reply.content["metrics"])
    examples = int(metrics["num-examples"])
    bound = clip / examples  # |update| * examples / max_weight <= clipping_range
    metrics[CLIPPED] = int(sum(int((np.abs(u) > bound).sum()) for u in update))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), examples, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


# --- the model owner's side --------------------------------------------------------------


class _Observed:
    """The Grid as the workflow uses it, counting bytes and keeping the training replies."""

    def __init__(self, grid):
        self.grid = grid
        self.bytes_down = self.bytes_up = 0
        self.trained: list[Message] = []
        self.seconds: dict[str, float] = {}  # per stage: sending until the last reply

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)) \
            if messages else "none"
        self.bytes_down += sum(protocol.content_bytes(m.content) for m in messages)
        start = time.time()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.seconds[stage] = round(time.time() - start, 3)
        self.bytes_up += sum(protocol.content_bytes(r.content) for r in replies if not r.has_error())
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.trained = replies
        return replies

    def __getattr__(self, attr):
        return getattr(self.grid, attr)


def _legacy_strategy(instructions: list):
    from flwr.server.strategy import Strategy

    class SumOnly(Strategy):
        """Hands the workflow the sampled data owners' FitIns; keeps the unmasked mean update
        (every FitRes the workflow passes on carries that same mean, never an own update)."""

        def __init__(self):
            self.instructions = instructions
            self.mean: list[np.ndarray] | None = None
            self.examples: list[int] = []
            self.nodes: list[int] = []

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return self.instructions

        def aggregate_fit(self, server_round, results, failures):
            if not results:
                return None, {}
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.examples = [int(res.num_examples) for _, res in results]
            self.nodes = [int(proxy.node_id) for proxy, _ in results]
            return results[0][1].parameters, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return SumOnly()


@dataclass
class SecureRound:
    replies: list  # the training-stage replies: plain metrics only (or the error)
    aggregate: list  # [one reply: global + mean update, weighted by all examples], or []
    bytes_down: int
    bytes_up: int
    info: dict = field(default_factory=dict)  # for the round's record in summary.json


def train_round(grid, messages: list[Message], current, server_round: int, cfg) -> SecureRound:
    """One round's training through SecAgg+, for the data owners ``messages`` address."""
    from flwr.server import ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    sec = cfg.secagg
    record = protocol.adapter_record(current)
    keys = list(record.keys())
    parameters = compat.arrayrecord_to_parameters(record, keep_input=True)
    instructions = []
    for m in messages:
        config = {**dict(m.content["config"]), KEYS: json.dumps(keys),
                  CLIP: float(sec.clipping_range * sec.max_weight)}
        instructions.append((GridClientProxy(m.metadata.dst_node_id, grid, 0),
                             FitIns(parameters, config)))
    strategy = _legacy_strategy(instructions)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state[MAIN_PARAMS_RECORD] = record
    observed = _Observed(grid)
    if len(instructions) >= 2:
        SecAggPlusWorkflow(sec.num_shares, sec.reconstruction_threshold,
                           max_weight=sec.max_weight, clipping_range=sec.clipping_range,
                           quantization_range=sec.quantization_range, modulus_range=MODULUS,
                           timeout=cfg.round_timeout)(observed, context)

    replies, clipped = _training_replies(observed)
    info = {"uploads": len(strategy.examples), "clipped": clipped,
            "seconds_stages": observed.seconds}
    aggregate = _unmasked_aggregate(strategy, record, keys, sec, server_round, info)
    if clipped:
        print(f"round {server_round}: secure aggregation clipped {clipped} update coordinates "
              "beyond secagg.clipping_range * secagg.max_weight / num-examples; raise "
              "secagg.clipping_range", flush=True)
    return SecureRound(replies, aggregate, observed.bytes_down, observed.bytes_up, info)


def _training_replies(observed) -> tuple[list[Message], int]:
    """The data owners' replies with their plain metrics (as the round loop reads them), and
    how many update coordinates they clipped."""
    replies, clipped = [], 0
    for reply in observed.trained:
        if not reply.has_error():
            metrics = dict(reply.content.config_records["fitres.metrics"])
            clipped += int(metrics.pop(CLIPPED, 0))
            reply.content = RecordDict({"metrics": MetricRecord(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))})})
        replies.append(reply)
    return replies, clipped


def _unmasked_aggregate(strategy, record, keys, sec, server_round: int, info: dict
                        ) -> list[Message]:
    """The global adapter plus the unmasked mean update, as one message for the strategy
    (none if the protocol halted or overflowed; ``info`` says which)."""
    aggregate = []
    q_total = sum(round(n / sec.max_weight * sec.quantization_range) for n in strategy.examples)
    if strategy.mean is None:
        info["halted"] = True
        print(f"round {server_round}: secure aggregation halted (too few data owners answered "
              "for the masks to be removed)", flush=True)
    elif any(n > sec.max_weight for n in strategy.examples):
        # the sum cannot be split, so one claim beyond the cap costs the round (plain rounds cap
        # the claim instead: strategy.max_weight)
        over = {node: n for node, n in zip(strategy.nodes, strategy.examples)
                if n > sec.max_weight}
        info["claims_over_max_weight"] = over
        print(f"round {server_round}: secure aggregation refused: data owner(s) "
              f"{', '.join(map(str, over))} claimed more than secagg.max_weight="
              f"{sec.max_weight:g} examples ({', '.join(map(str, over.values()))}), which would "
              "outweigh the others; the adapter is not updated (raise secagg.max_weight if "
              "such partitions are real)", flush=True)
    elif q_total >= MODULUS:
        info["overflow"] = True
        print(f"round {server_round}: secure aggregation overflowed: the uploads' num-examples "
              f"sum to {sum(strategy.examples)}, too much for secagg.max_weight="
              f"{sec.max_weight:g}; raise it", flush=True)
    else:
        info["max_error"] = 2 * sec.clipping_range * len(strategy.examples) / q_total
        arrays = ArrayRecord({k: Array((record[k].numpy().astype(np.float64) + mean)
                                       .astype(record[k].numpy().dtype))
                              for k, mean in zip(keys, strategy.mean)})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(
            {"num-examples": int(sum(strategy.examples))})})
        aggregate = [Message(content, dst_node_id=0, message_type="train")]
    return aggregate
