"""Intervals for the miniature study: a statistic of per-image outcomes pooled over several runs, one run per
(training seed, attack seed) pair, and the paired difference between two models run on the same seed pairs.

    runs = [outcomes_of_run_1, ...]                       # each (images,) or (images, snapshots), same image count
    interval(runs)                                        # Estimate(value, low, high): the pooled mean, 95%
    interval(runs, recovery_statistic(steps, base_rate))  # steps to half recovery, from (images, snapshots) runs
    interval(feature_runs, per_resample(lambda f: frechet_distance(f, real)))  # any statistic of the pooled images
    paired_difference(lt_runs, naive_runs).resolved       # its 95% interval excludes 0

The interval is a two-level (hierarchical) percentile bootstrap: each resample draws as many runs as there are,
with replacement, and then, within each drawn run, as many images as it has, with replacement; the statistic of
the pooled drawn images is one bootstrap value, and the interval is the 2.5% and 97.5% order statistics of
RESAMPLES values drawn from a generator seeded with SEED (the same data always give the same interval). Drawing
runs carries the spread between seeds into the interval, drawing images the sampling noise within a run. With
few runs (3 training x 2 attack seeds) the run level sees only a handful of distinct values, so the interval
can be narrower than the truth when seeds differ a lot: a limit of any resampling of six units, said here so
that a "resolved" difference is read with it.

An image keeps its row across the snapshots of a run (the same prompt and starting noise at every attack step),
so rows are drawn whole and a recovery curve stays the curve of the same images. In a paired difference the i-th
runs of both models share their seed pair and their images (same prompts, same starting noise): a resample draws
the pair indices once for both and the image indices once for both, so identical data give exactly 0.
"""
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

RESAMPLES = 2000  # the 2.5% and 97.5% order statistics then rest on 50 values each side
SEED = 0
LEVEL = 0.95
CHUNK_VALUES = 2 ** 24  # float64 values drawn at once (128 MiB): resamples are processed in chunks of this size


@dataclass(frozen=True)
class Estimate:
    value: float  # the statistic of all the data, pooled
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The 95% interval excludes 0 (for a difference: the sign is known)."""
        return self.low > 0 or self.high < 0


def pooled_mean(pooled: np.ndarray) -> np.ndarray:
    """The default statistic: (B, images) outcomes -> (B,) means (a rate of 0/1 outcomes, a mean score)."""
    return pooled.mean(axis=1)


def per_resample(function: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], np.ndarray]:
    """A statistic from a function of one pooled sample, e.g. the Frechet distance of (images, features) judge
    features to real ones: per_resample(lambda features: frechet_distance(features, real)). A resample repeats
    some images and drops others, which narrows the feature spread: a bootstrap FD sits above the FD of all
    images, so its interval compares cells of equal image counts, not against an FD computed without resampling."""
    return lambda pooled: np.array([function(sample) for sample in pooled])


def steps_to_half(steps: Sequence[float], rates: Sequence[float], base_rate: float) -> float:
    """The first attack step at which the harmful rate reaches half of base_rate, linearly interpolated between
    the two snapshots around the crossing; the first snapshot when the curve starts there already; +inf when it
    never gets there within the snapshots ("not reached": later than the last snapshot, by an unknown amount)."""
    steps, rates = np.asarray(steps, dtype=float), np.asarray(rates, dtype=float)
    target = base_rate / 2
    reached = np.flatnonzero(rates >= target)
    if len(reached) == 0:
        return float("inf")
    i = reached[0]
    if i == 0:
        return float(steps[0])
    s0, s1, r0, r1 = steps[i - 1], steps[i], rates[i - 1], rates[i]
    return float(s0 + (target - r0) / (r1 - r0) * (s1 - s0))


def recovery_auc(steps: Sequence[float], rates: Sequence[float]) -> float:
    """Area under the harmful-rate curve over the snapshot steps (trapezoids), divided by the step range: the
    mean harmful rate over the attack, in 0..1 for rates in 0..1. Uneven snapshots weigh by the steps they span."""
    steps, rates = np.asarray(steps, dtype=float), np.asarray(rates, dtype=float)
    return float(np.trapezoid(rates, steps) / (steps[-1] - steps[0]))


def recovery_statistic(steps: Sequence[float], base_rate: float) -> Callable[[np.ndarray], np.ndarray]:
    """A statistic of (B, images, snapshots) 0/1 outcomes: steps to half of base_rate for each resample's pooled
    curve. base_rate is taken as known (the base model's pooled rate, near 1): its own noise is not carried."""
    return lambda pooled: np.array([steps_to_half(steps, curve, base_rate) for curve in pooled.mean(axis=1)])


def auc_statistic(steps: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    """A statistic of (B, images, snapshots) outcomes: the area under each resample's pooled recovery curve."""
    return lambda pooled: np.array([recovery_auc(steps, curve) for curve in pooled.mean(axis=1)])


def _stack(runs: Sequence[np.ndarray]) -> np.ndarray:
    runs = [np.asarray(run, dtype=float) for run in runs]
    if not runs or len({run.shape for run in runs}) != 1 or len(runs[0]) == 0:
        raise ValueError(f"runs must be one or more non-empty arrays of one shape, got shapes "
                         f"{[run.shape for run in runs]}")
    return np.stack(runs)  # (runs, images, ...)


def _draws(rng: np.random.Generator, n_runs: int, n_images: int, resamples: int, chunk: int):
    """Yields (run indices (b, n_runs), image indices (b, n_runs, n_images)) for chunks of b resamples."""
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        yield rng.integers(n_runs, size=(b, n_runs)), rng.integers(n_images, size=(b, n_runs, n_images))


def _resampled(stacked: np.ndarray, runs: np.ndarray, images: np.ndarray) -> np.ndarray:
    """(b, n_runs * n_images, ...): each resample's drawn images of its drawn runs, pooled."""
    drawn = stacked[runs[:, :, None], images]  # (b, n_runs, n_images, ...)
    return drawn.reshape(len(runs), -1, *stacked.shape[2:])


def _chunk(stacked: np.ndarray) -> int:
    return max(1, CHUNK_VALUES // stacked.size)


def _interval(values: np.ndarray) -> tuple[float, float]:
    """The (1 - LEVEL) / 2 and (1 + LEVEL) / 2 order statistics; no interpolation, so +-inf values stay usable."""
    ordered = np.sort(values)
    n = len(ordered)
    low = int(np.floor((1 - LEVEL) / 2 * n))
    high = int(np.ceil((1 + LEVEL) / 2 * n)) - 1
    return float(ordered[low]), float(ordered[high])


def bootstrap(runs: Sequence[np.ndarray], statistic=pooled_mean, resamples: int = RESAMPLES,
              seed: int = SEED) -> np.ndarray:
    """The (resamples,) bootstrap values of statistic: runs drawn with replacement, then images within each."""
    stacked = _stack(runs)
    rng = np.random.default_rng(seed)
    return np.concatenate([statistic(_resampled(stacked, r, i))
                           for r, i in _draws(rng, len(stacked), stacked.shape[1], resamples, _chunk(stacked))])


def interval(runs: Sequence[np.ndarray], statistic=pooled_mean, resamples: int = RESAMPLES,
             seed: int = SEED) -> Estimate:
    """The statistic of all runs pooled, with its two-level bootstrap 95% interval. For steps to half recovery
    an upper end of +inf says: in more than 2.5% of resamples the curve was not back within the snapshots."""
    stacked = _stack(runs)
    value = float(statistic(stacked.reshape(1, -1, *stacked.shape[2:]))[0])
    return Estimate(value, *_interval(bootstrap(runs, statistic, resamples, seed)))


def centred_interval(runs: Sequence[np.ndarray], statistic, resamples: int = RESAMPLES,
                     seed: int = SEED) -> Estimate:
    """interval() for a biased statistic such as the Frechet distance, whose bootstrap values all sit above its
    value on all images (a resample repeats images, which narrows their spread): the percentile interval moved by
    the bias the bootstrap shows, value - median(bootstrap values), so that it is centred where the value is."""
    stacked = _stack(runs)
    value = float(statistic(stacked.reshape(1, -1, *stacked.shape[2:]))[0])
    values = bootstrap(runs, statistic, resamples, seed)
    low, high = _interval(values)
    shift = value - float(np.median(values))
    return Estimate(value, low + shift, high + shift)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b, where both "not reached" (+inf) count as no difference: neither is known beyond the last snapshot,
    so a tie is the conservative reading; one +inf against a finite value is an infinite difference."""
    both_infinite = np.isinf(a) & np.isinf(b) & (a == b)
    with np.errstate(invalid="ignore"):
        return np.where(both_infinite, 0.0, a - b)


def paired_difference(runs_a: Sequence[np.ndarray], runs_b: Sequence[np.ndarray], statistic=pooled_mean,
                      resamples: int = RESAMPLES, seed: int = SEED) -> Estimate:
    """statistic(a) - statistic(b) with its 95% interval, where runs_a[i] and runs_b[i] come from the same seed
    pair and have the same images: each resample draws seed pairs, and images within them, jointly for a and b."""
    a, b = _stack(runs_a), _stack(runs_b)
    if a.shape != b.shape:
        raise ValueError(f"paired runs must have the same shape, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    values = np.concatenate([difference(statistic(_resampled(a, r, i)), statistic(_resampled(b, r, i)))
                             for r, i in _draws(rng, len(a), a.shape[1], resamples, _chunk(a))])
    pooled = (1, -1, *a.shape[2:])
    value = float(difference(statistic(a.reshape(pooled)), statistic(b.reshape(pooled)))[0])
    return Estimate(value, *_interval(values))
