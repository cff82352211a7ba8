"""Helpers shared by the schedules: block iteration, lock-step lane groups, safe softmax pieces."""

from __future__ import annotations

import numpy as np

NEG_INF = -np.inf

# Lock-step lanes hold one tile per lane in host memory; keep a group's arrays modest.
_LANE_ELEMENTS = 1 << 23


def blocks(n: int, b: int):
    """(start, size) of the blocks of size b covering 0..n."""
    for s in range(0, n, b):
        yield s, min(b, n - s)


def row_groups(n: int, b: int, max_lanes: int, per_lane_elements: int, first_block: int = 0):
    """Groups of equal-size row blocks (block index >= first_block) run as lock-step lanes.

    Yields (starts, size): the full blocks in groups of at most max_lanes lanes, then the ragged
    last block on its own. Groups run one after another, so only one lane is ever resident in
    the algorithm being modelled.
    """
    cap = max(1, min(max_lanes, _LANE_ELEMENTS // max(1, per_lane_elements)))
    full_end = (n // b) * b
    starts = np.arange(first_block * b, full_end, b, dtype=np.int64)
    for g in range(0, len(starts), cap):
        yield starts[g:g + cap], b
    if full_end < n and first_block * b <= full_end:
        yield np.array([full_end], dtype=np.int64), n - full_end


def causal_fill(s: np.ndarray, row0, col0: int) -> None:
    """Set the scores of keys after their query to -inf. s: (..., rows, cols); row0: scalar or
    an array with one first row per lane (matching s's leading axis)."""
    rows = np.asarray(row0)[..., None, None] + np.arange(s.shape[-2])[:, None]
    cols = col0 + np.arange(s.shape[-1])
    np.copyto(s, NEG_INF, where=cols > rows)


def mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for a lane stack a (..., r, k) and one shared b (k, n), as a single 2-D GEMM."""
    return (a.reshape(-1, a.shape[-1]) @ b).reshape(a.shape[:-1] + (b.shape[-1],))


def mm_tn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum over lanes and rows of a^T b: a (..., r, m), b (..., r, n) -> (m, n)."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


def finite_or_zero(m: np.ndarray) -> np.ndarray:
    """A shift usable in exp(x - shift): -inf maxima (rows with nothing visible yet) become 0."""
    return np.where(np.isfinite(m), m, 0.0)


def exp_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(a - b) with exp(-inf - anything) = 0 and b = -inf treated as 0."""
    with np.errstate(invalid="ignore"):
        out = np.exp(a - finite_or_zero(b))
    return np.where(np.isneginf(a), 0.0, out)


def safe_div(x: np.ndarray, denom: np.ndarray) -> np.ndarray:
    return np.where(denom == 0, 0.0, x / np.where(denom == 0, 1.0, denom))


def lse_of(m: np.ndarray, l: np.ndarray) -> np.ndarray:
    return np.where(l == 0, NEG_INF, finite_or_zero(m) + np.log(np.where(l == 0, 1.0, l)))
