"""Float64 reference attention (forward and analytic backward) that the schedules are checked against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Problem", "make_problem", "element_mask", "attention_forward", "attention_backward"]


@dataclass
class Problem:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    do: np.ndarray  # upstream gradient dL/dO, used by backward schedules
    scale: float

    @property
    def seqlen(self) -> int:
        return self.q.shape[0]

    @property
    def headdim(self) -> int:
        return self.q.shape[1]


def make_problem(seqlen: int, headdim: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((seqlen, headdim)) for _ in range(4))
    return Problem(q, k, v, do, 1.0 / np.sqrt(headdim))


def element_mask(seqlen: int, causal: bool = False, block_mask=None, block_rows: int = 0, block_cols: int = 0):
    """Boolean (N, N) mask of the (query, key) pairs that take part, or None for dense attention.

    causal: query i sees keys j <= i (top-left aligned, as torch's SDPA). block_mask[i, j] selects
    the block of rows i*block_rows.. and columns j*block_cols.. .
    """
    if not causal and block_mask is None:
        return None
    mask = np.ones((seqlen, seqlen), dtype=bool)
    if causal:
        mask &= np.tril(mask)
    if block_mask is not None:
        rows = np.arange(seqlen) // block_rows
        cols = np.arange(seqlen) // block_cols
        mask &= np.asarray(block_mask, dtype=bool)[rows[:, None], cols[None, :]]
    return mask


def _probabilities(q, k, scale, mask):
    s = scale * (q @ k.T)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    denom = p.sum(axis=1, keepdims=True)
    empty = denom == 0
    lse = np.where(empty, -np.inf, m_safe + np.log(np.where(empty, 1.0, denom)))
    p = np.where(empty, 0.0, p / np.where(empty, 1.0, denom))
    return p, lse.reshape(-1)


def attention_forward(q, k, v, scale, mask=None):
    """O = softmax(scale q k^T (masked)) v and the natural-log row sums lse; empty rows give 0, -inf."""
    p, lse = _probabilities(q, k, scale, mask)
    return p @ v, lse


def attention_backward(q, k, v, do, scale, mask=None):
    """Analytic gradients: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    dQ = scale dS K, dK = scale dS^T Q."""
    p, _ = _probabilities(q, k, scale, mask)
    o = p @ v
    dv = p.T @ do
    dp = do @ v.T
    delta = (do * o).sum(axis=1, keepdims=True)
    ds = p * (dp - delta)
    return scale * ds @ k, scale * ds.T @ q, dv
