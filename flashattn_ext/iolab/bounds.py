"""Closed forms of every schedule's slow-memory traffic, and the published lower bounds.

Each ``*_io`` function is derived from the loop structure of its schedule (see the schedule
modules), with the ceilings of non-divisible sizes, and returns exact integers per array plus the
schedule's exact peak of fast memory. They never run a schedule: the tests check that the
simulated counts equal them word for word.

Notation: N = sequence length (queries = keys), d = head dimension, M = fast-memory words,
T_x = ceil(N / b_x) blocks of size b_x. All counts are in words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import sqrt

import numpy as np

__all__ = [
    "IOCount",
    "cdiv",
    "standard_io",
    "flash1_io",
    "flash2_io",
    "block_sparse_io",
    "square_tiling_io",
    "flash_backward_io",
    "tiled_backward_io",
    "compulsory_forward",
    "compulsory_backward",
    "lower_bound_standard_matmul",
    "lower_bound_any_matmul",
    "lower_bound_block_sparse",
    "lower_bound_backward",
    "lower_bound",
    "leading_term",
]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class IOCount:
    reads: dict[str, int] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)
    peak: int = 0

    @property
    def reads_words(self) -> int:
        return sum(self.reads.values())

    @property
    def writes_words(self) -> int:
        return sum(self.writes.values())

    @property
    def io_words(self) -> int:
        return self.reads_words + self.writes_words

    def add(self, other: "IOCount") -> "IOCount":
        out = IOCount(dict(self.reads), dict(self.writes), max(self.peak, other.peak))
        for src, dst in ((other.reads, out.reads), (other.writes, out.writes)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        return out

    def clean(self) -> "IOCount":
        return IOCount({k: int(v) for k, v in self.reads.items() if v},
                       {k: int(v) for k, v in self.writes.items() if v}, int(self.peak))


def _blocks(n: int, b: int) -> np.ndarray:
    """Start offsets of the blocks of size b covering 0..n."""
    return np.arange(0, n, b, dtype=np.int64)


def causal_rows_per_col_block(N: int, br: int, bc: int) -> np.ndarray:
    """For each key block j: rows of the query blocks not entirely above the diagonal.

    Query block i (rows i*br .. min((i+1)*br, N) - 1) sees some key of block j (first key j*bc)
    iff its last row >= j*bc, i.e. i >= floor(j*bc / br); those blocks cover N - br*floor(j*bc/br) rows.
    """
    c0 = _blocks(N, bc)
    return N - br * (c0 // br)


def causal_cols_per_row_block(N: int, br: int, bc: int) -> np.ndarray:
    """For each query block i: columns of the key blocks not entirely above the diagonal.

    Key block j is needed iff j*bc <= last row r = min((i+1)*br, N) - 1, i.e. j <= floor(r / bc):
    min(N, bc*(floor(r/bc) + 1)) columns.
    """
    last = np.minimum(_blocks(N, br) + br, N) - 1
    return np.minimum(N, bc * (last // bc + 1))


# ---------------------------------------------------------------------------- forward schedules
def standard_io(N, d, bm, bn, bk, softmax_rows, softmax_chunk, cm, cd, ck) -> IOCount:
    """Standard attention: S = scale Q K^T written, P = softmax(S) written, O = P V.

    S: C-stationary tiles bm x bn, the d-axis streamed in chunks of bk.
    softmax: softmax_rows > 0: whole rows, softmax_rows at a time (one read of S);
             softmax_rows == 0: one row at a time in chunks of softmax_chunk, two passes.
    O: tiles cm x cd, the N-axis (keys) streamed in chunks of ck.
    """
    T_m, T_n, T_om, T_od = cdiv(N, bm), cdiv(N, bn), cdiv(N, cm), cdiv(d, cd)
    two_pass = softmax_rows == 0
    reads = {"Q": N * d * T_n, "K": N * d * T_m, "S": N * N * (2 if two_pass else 1),
             "P": N * N * T_od, "V": N * d * T_om}
    writes = {"S": N * N, "P": N * N, "O": N * d}
    bm, bn, cm, cd = min(bm, N), min(bn, N), min(cm, N), min(cd, d)
    peak_s = bm * bn + min(bk, d) * (bm + bn)
    peak_soft = softmax_chunk + 2 if two_pass else min(softmax_rows, N) * (N + 2)
    peak_o = cm * cd + min(ck, N) * (cm + cd)
    return IOCount(reads, writes, max(peak_s, peak_soft, peak_o))


def flash1_peak(d, br, bc):
    return 2 * bc * d + 2 * br * d + br * bc + 6 * br


def flash1_io(N, d, br, bc, causal=False) -> IOCount:
    """FlashAttention (Dao et al. 2022, Algorithm 1): key blocks outer, query blocks inner.

    O, l, m are initialised in slow memory, then every inner step reads Q_i, O_i, l_i, m_i and
    writes O_i, l_i, m_i. Per key block the inner loop covers R_j rows (N, or fewer when causal).
    """
    br, bc = min(br, N), min(bc, N)
    R = int(causal_rows_per_col_block(N, br, bc).sum()) if causal else cdiv(N, bc) * N
    reads = {"K": N * d, "V": N * d, "Q": R * d, "O": R * d, "l": R, "m": R}
    writes = {"O": N * d + R * d, "l": N + R, "m": N + R}
    return IOCount(reads, writes, flash1_peak(d, br, bc))


def flash2_peak(d, br, bc):
    return 2 * br * d + 3 * br + 2 * bc * d + br * bc


def flash2_io(N, d, br, bc, causal=False) -> IOCount:
    """FlashAttention-2 order: query blocks outer (Q_i, O_i, row stats resident), key blocks inner."""
    br, bc = min(br, N), min(bc, N)
    C = int(causal_cols_per_row_block(N, br, bc).sum()) if causal else cdiv(N, br) * N
    reads = {"Q": N * d, "K": C * d, "V": C * d}
    writes = {"O": N * d, "lse": N}
    return IOCount(reads, writes, flash2_peak(d, br, bc))


def block_sparse_io(N, d, br, bc, block_mask, causal=False) -> IOCount:
    """Block-sparse FlashAttention in the FA2 order: only blocks (i, j) with mask[i, j] are visited."""
    br, bc = min(br, N), min(bc, N)
    mask = np.asarray(block_mask, dtype=bool).copy()
    rows = np.minimum(_blocks(N, br) + br, N) - _blocks(N, br)
    cols = np.minimum(_blocks(N, bc) + bc, N) - _blocks(N, bc)
    if mask.shape != (len(rows), len(cols)):
        raise ValueError(f"block mask {mask.shape} for {len(rows)} x {len(cols)} blocks")
    if causal:
        last = _blocks(N, br) + rows - 1
        mask &= _blocks(N, bc)[None, :] <= last[:, None]
    C = int((mask * cols[None, :]).sum())
    reads = {"Q": N * d, "K": C * d, "V": C * d}
    writes = {"O": N * d, "lse": N}
    step = np.where(mask, 2 * cols[None, :] * d + rows[:, None] * cols[None, :], 0).max(axis=1)
    peak = int((2 * rows * d + 3 * rows + step).max())
    return IOCount(reads, writes, peak)


def square_tiling_io(N, d, bm, bn, bk, cm, cd, ck) -> IOCount:
    """Saha & Ye's square tiling for small caches, with the softmax normaliser fused in.

    Stage 1 (query tiles bm outer, key tiles bn inner, d streamed in chunks of bk): each tile of
    S is computed, shifted by the running row max and exponentiated, and written as Pt; the shift
    is written to Mblk (N x T_n) and lse is written once per row.
    Stage 2: O = P V with tiles cm x cd; for each key block the tile reads its shifts and scales
    Pt's rows by exp(Mblk - lse) while streaming Pt and V in chunks of ck.
    """
    T_m, T_n, T_om, T_od = cdiv(N, bm), cdiv(N, bn), cdiv(N, cm), cdiv(d, cd)
    reads = {"Q": N * d * T_n, "K": N * d * T_m, "Pt": N * N * T_od, "V": N * d * T_om,
             "lse": N * T_od, "Mblk": N * T_n * T_od}
    writes = {"Pt": N * N, "Mblk": N * T_n, "lse": N, "O": N * d}
    bm, bn, cm, cd = min(bm, N), min(bn, N), min(cm, N), min(cd, d)
    peak1 = bm * bn + 3 * bm + min(bk, d) * (bm + bn)
    peak2 = cm * cd + 2 * cm + min(ck, bn) * (cm + cd)
    return IOCount(reads, writes, max(peak1, peak2))


# ---------------------------------------------------------------------------- backward schedules
def delta_pass_peak(d, rows, chunk=0):
    """D = rowsum(dO * O): `rows` whole rows at a time, or (rows == 0) one row in column chunks."""
    return 2 * rows * d + rows if rows else 2 * chunk + 1


def flash_backward_peak(d, br, bc):
    return 4 * bc * d + 3 * br * d + 2 * br + 2 * br * bc


def flash_backward_io(N, d, br, bc, delta_rows, causal=False) -> IOCount:
    """FlashAttention backward (FA2 style): D = rowsum(dO * O) first, then key blocks outer with
    K_j, V_j, dK_j, dV_j resident and query blocks inner; P is recomputed from lse, dQ_i is
    read-modify-written (read from the second key block on)."""
    br, bc = min(br, N), min(bc, N)
    Rj = causal_rows_per_col_block(N, br, bc) if causal else np.full(cdiv(N, bc), N)
    R, R_after_first = int(Rj.sum()), int(Rj[1:].sum())
    reads = {"O": N * d, "dO": N * d + R * d, "K": N * d, "V": N * d, "Q": R * d,
             "lse": R, "D": R, "dQ": R_after_first * d}
    writes = {"D": N, "dQ": R * d, "dK": N * d, "dV": N * d}
    peak = max(delta_pass_peak(d, min(delta_rows, N)), flash_backward_peak(d, br, bc))
    return IOCount(reads, writes, peak)


def tiled_backward_io(N, d, p_tiles, ds_tiles, nd_tiles, delta_rows, delta_chunk=0) -> IOCount:
    """Small-cache backward: tiled products with P and dS materialised in slow memory.

    1. P = exp(scale Q K^T - lse)          tiles p_tiles = (bm, bn, bk) over (queries, keys), d streamed
    2. dV = P^T dO                         tiles nd_tiles = (bm, bd, bk) over (keys, d), queries streamed
    3. D = rowsum(dO * O)                   delta_rows rows at a time (0: one row, delta_chunk columns)
    4. dS = P * (dO V^T - D)               tiles ds_tiles over (queries, keys), d streamed
    5. dQ = scale dS K,  6. dK = scale dS^T Q   tiles nd_tiles
    """
    am, an, ak = p_tiles
    sm, sn, sk = ds_tiles
    gm, gd, gk = nd_tiles
    T_am, T_an, T_sm, T_sn = cdiv(N, am), cdiv(N, an), cdiv(N, sm), cdiv(N, sn)
    T_gm, T_gd = cdiv(N, gm), cdiv(d, gd)
    reads = {
        "Q": N * d * T_an + N * d * T_gm,
        "K": N * d * T_am + N * d * T_gm,
        "lse": N * T_an,
        "P": N * N * T_gd + N * N,
        "dO": N * d * T_gm + N * d + N * d * T_sn,
        "O": N * d,
        "V": N * d * T_sm,
        "D": N * T_sn,
        "dS": 2 * N * N * T_gd,
    }
    writes = {"P": N * N, "dV": N * d, "D": N, "dS": N * N, "dQ": N * d, "dK": N * d}
    am, an, sm, sn, gm, gd = min(am, N), min(an, N), min(sm, N), min(sn, N), min(gm, N), min(gd, d)
    peak = max(
        am * an + am + min(ak, d) * (am + an),
        gm * gd + min(gk, N) * (gm + gd),
        delta_pass_peak(d, min(delta_rows, N), min(delta_chunk, d)),
        sm * sn + sm + max(min(sk, d) * (sm + sn), sm * sn),
    )
    return IOCount(reads, writes, peak)


# ---------------------------------------------------------------------------- lower bounds
def compulsory_forward(N, d) -> int:
    """Read Q, K, V and write O once: a true lower bound for any forward schedule."""
    return 4 * N * d


def compulsory_backward(N, d) -> int:
    """Read Q, K, V, O, dO and write dQ, dK, dV once."""
    return 8 * N * d


def lower_bound_standard_matmul(N, d, M) -> float:
    """Saha & Ye (ICML 2024) Thm 3.1: Theta(min(N^2 d / sqrt(M), N^2 d^2 / M)) for algorithms that
    use standard matrix multiplication. The two terms meet at M = d^2. Leading term, constant 1."""
    return min(N * N * d / sqrt(M), N * N * d * d / M)


def lower_bound_any_matmul(N, d, M) -> float:
    """Saha & Ye Thm 4.8: Omega(min(N^2 d^2 / M, N^2)) even with fast matrix multiplication."""
    return min(N * N * d * d / M, N * N)


def lower_bound_block_sparse(N, d, M, density) -> float:
    """Dao et al. 2022 Prop. 4: block-sparse FlashAttention needs Theta(N d + N^2 d^2 s / M).

    For M < d^2 we scale the small-cache term the same way (s * N^2 d / sqrt(M)): the non-zero
    scores replace the N^2 of the dense bound. Li et al. (2024) prove sparse lower bounds in terms
    of non-zero counts for both regimes; this is the same shape, not a transcription of their
    statement."""
    return N * d + density * min(N * N * d / sqrt(M), N * N * d * d / M)


def lower_bound_backward(N, d, M) -> float:
    """Li et al. (2024): the backward pass costs Theta(min((N^2 d^2 + N d^3) / M,
    (N^2 d + N d^2) / sqrt(M))), crossover at M = Theta(d^2). Leading term, constant 1."""
    return min((N * N * d * d + N * d ** 3) / M, (N * N * d + N * d * d) / sqrt(M))


def lower_bound(N, d, M, *, backward=False, density=None) -> float:
    """The bound a schedule's count is compared with: the regime bound (constant 1), but never
    below the compulsory traffic of reading the inputs and writing the outputs once."""
    if backward:
        return max(float(compulsory_backward(N, d)), lower_bound_backward(N, d, M))
    if density is not None:
        return max(2.0 * N * d, lower_bound_block_sparse(N, d, M, density))
    return max(float(compulsory_forward(N, d)), lower_bound_standard_matmul(N, d, M))


# ---------------------------------------------------------------------------- leading terms
def _flash1_bc_continuous(d, M) -> float:
    """FA1's key block after fitting (continuous sizes): B_c = M/4d, B_r = min(M/4d, d), scaled
    down together by the factor t that makes the peak 2 B_c d + 2 B_r d + B_r B_c + 6 B_r equal M."""
    bc0 = M / (4 * d)
    br0 = min(bc0, d)
    a = br0 * bc0  # t^2 term
    b = 2 * bc0 * d + 2 * br0 * d + 6 * br0  # t term
    t = min(1.0, (-b + sqrt(b * b + 4 * a * M)) / (2 * a))
    return t * bc0


def leading_term(algorithm: str, N, d, M) -> float:
    """Asymptotic leading term (N -> infinity, fixed d and M) of each schedule's count with its
    tiles chosen as in :mod:`plans`, continuous sizes, ceilings dropped.

    flash1        (N^2 / B_c) (3d + 4): per key block, Q_i, O_i, l_i, m_i read and O_i, l_i, m_i
                  written for all N rows; B_c = M/4d, shrunk as in plans.fit_flash1 (M < 8 d^2)
    flash2        2 N^2 d / B_r with B_r = (M - 2d) / (2d + 4)  (B_c -> 1)
    square-tiling 2 N^2 d / b + N^2 (1 + d / c_d) + N^2 d / c_m  with b = sqrt(M) for stage 1,
                  c_d = min(d, sqrt(M)), c_m = M / c_d for stage 2
    standard      as square tiling, plus the softmax pass (S read once, or twice when a row of
                  S does not fit, and P written)
    flash-bwd     (N^2 / B_c) (4d + 2) with B_c = (M - 3d - 2) / (4d + 2)  (B_r -> 1)
    tiled-bwd     4 N^2 d / b + 3 N^2 d / c_d + 3 N^2 d / c_m + 3 N^2
    """
    b = sqrt(M)
    cd = min(d, b)
    cm = M / cd
    if algorithm == "flash1":
        return N * N * (3 * d + 4) / _flash1_bc_continuous(d, M)
    if algorithm in ("flash2", "block-sparse"):
        return 2 * N * N * d * (2 * d + 4) / (M - 2 * d)
    if algorithm == "square-tiling":
        return 2 * N * N * d / b + N * N * (1 + d / cd) + N * N * d / cm
    if algorithm == "standard":
        soft = 3 if M >= N + 2 else 4
        return 2 * N * N * d / b + N * N * (soft + d / cd) + N * N * d / cm
    if algorithm == "flash-bwd":
        return N * N * (4 * d + 2) * (4 * d + 2) / (M - 3 * d - 2)
    if algorithm == "tiled-bwd":
        # P and dS products stream d (2 N^2 d / b each) and write N^2 each; dV, dQ, dK read an
        # N x N matrix d / c_d times and an N x d one N / c_m times; dS also reads P once.
        return 4 * N * N * d / b + 3 * N * N * d / cd + 3 * N * N * d / cm + 3 * N * N
    raise KeyError(algorithm)
