"""Which original blocks become adapter, emulator, or are dropped.

Rule (uniform layer drop, as in Offsite-Tuning): with ``depth`` blocks, the bottom ``l`` and
top ``r`` blocks are the adapter; the ``m = depth - l - r`` middle blocks are compressed to
``k`` kept blocks at ``round(linspace(first_middle, last_middle, k))`` - so the first and last
middle blocks are always kept (for k >= 2) and the rest are evenly spaced. For OPT-1.3B
(24 blocks, 2-8-2) this keeps 2, 5, 7, 10, 13, 16, 18, 21, the paper's choice.

Every index here is an *original* block index; the emulated model's block at position ``p``
is original block ``plan.order[p]``. An index may repeat in ``emulator`` (one block shared at
several positions, see ``layer_selection``). ``spans[j]`` says how many original middle blocks
emulator position ``j`` stands in for; distillation matches hidden states at those boundaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class LayerPlan:
    depth: int
    bottom: tuple[int, ...]
    emulator: tuple[int, ...]
    top: tuple[int, ...]
    spans: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.spans:
            object.__setattr__(self, "spans", default_spans(self))
        if len(self.spans) != len(self.emulator) or \
                sum(self.spans) != self.depth - len(self.bottom) - len(self.top):
            raise UserError(f"plan: spans {list(self.spans)} do not cover the middle blocks")

    @property
    def adapter(self) -> tuple[int, ...]:
        return self.bottom + self.top

    @property
    def order(self) -> tuple[int, ...]:
        """Original indices of the emulated model's blocks, by position."""
        return self.bottom + self.emulator + self.top

    @property
    def dropped(self) -> tuple[int, ...]:
        kept = set(self.order)
        return tuple(i for i in range(self.depth) if i not in kept)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(int(d["depth"]), tuple(d["bottom"]), tuple(d["emulator"]), tuple(d["top"]),
                   tuple(d.get("spans", ())))

    def notation(self) -> str:
        """``l-k-r`` with k the distinct emulator blocks (``x n`` when they fill n positions)."""
        k = len(set(self.emulator))
        shared = f" x {len(self.emulator)}" if len(self.emulator) != k else ""
        return f"{len(self.bottom)}-{k}{shared}-{len(self.top)}"


def default_spans(plan: LayerPlan) -> tuple[int, ...]:
    """Each kept block stands in for itself and the dropped blocks up to the next kept one
    (plans that repeat a block give their spans explicitly)."""
    starts = list(plan.emulator) + [plan.depth - len(plan.top)]
    return tuple(b - a for a, b in zip(starts, starts[1:]))


def uniform_keep(first: int, last: int, k: int) -> list[int]:
    """``k`` evenly spaced indices from ``first`` to ``last`` inclusive (endpoints kept)."""
    return sorted({int(round(x)) for x in np.linspace(first, last, k)})


def make_plan(depth: int, adapter_bottom: int = 2, adapter_top: int = 2,
              emulator_layers: int | None = None, drop_ratio: float | None = None) -> LayerPlan:
    """Split ``depth`` blocks into adapter and uniformly dropped emulator.

    Give either ``emulator_layers`` (k kept middle blocks) or ``drop_ratio`` (fraction of the
    middle dropped); with neither, half of the middle is kept (the paper's OPT-1.3B ratio is
    8 of 20).
    """
    if adapter_bottom < 0 or adapter_top < 0 or adapter_bottom + adapter_top < 1:
        raise UserError(f"adapter_bottom/adapter_top: got {adapter_bottom} and {adapter_top}; "
                        "both must be >= 0 and together at least 1 block")
    middle = depth - adapter_bottom - adapter_top
    if middle < 1:
        raise UserError(f"adapter_bottom + adapter_top = {adapter_bottom + adapter_top} leaves no "
                        f"middle block in a {depth}-block model; use at most {depth - 1} adapter blocks")
    if emulator_layers is not None and drop_ratio is not None:
        raise UserError("emulator_layers/drop_ratio: give one of them, not both")
    if drop_ratio is not None:
        if not 0.0 <= drop_ratio < 1.0:
            raise UserError(f"drop_ratio: got {drop_ratio}; use a fraction in [0, 1)")
        emulator_layers = max(1, int(round(middle * (1.0 - drop_ratio))))
    if emulator_layers is None:
        emulator_layers = max(1, middle // 2)
    if not 1 <= emulator_layers <= middle:
        raise UserError(
            f"emulator_layers: got {emulator_layers}, but a {depth}-block model with a "
            f"{adapter_bottom}+{adapter_top} adapter has {middle} middle blocks; "
            f"use 1 <= emulator_layers <= {middle}")
    first, last = adapter_bottom, depth - adapter_top - 1
    return LayerPlan(
        depth=depth,
        bottom=tuple(range(adapter_bottom)),
        emulator=tuple(uniform_keep(first, last, emulator_layers)),
        top=tuple(range(depth - adapter_top, depth)),
    )
