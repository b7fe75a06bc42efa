"""Getting the bundle (and re-aligned emulators) to the data owners, once each."""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from . import protocol


class BundleShipper:
    """Sends the bundle to each data owner once, and after a re-alignment only the new
    emulator (a delta of the version the data owner has); remembers who has which version,
    by data owner name (node ids change when a run is resumed; the checkpoint keeps this)."""

    def __init__(self, owner, transport: str, timeout: float, name):
        self.owner = owner
        self.transport = transport
        self.timeout = timeout
        self.name = name  # node id -> data owner name
        self.delivered: dict[str, str] = {}  # data owner name -> bundle hash it holds
        self.size = protocol.bundle_size(owner.bundle_dir)
        self._content: dict[tuple, RecordDict] = {}

    def ship(self, grid: Grid, node_ids: set[int]) -> tuple[set[int], int, int, int]:
        """Bring those of ``node_ids`` that lack the current version up to date; returns
        (failed nodes, full bundles sent, deltas sent, bytes the data owners say they received
        or read from the shared path)."""
        current = self.owner.info.bundle_hash
        missing = sorted(n for n in node_ids if self.delivered.get(self.name(n)) != current)
        if not missing:
            return set(), 0, 0, 0
        messages, full, deltas = [], 0, 0
        for n in missing:
            base = self.delivered.get(self.name(n))
            messages.append(Message(self._payload(base), dst_node_id=n,
                                    message_type=f"query.{protocol.BUNDLE_ACTION}"))
            full, deltas = full + (base is None), deltas + (base is not None)
        replies = [r for r in grid.send_and_receive(messages, timeout=self.timeout)
                   if not r.has_error()]
        ok = {r.metadata.src_node_id for r in replies}
        self.delivered.update({self.name(n): current for n in ok})
        received = sum(map(_receipt_bytes, replies))
        return set(missing) - ok, full, deltas, received

    def _payload(self, base: str | None) -> RecordDict:
        info = self.owner.info
        key = (info.bundle_hash, base)
        if key not in self._content:
            self._content[key] = protocol.bundle_content(
                self.owner.bundle_dir, info.bundle_hash, self.transport) if base is None else \
                protocol.bundle_delta_content(self.owner.bundle_dir, info.bundle_hash, base)
        return self._content[key]

    def forget(self, node_id: int) -> None:
        self.delivered.pop(self.name(node_id), None)




def _receipt_bytes(reply: Message) -> int:
    """The bytes a data owner says it received or read (0 if it says nothing sensible)."""
    value = reply.content["bundle"].get("bytes") if "bundle" in reply.content else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
