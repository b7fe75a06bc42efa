"""Partitioning a dataset among data owners (flwr-datasets partitioners)."""

from __future__ import annotations

from collections import Counter

import pytest
from datasets import Dataset

from fl_offsite.errors import UserError
from fl_offsite.federation.partition import partition


@pytest.fixture
def rows():
    return Dataset.from_dict({"text": [f"doc {i}" for i in range(120)],
                              "label": [i % 4 for i in range(120)]})


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shard"])
def test_partitions_are_disjoint_cover_the_data_and_are_seeded(rows, name):
    parts = [partition(rows, 4, i, name, alpha=0.3, seed=1)["text"] for i in range(4)]
    seen = [t for p in parts for t in p]
    assert len(seen) == len(set(seen)) and all(parts)
    if name != "shard":
        assert sorted(seen) == sorted(rows["text"])
    assert parts == [partition(rows, 4, i, name, alpha=0.3, seed=1)["text"] for i in range(4)]


def test_iid_partitions_are_balanced_and_dirichlet_ones_are_skewed(rows):
    def label_share(name):
        shares = []
        for i in range(4):
            counts = Counter(partition(rows, 4, i, name, alpha=0.1, seed=0)["label"])
            shares.append(max(counts.values()) / sum(counts.values()))
        return sum(shares) / 4

    assert label_share("iid") < 0.5 < label_share("dirichlet")


def test_bad_partition_settings_are_refused(rows):
    with pytest.raises(UserError, match="partition.by"):
        partition(rows, 4, 0, "dirichlet", by="topic")
    with pytest.raises(UserError, match="partition-id"):
        partition(rows, 4, 4)
    with pytest.raises(UserError, match="lower num_clients"):
        partition(rows.select(range(3)), 4, 3)
