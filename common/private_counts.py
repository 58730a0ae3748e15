"""Counts released under differential privacy: the Gaussian mechanism on a node's evaluation counts.

An evaluation reply is a few blocks of counts over the node's validation images (the confusion matrix; on the
last round also the score histogram). Adding or removing one image changes each block by 1 in one cell, so the L2
sensitivity of `blocks` blocks is sqrt(blocks). Every cell gets Gaussian noise of standard deviation
``noise_multiplier * sqrt(blocks)``: one release is the Gaussian mechanism with noise multiplier
``noise_multiplier`` (relative to the sensitivity), whose Renyi DP is alpha / (2 noise_multiplier^2): in the
ledger, one step at sample rate 1 (``common.privacy``).

Noised counts are rounded to integers (post-processing, free) but NOT clipped at zero: a negative count keeps the
sum over hospitals unbiased; the coordinator clips only the pooled counts (:func:`clip_pooled`).
"""

from __future__ import annotations

import math

import numpy as np

#: The ledger's record of one release: (noise multiplier, sample rate, steps) with sample rate 1, one step.
RELEASE_SAMPLE_RATE = 1.0
RELEASE_STEPS = 1


def noise_std(noise_multiplier: float, blocks: int) -> float:
    """Standard deviation of the noise on each count of a release of `blocks` blocks."""
    if noise_multiplier <= 0 or blocks < 1:
        raise ValueError("noise multiplier must be > 0 and blocks >= 1")
    return noise_multiplier * math.sqrt(blocks)


def release_counts(counts: np.ndarray, *, std: float, rng: np.random.Generator) -> np.ndarray:
    """`counts` plus Gaussian noise of `std`, rounded to integers (may be negative)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.rint(counts + rng.normal(0.0, std, size=counts.shape)).astype(np.int64)


def clip_pooled(counts: np.ndarray) -> np.ndarray:
    """Pooled noised counts made usable as counts: negatives set to zero (post-processing)."""
    return np.maximum(np.asarray(counts, dtype=np.int64), 0)
