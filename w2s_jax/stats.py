"""Means over seeds with 95% intervals: a two-level bootstrap over seeds and clusters of test examples.

Every number the report gives is a mean over the experiment's seeds of a per-seed statistic computed on the test
set: an accuracy, an agreement, an error agreement; PGR is a ratio of such means. Two things make it noisy:
  - the seed (the split into halves, the head's initialisation, the data order): different per seed;
  - the test set: one finite sample, shared by every seed and every run, whose examples are not independent when
    they share a cluster (chess puzzles from one game).
One bootstrap replicate draws seeds with replacement and, independently, clusters of test examples with
replacement (the same clusters for every run and seed, so differences and ratios stay paired), and recomputes each
statistic from the replicate's means. The interval is the replicate's 2.5th and 97.5th percentiles. With few seeds
the seed part of the spread is underestimated (a resample of n values varies by (n-1)/n of their variance): the
report therefore always gives every seed's value beside the mean.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

N_BOOT = 2000


class Resampler:
    """One set of bootstrap replicates shared by every statistic of a report (so they are paired)."""

    def __init__(self, seeds: Sequence, clusters: Sequence, n_boot: int = N_BOOT, rng_seed: int = 0):
        rng = np.random.default_rng(rng_seed)
        self.seeds = list(seeds)
        names, cluster_of = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
        # weights[b, i]: how often example i is drawn in replicate b (its cluster's draw count).
        draws = rng.integers(0, len(names), size=(n_boot, len(names)))
        counts = np.stack([np.bincount(d, minlength=len(names)) for d in draws])
        self.weights = counts[:, cluster_of].astype(np.float64)
        self.seed_draws = rng.integers(0, len(self.seeds), size=(n_boot, len(self.seeds)))
        self.n_clusters = len(names)

    def mean(self, values: dict, where: dict | None = None) -> tuple[float, np.ndarray]:
        """A per-seed mean over test examples, then the mean over seeds: (estimate, replicates [n_boot]).

        values: {seed: array [n] of per-example values}; where: {seed: bool array [n]}, the examples that count
        (error agreement counts only the supervisor's mistakes). A replicate in which no example counts gives nan.
        """
        v = np.stack([np.asarray(values[s], np.float64) for s in self.seeds])  # [S, n]
        m = (np.ones_like(v) if where is None else
             np.stack([np.asarray(where[s], np.float64) for s in self.seeds]))
        with np.errstate(invalid="ignore", divide="ignore"):
            per_seed = (v * m).sum(1) / m.sum(1)  # [S]
            rep_per_seed = (self.weights @ (v * m).T) / (self.weights @ m.T)  # [B, S]
        reps = np.take_along_axis(rep_per_seed, self.seed_draws, axis=1).mean(1)
        return float(np.mean(per_seed)), reps


def interval(replicates: np.ndarray) -> tuple[float, float] | None:
    """The 95% percentile interval of bootstrap replicates (nan replicates dropped); None when none is finite."""
    finite = replicates[np.isfinite(replicates)]
    if len(finite) < 0.9 * len(replicates):
        return None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def pgr(student: tuple[float, np.ndarray], weak: tuple[float, np.ndarray],
        ceiling: tuple[float, np.ndarray]) -> dict:
    """PGR of means with its interval, or the reason it is undefined.

    Defined only when the gap (ceiling - weak) is positive with its whole 95% interval: a gap within noise makes
    the ratio's interval unbounded, so the report says so instead of printing a number.
    """
    gap = ceiling[0] - weak[0]
    gap_ci = interval(ceiling[1] - weak[1])
    out = {"gap": gap, "gap_ci": gap_ci, "pgr": None, "pgr_ci": None, "pgr_undefined": None}
    if gap <= 0:
        out["pgr_undefined"] = "ceiling not above weak"
    elif gap_ci is None or gap_ci[0] <= 0:
        out["pgr_undefined"] = "gap within noise"
    else:
        out["pgr"] = (student[0] - weak[0]) / gap
        with np.errstate(invalid="ignore", divide="ignore"):
            out["pgr_ci"] = interval((student[1] - weak[1]) / (ceiling[1] - weak[1]))
    return out
