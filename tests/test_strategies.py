"""Every strategy on real tensors against a hand computation; upload validation; robustness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import strategies
from fl_offsite import config as configs
from fl_offsite.errors import UserError
from strategies.validation import screen

KEYS = ("0.w", "1.b")


@pytest.fixture(autouse=True)
def flower_identity():
    """Messages need a run identity; in a real run Flower sets it."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


class Nodes:
    """The part of a Grid that Flower's samplers use: the connected node ids."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"0.w": torch.randn(3, 2, generator=g) * scale, "1.b": torch.randn(4, generator=g) * scale}


def reply(node: int, values: dict, examples=10, metrics=None) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                          message_type="train")
    content = RecordDict({"arrays": ArrayRecord(values),
                          "metrics": MetricRecord(metrics or {"num-examples": examples})})
    return Message(content, reply_to=instruction)


def run_round(name: str, uploads: list[dict], examples: list[int], current: dict,
              server_round: int = 1, strategy=None, **params):
    strategy = strategy or strategies.REGISTRY[name](**params).build(len(uploads), len(uploads))
    list(strategy.configure_train(server_round, ArrayRecord(current), ConfigRecord(),
                                  Nodes(range(1, len(uploads) + 1))))
    replies = [reply(i + 1, u, n) for i, (u, n) in enumerate(zip(uploads, examples))]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return {k: v.double() for k, v in arrays.to_torch_state_dict().items()}, strategy


def stack(uploads, key):
    return np.stack([u[key].double().numpy() for u in uploads])


CURRENT = tensors(0)
UPLOADS = [tensors(i) for i in range(1, 6)]
EXAMPLES = [1, 2, 3, 4, 10]


def weighted_mean(uploads, examples):
    return {k: sum(u[k].double() * n for u, n in zip(uploads, examples)) / sum(examples)
            for k in KEYS}


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_aggregate_the_example_weighted_mean(name):
    result, _ = run_round(name, UPLOADS, EXAMPLES, CURRENT)
    expected = weighted_mean(UPLOADS, EXAMPLES)
    assert all(torch.allclose(result[k], expected[k], atol=1e-6) for k in KEYS)


def test_fedavg_with_equal_weights_is_the_plain_mean():
    result, _ = run_round("fedavg", UPLOADS, [7] * 5, CURRENT)
    for k in KEYS:
        assert np.allclose(result[k].numpy(), stack(UPLOADS, k).mean(0), atol=1e-6)


def test_fedprox_sends_mu_to_the_data_owners():
    strategy = strategies.FedProx(proximal_mu=0.3).build(2, 2)
    messages = list(strategy.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(), Nodes([1, 2])))
    assert all(m.content["config"]["proximal-mu"] == 0.3 for m in messages)


def test_fedavgm_applies_server_momentum_over_two_rounds():
    lr, mom = 0.5, 0.9
    first, strategy = run_round("fedavgm", UPLOADS[:2], [1, 1], CURRENT, server_lr=lr,
                                server_momentum=mom)
    g1 = {k: CURRENT[k].double() - (UPLOADS[0][k].double() + UPLOADS[1][k].double()) / 2 for k in KEYS}
    expected1 = {k: CURRENT[k].double() - lr * g1[k] for k in KEYS}
    assert all(torch.allclose(first[k], expected1[k], atol=1e-6) for k in KEYS)
    second_uploads = UPLOADS[2:4]
    second, _ = run_round("fedavgm", second_uploads, [1, 1], {k: v.float() for k, v in first.items()},
                          server_round=2, strategy=strategy)
    g2 = {k: first[k] - (second_uploads[0][k].double() + second_uploads[1][k].double()) / 2
          for k in KEYS}
    expected2 = {k: first[k] - lr * (mom * g1[k] + g2[k]) for k in KEYS}
    assert all(torch.allclose(second[k], expected2[k], atol=1e-5) for k in KEYS)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_match_the_update_rule(name):
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    moments = {"beta_1": b1, "beta_2": b2} if name != "fedadagrad" else {}
    result, _ = run_round(name, UPLOADS, EXAMPLES, CURRENT, server_lr=eta, tau=tau, **moments)
    avg = weighted_mean(UPLOADS, EXAMPLES)
    for k in KEYS:
        x = CURRENT[k].double()
        delta = avg[k] - x
        m = (1 - b1) * delta
        if name == "fedadam":  # with bias correction, round t = 1
            v = (1 - b2) * delta ** 2
            step = eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)
        elif name == "fedyogi":  # v0 = 0: v = -(1 - b2) d^2 sign(-d^2)
            v = (1 - b2) * delta ** 2
            step = eta
        else:  # Adagrad has no first-moment decay: m = delta
            m, v = delta, delta ** 2
            step = eta
        expected = x + step * m / (v.sqrt() + tau)
        assert torch.allclose(result[k], expected, atol=1e-5), (name, k)


def test_median_is_coordinate_wise():
    result, _ = run_round("median", UPLOADS, EXAMPLES, CURRENT)
    for k in KEYS:
        assert np.allclose(result[k].numpy(), np.median(stack(UPLOADS, k), axis=0), atol=1e-6)


def test_trimmed_mean_drops_beta_of_each_end():
    result, _ = run_round("trimmed_mean", UPLOADS, EXAMPLES, CURRENT, trim_beta=0.2)
    for k in KEYS:
        ordered = np.sort(stack(UPLOADS, k), axis=0)
        assert np.allclose(result[k].numpy(), ordered[1:-1].mean(0), atol=1e-6)  # 1 of 5 each end


def test_krum_picks_the_upload_closest_to_its_neighbours():
    honest = [{k: CURRENT[k] + 0.01 * torch.randn_like(CURRENT[k]) for k in KEYS} for _ in range(4)]
    outlier = {k: v + 50.0 for k, v in CURRENT.items()}
    uploads = honest + [outlier]
    result, _ = run_round("krum", uploads, [1] * 5, CURRENT, num_malicious=1)
    flat = [torch.cat([u[k].double().flatten() for k in KEYS]) for u in uploads]
    scores = []
    for i, a in enumerate(flat):
        dists = sorted(float((a - b).pow(2).sum()) for j, b in enumerate(flat) if j != i)
        scores.append(sum(dists[: 5 - 1 - 2]))
    chosen = uploads[int(np.argmin(scores))]
    assert all(torch.allclose(result[k], chosen[k].double(), atol=1e-6) for k in KEYS)


@pytest.mark.parametrize("name, params", [("median", {}), ("trimmed_mean", {"trim_beta": 0.2})])
def test_robust_aggregates_ignore_how_huge_an_outlier_is(name, params):
    honest = UPLOADS[:4]
    top = {k: torch.from_numpy(stack(honest, k).max(0)).float() for k in KEYS}
    mild, _ = run_round(name, honest + [{k: v + 1.0 for k, v in top.items()}], [1] * 5, CURRENT, **params)
    huge, _ = run_round(name, honest + [{k: v + 1e6 for k, v in top.items()}], [1] * 5, CURRENT, **params)
    assert all(torch.equal(mild[k], huge[k]) for k in KEYS)


def malformed(kind: str) -> Message:
    good = tensors(9)
    if kind == "wrong keys":
        return reply(9, {"0.w": good["0.w"], "7.x": good["1.b"]})
    if kind == "wrong shape":
        return reply(9, {"0.w": good["0.w"].reshape(2, 3), "1.b": good["1.b"]})
    if kind == "wrong dtype":
        return reply(9, {"0.w": good["0.w"].double(), "1.b": good["1.b"]})
    if kind == "non-finite":
        return reply(9, {"0.w": good["0.w"], "1.b": torch.full((4,), float("inf"))})
    if kind == "update norm":
        return reply(9, {k: v * 1e4 for k, v in good.items()})
    if kind == "num-examples zero":
        return reply(9, good, examples=0)
    if kind == "num-examples fractional":
        return reply(9, good, examples=2.5)
    return reply(9, good, metrics={"train_loss": 1.0})  # "num-examples missing"


# each malformed upload and the start of the reason it must be rejected with
MALFORMED_REASONS = {
    "wrong keys": "wrong keys: missing ['1.b'], unexpected ['7.x']",
    "wrong shape": "wrong shape for 0.w: (2, 3)",
    "wrong dtype": "wrong dtype for 0.w: torch.float64",
    "non-finite": "non-finite values (NaN or Inf) in 1.b",
    "update norm": "update norm",
    "num-examples zero": "num-examples must be a positive integer, got 0",
    "num-examples fractional": "num-examples must be a positive integer, got 2.5",
    "num-examples missing": "num-examples must be a positive integer, got None",
}


@pytest.mark.parametrize("kind", MALFORMED_REASONS)
def test_a_malformed_upload_is_rejected_for_its_own_reason(kind):
    honest = [reply(i + 1, u, n) for i, (u, n) in enumerate(zip(UPLOADS, EXAMPLES))]
    accepted, rejected, _ = screen(honest + [malformed(kind)], CURRENT, max_update_norm=100.0)
    assert [(r.node_id, r.reason[:len(MALFORMED_REASONS[kind])]) for r in rejected] == \
        [(9, MALFORMED_REASONS[kind])]
    assert [r.metadata.src_node_id for r in accepted] == [1, 2, 3, 4, 5]


def test_screening_lets_well_formed_uploads_through_untouched():
    """The same honest replies, screened and not: the aggregate is the same, so rejection
    above is the only way a malformed upload loses its influence."""
    honest = [reply(i + 1, u, n) for i, (u, n) in enumerate(zip(UPLOADS, EXAMPLES))]
    accepted, rejected, _ = screen(honest, CURRENT, max_update_norm=100.0)
    assert rejected == []
    screened, _ = strategies.FedAvg().build(5, 5).aggregate_train(1, accepted)
    plain, _ = strategies.FedAvg().build(5, 5).aggregate_train(
        1, [reply(i + 1, u, n) for i, (u, n) in enumerate(zip(UPLOADS, EXAMPLES))])
    a, b = screened.to_torch_state_dict(), plain.to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in KEYS)


def fedavg_shift(uploads: list[tuple[dict, int]], max_weight: float | None) -> float:
    """How far FedAvg of the screened ``(tensors, claimed examples)`` uploads moves from
    CURRENT, as a fraction of a unit shift."""
    replies = [reply(i + 1, tensors, n) for i, (tensors, n) in enumerate(uploads)]
    accepted, _, _ = screen(replies, CURRENT, max_weight=max_weight)
    arrays, _ = strategies.FedAvg().build(len(accepted), len(accepted)).aggregate_train(
        1, accepted)
    return float((arrays.to_torch_state_dict()["1.b"].double() - CURRENT["1.b"].double()).mean())


def test_a_data_owner_lying_about_its_example_count_moves_fedavg_no_more_than_an_honest_one():
    still, shifted = CURRENT, {k: v + 1.0 for k, v in CURRENT.items()}
    others = [(still, 40), (still, 40), (still, 40)]
    honest = fedavg_shift(others + [(shifted, 40)], max_weight=1.0)
    liar = fedavg_shift(others + [(shifted, 10**9)], max_weight=1.0)
    assert honest == pytest.approx(0.25) and liar <= honest + 1e-9
    assert fedavg_shift(others + [(shifted, 10**9)], max_weight=3.0) == pytest.approx(0.5)
    assert fedavg_shift(others + [(shifted, 10**9)], max_weight=None) > 0.999  # as announced


def test_the_default_weight_cap_leaves_honest_unequal_counts_alone():
    uploads = list(zip(UPLOADS[:4], [30, 40, 50, 90]))
    replies = [reply(i + 1, u, n) for i, (u, n) in enumerate(uploads)]
    accepted, _, capped = screen(replies, CURRENT, max_weight=strategies.FedAvg().max_weight)
    assert not capped
    assert [int(r.content["metrics"]["num-examples"]) for r in accepted] == [30, 40, 50, 90]


def test_clipping_bounds_every_update_norm():
    big = reply(3, {k: CURRENT[k] + 10.0 for k in KEYS})
    small = reply(4, {k: CURRENT[k] + 0.001 for k in KEYS})
    accepted, rejected, _ = screen([big, small], CURRENT, clip_norm=1.0)
    assert not rejected
    norms = []
    for r in accepted:
        t = r.content["arrays"].to_torch_state_dict()
        norms.append(float(sum((t[k].double() - CURRENT[k].double()).pow(2).sum() for k in KEYS)) ** 0.5)
    assert norms[0] == pytest.approx(1.0, rel=1e-5) and norms[1] < 0.01


@pytest.mark.parametrize("params, field", [({"name": "fedfoo"}, "strategy.name"),
                                           ({"name": "krum", "num_malicious": 3}, "num_malicious")])
def test_bad_strategy_settings_are_refused(params, field):
    with pytest.raises(UserError, match=field):
        configs.load(None, {"model": "fl-offsite/tiny-opt", "data": {"path": "x"},
                            "num_clients": 5, "clients_per_round": 5,
                            "strategy": params}).strategy.build(5, 5)


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_every_registered_strategy_loads_by_name_and_builds(name):
    cfg = configs.load(None, {"model": "fl-offsite/tiny-opt", "data": {"path": "x"},
                              "num_clients": 5, "clients_per_round": 5,
                              "strategy": {"name": name}})
    assert type(cfg.strategy) is strategies.REGISTRY[name]
    flower = cfg.strategy.build(5, 5)
    assert type(flower).__name__ == cfg.strategy.flower_class


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_every_strategy_continues_from_its_saved_state_as_if_never_stopped(name):
    from strategies.state import export_state, import_state

    params = {"num_malicious": 1} if name == "krum" else {}
    current, straight = CURRENT, None
    for rnd in (1, 2):
        arrays, straight = run_round(name, UPLOADS, EXAMPLES, current, rnd, straight, **params)
        current = {k: v.float() for k, v in arrays.items()}
    tensors, kinds = export_state(straight)
    restored = strategies.REGISTRY[name](**params).build(5, 5)
    import_state(restored, {k: v.clone() for k, v in tensors.items()}, kinds)
    third = [{k: v + 0.1 * (i + 1) for k, v in u.items()} for i, u in enumerate(UPLOADS)]
    expected, _ = run_round(name, third, EXAMPLES, current, 3, straight)
    got, _ = run_round(name, third, EXAMPLES, current, 3, restored)
    assert all(torch.equal(expected[k], got[k]) for k in KEYS)
    if name in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        assert kinds  # these carry state between rounds, and it was found
        fresh, _ = run_round(name, third, EXAMPLES, current, 3,
                             strategies.REGISTRY[name](**params).build(5, 5))
        assert not all(torch.equal(expected[k], fresh[k]) for k in KEYS)


def test_a_new_strategy_is_one_class_and_one_registry_line():
    """The README's worked example: a config class plus a registry entry is a strategy."""
    from typing import Literal

    from pydantic import BaseModel, Field

    from fl_offsite.registry import tagged_union
    from strategies.base import StrategyConfig

    class ScaledFedAvg(StrategyConfig):
        name: Literal["scaled_fedavg"] = "scaled_fedavg"
        server_lr: float = Field(1.5, gt=0.0)
        flower_class = "FedAvgM"

        def flower_arguments(self) -> dict:
            return {"server_learning_rate": self.server_lr, "server_momentum": 0.0}

    registry = {**strategies.REGISTRY, "scaled_fedavg": ScaledFedAvg}

    class Section(BaseModel):
        strategy: tagged_union(registry, default="fedavg")

    strategy = Section.model_validate({"strategy": {"name": "scaled_fedavg",
                                                    "server_lr": 2.0}}).strategy
    result, _ = run_round("fedavg", UPLOADS, EXAMPLES, CURRENT, strategy=strategy.build(5, 5))
    mean = weighted_mean(UPLOADS, EXAMPLES)
    for k in KEYS:
        expected = CURRENT[k].double() + 2.0 * (mean[k] - CURRENT[k].double())
        assert torch.allclose(result[k], expected, atol=1e-5)
    with pytest.raises(ValueError, match="proximal_mu"):
        Section.model_validate({"strategy": {"name": "scaled_fedavg", "proximal_mu": 0.1}})
