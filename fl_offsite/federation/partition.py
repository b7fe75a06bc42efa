"""Splitting one dataset among simulated data owners, through flwr-datasets partitioners."""

from __future__ import annotations

from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

from ..errors import UserError


def partition(ds, num_partitions: int, partition_id: int, name: str = "iid", by: str = "label",
              alpha: float = 0.5, shards_per_client: int = 2, seed: int = 0):
    """Rows of ``ds`` that belong to data owner ``partition_id`` (deterministic for ``seed``)."""
    if not 0 <= partition_id < num_partitions:
        raise UserError(f"partition-id: {partition_id} is outside 0..{num_partitions - 1}")
    if len(ds) < num_partitions:
        raise UserError(f"partition: {len(ds)} rows cannot give {num_partitions} data owners an "
                        "example each (every data owner would need one); lower num_clients")
    if name != "iid" and by not in ds.column_names:
        raise UserError(f"partition.by: column {by!r} is not in the data (columns: "
                        f"{', '.join(ds.column_names)}); set partition.by or use partition.name=iid")
    if name == "iid":
        partitioner = IidPartitioner(num_partitions)
        ds = ds.shuffle(seed=seed)
    elif name == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions, by, alpha, min_partition_size=1,
                                           self_balancing=True, seed=seed)
    elif name == "shard":
        partitioner = ShardPartitioner(num_partitions, by,
                                       num_shards_per_partition=shards_per_client, seed=seed)
    else:
        raise UserError(f"partition.name: unknown partitioner {name!r}; use iid, dirichlet or shard")
    partitioner.dataset = ds
    try:
        part = partitioner.load_partition(partition_id)
    except (ValueError, IndexError) as exc:
        raise UserError(f"partition: {name} cannot split {len(ds)} rows into {num_partitions} "
                        f"parts ({exc}); lower num_clients or change partition.name") from None
    if len(part) == 0:
        raise UserError(f"partition: data owner {partition_id} got an empty partition of "
                        f"{len(ds)} rows; lower num_clients or raise partition.alpha")
    return part
