"""The connected data owners by stable name, and which of them a round samples."""

from __future__ import annotations

import contextlib
import random
import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from . import protocol


class NodeDirectory:
    """Stable names of the connected data owners (asked once per node with ``query.hello``).

    Flower's node ids are random per run; ordering nodes by name makes sampling and
    aggregation order reproducible for a seed. The round's sample is drawn here with its own
    seeded generator; Flower's sampler (which draws from the global ``random``) is then
    offered exactly those nodes, so it can only reorder them.
    """

    def __init__(self, grid: Grid, timeout: float):
        self.grid = grid
        self.timeout = timeout
        self.names: dict[int, str] = {}
        self.offered: list[int] | None = None

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
        """What Flower's samplers see: the round's sample while sampling, else every named
        node, in name order."""
        return list(self.offered) if self.offered is not None else \
            sorted(self.names, key=self.key)

    @contextlib.contextmanager
    def sampling(self, seed: int, count: int):
        """Offer Flower ``count`` nodes drawn with ``seed``; yields them in drawn order."""
        self.offered = random.Random(seed).sample(self.get_node_ids(), count)
        try:
            yield list(self.offered)
        finally:
            self.offered = None

    def __getattr__(self, attr):  # everything else is the real Grid
        return getattr(self.grid, attr)


