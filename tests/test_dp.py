"""Client-side differential privacy: clipping, Gaussian noise, and the epsilon accounted."""

from __future__ import annotations

import math

import pytest
import torch

from fl_offsite.federation.privacy import epsilon, privatize

REF = {"a": torch.zeros(200, 50), "b": torch.zeros(1000)}


def norm(t):
    return math.sqrt(sum(float((t[k] - REF[k]).double().pow(2).sum()) for k in REF))


def test_updates_are_clipped_to_the_bound():
    trained = {k: v + 3.0 for k, v in REF.items()}
    assert norm(privatize(trained, REF, clip_norm=2.0, noise_multiplier=0.0)) == \
        pytest.approx(2.0, rel=1e-6)
    small = {k: v + 1e-4 for k, v in REF.items()}
    assert norm(privatize(small, REF, 2.0, 0.0)) == pytest.approx(norm(small), rel=1e-6)


def test_noise_has_the_configured_scale_and_is_fresh_each_time():
    first = privatize(REF, REF, clip_norm=0.5, noise_multiplier=2.0)
    second = privatize(REF, REF, clip_norm=0.5, noise_multiplier=2.0)
    values = torch.cat([first[k].flatten() for k in REF]).double()
    assert float(values.std()) == pytest.approx(1.0, rel=0.05)  # sigma = 2.0 * 0.5
    assert not torch.equal(first["a"], second["a"])


def test_epsilon_grows_with_rounds_shrinks_with_noise_and_respects_the_rdp_bound():
    assert epsilon(0, 1.0, 1e-5) == 0.0
    eps = [epsilon(t, 1.0, 1e-5) for t in (1, 2, 5)]
    assert eps == sorted(eps) and eps[0] > 0
    assert epsilon(5, 2.0, 1e-5) < eps[-1]
    # Gaussian mechanism RDP: T * alpha / (2 z^2); classic conversion is an upper bound
    classic = min(5 * a / 2 + math.log(1e5) / (a - 1) for a in [1 + x / 10 for x in range(1, 1000)])
    assert eps[-1] <= classic
