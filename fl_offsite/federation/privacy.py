"""The data owner's secret: client-side differential privacy on the adapter update.

Each data owner clips its update (trained adapter - global adapter) to L2 norm ``clip_norm``
and adds Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` before it
leaves, so every upload is a Gaussian mechanism on that owner's data. The model owner
reports the (epsilon, delta) each owner has spent with Opacus' RDP accountant: one
full-participation step per round the owner took part in. The noise comes from the OS's
entropy, never from the run's seed (which the model owner knows), so DP runs are not
bit-reproducible.
"""

from __future__ import annotations

import os

import torch


def privatize(trained: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
              clip_norm: float, noise_multiplier: float) -> dict[str, torch.Tensor]:
    """reference + clip(trained - reference) + N(0, (noise_multiplier * clip_norm)^2)."""
    delta = {k: trained[k].double() - reference[k].double() for k in reference}
    norm = float(sum(d.pow(2).sum() for d in delta.values())) ** 0.5
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    sigma = noise_multiplier * clip_norm
    return {k: (reference[k].double() + d * scale +
                torch.randn(d.shape, generator=rng, dtype=torch.float64) * sigma
                ).to(trained[k].dtype) for k, d in delta.items()}


def epsilon(participations: int, noise_multiplier: float, delta: float) -> float:
    """Epsilon spent by a data owner after ``participations`` noised uploads: one
    full-participation step (sample rate 1) of DP-SGD's accountant per upload."""
    from ..training.dpsgd import epsilon as rdp_epsilon

    return rdp_epsilon([(noise_multiplier, 1.0, participations)], delta)
