"""Means over seeds with intervals: the two-level bootstrap over seeds and clustered test examples."""
import numpy as np
import pytest

from w2s_jax import stats


def test_estimate_is_the_mean_over_seeds_of_per_seed_means():
    values = {0: [1, 0, 1, 1], 1: [0, 0, 1, 1], 2: [1, 1, 1, 1]}
    sampler = stats.Resampler([0, 1, 2], ["a", "b", "c", "d"], n_boot=200)
    estimate, replicates = sampler.mean(values)
    assert estimate == pytest.approx(np.mean([0.75, 0.5, 1.0]))
    assert replicates.shape == (200,)


def test_interval_is_clustered():
    """200 clusters of 5 identical outcomes: the effective sample is 200, not 1,000. The clustered standard error
    is sqrt(0.25 / 200) = 0.035, so the 95% interval is about +-0.069; an unclustered one would be +-0.031."""
    rng = np.random.default_rng(0)
    outcome = np.repeat(rng.integers(0, 2, 200), 5)
    clusters = np.repeat(np.arange(200), 5)
    est, reps = stats.Resampler([0], clusters, n_boot=4000).mean({0: outcome})
    lo, hi = stats.interval(reps)
    assert 0.06 < (hi - lo) / 2 < 0.08
    est, reps = stats.Resampler([0], np.arange(1000), n_boot=4000).mean({0: outcome})
    lo, hi = stats.interval(reps)
    assert 0.025 < (hi - lo) / 2 < 0.037


def test_seed_spread_widens_the_interval():
    outcome = np.ones(400)
    same = {s: outcome for s in range(5)}
    spread = {s: np.where(np.arange(400) < 300 + 20 * s, 1.0, 0.0) for s in range(5)}
    sampler = stats.Resampler(range(5), np.arange(400), n_boot=2000)
    assert stats.interval(sampler.mean(same)[1]) == (1.0, 1.0)
    lo, hi = stats.interval(sampler.mean(spread)[1])
    assert hi - lo > 0.05


def test_where_restricts_the_mean():
    sampler = stats.Resampler([0], np.arange(4), n_boot=100)
    est, _ = sampler.mean({0: [1, 0, 0, 1]}, where={0: [True, True, False, False]})
    assert est == 0.5


def test_pgr_defined_only_with_a_gap_outside_noise():
    rng = np.random.default_rng(1)
    n = 2000
    weak = {0: (rng.random(n) < 0.6).astype(float)}
    ceiling = {0: np.maximum(weak[0], rng.random(n) < 0.5)}  # ~0.8
    student = {0: np.maximum(weak[0], rng.random(n) < 0.25)}  # ~0.7
    sampler = stats.Resampler([0], np.arange(n), n_boot=1000)
    out = stats.pgr(sampler.mean(student), sampler.mean(weak), sampler.mean(ceiling))
    expected = (np.mean(student[0]) - np.mean(weak[0])) / (np.mean(ceiling[0]) - np.mean(weak[0]))
    assert out["pgr"] == pytest.approx(expected)
    assert out["pgr_ci"][0] < out["pgr"] < out["pgr_ci"][1] and out["pgr_undefined"] is None
    near = {0: weak[0].copy()}
    near[0][:3] = 1.0  # a gap of at most 3 examples in 2,000
    out = stats.pgr(sampler.mean(student), sampler.mean(weak), sampler.mean(near))
    assert out["pgr"] is None and out["pgr_undefined"] in ("gap within noise", "ceiling not above weak")
    out = stats.pgr(sampler.mean(student), sampler.mean(ceiling), sampler.mean(weak))
    assert out["pgr"] is None and out["pgr_undefined"] == "ceiling not above weak"
