"""Intervals and paired tests for evaluation results, from per-sample outcomes (pure numpy).

A model's main metric on a task is the mean of its per-sample outcomes (one value per eval image or triplet).
A subset trained with K seeds has, per task, a K x n array of outcomes. Its result is uncertain for two reasons:

- the eval images are a sample: resampling them with replacement (bootstrap) shows how the mean moves;
- the training seed: another seed gives another model; the mean over K seeds varies with variance s^2 / K, where
  s^2 is the variance of the per-seed metric (measured on the same images, so it is training noise).

Both are combined in every bootstrap replicate: the images are resampled (one draw shared by every task with as
many samples, and by both sides of a paired comparison), the resampled per-image outcomes are averaged over seeds
and tasks, and an independent seed term is added: sqrt(s^2 / K) times a Student t draw with K - 1 degrees of
freedom (few seeds say little about s^2, so the term has heavy tails). With one seed there is no seed term: the
interval then covers the eval images only. The interval is the 2.5 and 97.5 percentiles of the replicates, kept
within the range a mean of the outcomes can take (e.g. [0, 1] for accuracies).

A paired comparison of subsets A and B on the same eval images bootstraps the per-image differences of their
seed-averaged outcomes, plus a seed term with the pooled seed variance s^2 (1/K_a + 1/K_b) and K_a + K_b - 2
degrees of freedom. Its two-sided p is 2 min(share of replicates <= 0, share >= 0); the difference is
significant at 5% when p < 0.05, i.e. when its 95% interval excludes 0. (The seed term slightly double counts
the per-image seed noise that the image bootstrap already sees: the test errs on the cautious side.)

What a comparison may claim (:func:`verdict`): with fewer than 2 seeds on either side the seed-to-seed variance
is unknown (a second seed of the same subset can move the average by more than the eval images' interval), so
such a difference is never called significant; several comparisons made together are adjusted for their number
with Holm's step-down method (:func:`holm`), which keeps the chance of any false "significant" among them at 5%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 4000


@dataclass
class Estimate:
    """A subset's result: ``mean`` over seeds, its 95% ``low``/``high`` interval, ``seeds``, ``spread`` (max - min
    of the per-seed values)."""

    mean: float
    low: float
    high: float
    seeds: int
    spread: float


@dataclass
class Difference:
    """A - B: ``diff``, its 95% interval, the two-sided ``p``, whether p < 5% (before any adjustment for multiple
    comparisons), and the seeds on each side."""

    diff: float
    low: float
    high: float
    p: float
    significant: bool
    seeds: tuple[int, int] = (0, 0)

    @property
    def one_seed(self) -> bool:
        """True when a side has a single seed: its seed-to-seed variance is unknown."""
        return min(self.seeds) < 2


ONE_SEED = "one seed: no seed variance"


def verdict(d: Difference | None, p_adjusted: float | None = None, level: float = 0.05) -> str:
    """What a comparison may claim: "significant" (adjusted p below ``level``, 2+ seeds on both sides), "not
    significant", ``ONE_SEED`` (never significant: a second seed could move it) or "n/a"."""
    if d is None:
        return "n/a"
    if d.one_seed:
        return ONE_SEED
    p = d.p if p_adjusted is None else p_adjusted
    return "significant" if p < level else "not significant"


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment of the p values of comparisons made together: the i-th smallest is multiplied
    by (m - i + 1), kept monotone and at most 1."""
    order = np.argsort(ps, kind="stable")
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def _per_seed(tasks: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """The per-seed metric: (weighted) mean over tasks of each seed's mean outcome."""
    return np.average([np.asarray(x, float).mean(axis=1) for x in tasks], axis=0, weights=weights)


def _replicates(per_image: list[np.ndarray], seed_sd: float, df: int, n_boot: int, rng,
                weights: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap replicates of the (weighted) mean over tasks of each task's per-image mean, plus the seed term."""
    w = np.full(len(per_image), 1 / len(per_image)) if weights is None else np.asarray(weights, float) / np.sum(weights)
    out = np.empty(n_boot)
    block = max(1, (1 << 22) // max(len(x) for x in per_image))  # bounds the index arrays to ~32 MB
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        draws: dict[int, np.ndarray] = {}
        total = np.zeros(b)
        for x, wx in zip(per_image, w):
            if len(x) not in draws:
                draws[len(x)] = rng.integers(0, len(x), (b, len(x)))
            total += wx * x[draws[len(x)]].mean(axis=1)
        out[start:start + b] = total
    if df >= 1 and seed_sd > 0:
        out += rng.standard_t(df, n_boot) * seed_sd
    return out


def _check(tasks: list[np.ndarray]) -> list[np.ndarray]:
    arrays = [np.atleast_2d(np.asarray(x, float)) for x in tasks]
    if not arrays or any(a.shape[0] != arrays[0].shape[0] or a.shape[1] == 0 for a in arrays):
        raise ValueError("each task needs a seeds x samples array with the same number of seeds")
    return arrays


def estimate(tasks: list[np.ndarray], n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95,
             weights: np.ndarray | None = None) -> Estimate:
    """The mean over seeds of the average over ``tasks`` (each a seeds x samples array of outcomes; ``weights``:
    a weighted average, e.g. a curve's area) with its interval over eval images and seeds (module docstring)."""
    tasks = _check(tasks)
    per_seed = _per_seed(tasks, weights)
    k = len(per_seed)
    sd = float(np.sqrt(per_seed.var(ddof=1) / k)) if k > 1 else 0.0
    reps = _replicates([x.mean(axis=0) for x in tasks], sd, k - 1, n_boot, np.random.default_rng(seed), weights)
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    bounds = np.mean([x.min() for x in tasks]), np.mean([x.max() for x in tasks])  # a mean stays within them
    return Estimate(float(per_seed.mean()), float(max(low, bounds[0])), float(min(high, bounds[1])), k,
                    float(np.ptp(per_seed)))


def compare(a: list[np.ndarray], b: list[np.ndarray], n_boot: int = N_BOOT, seed: int = 0,
            level: float = 0.95) -> Difference:
    """A paired test of A - B on the same eval images (task i of ``a`` and of ``b`` hold the same samples in the
    same order; the seed counts may differ)."""
    a, b = _check(a), _check(b)
    if len(a) != len(b) or any(x.shape[1] != y.shape[1] for x, y in zip(a, b)):
        raise ValueError("a paired comparison needs the same tasks with the same samples on both sides")
    sa, sb = _per_seed(a), _per_seed(b)
    df = len(sa) + len(sb) - 2
    pooled = (((sa - sa.mean()) ** 2).sum() + ((sb - sb.mean()) ** 2).sum()) / df if df > 0 else 0.0
    sd = float(np.sqrt(pooled * (1 / len(sa) + 1 / len(sb))))
    diffs = [x.mean(axis=0) - y.mean(axis=0) for x, y in zip(a, b)]
    reps = _replicates(diffs, sd, df, n_boot, np.random.default_rng(seed))
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    p = float(min(1.0, 2 * min((reps <= 0).mean(), (reps >= 0).mean())))
    return Difference(float(sa.mean() - sb.mean()), float(low), float(high), p, p < 1 - level, (len(sa), len(sb)))
