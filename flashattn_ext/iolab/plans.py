"""Tile sizes for each schedule and a given fast-memory size M.

Every choice is exact: a tile shape is feasible when the schedule's exact peak (from
:mod:`bounds`) is <= M, and "I/O-optimal" means the exact closed-form count is minimal over all
feasible shapes. For a count that depends on (T_m, T_n) = (ceil(m/b_m), ceil(n/b_n)) only, the
smallest b_m with a given T_m leaves the most room for b_n, so it is enough to try the distinct
values ceil(m/T) and, for each, the largest feasible b_n (binary search; peaks are monotone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import bounds
from .bounds import cdiv

__all__ = ["Plan", "block_sizes", "search_tiles", "largest_chunk", "plan_for", "random_block_mask"]


@dataclass
class Plan:
    algorithm: str
    seqlen: int
    headdim: int
    cache_words: int
    causal: bool = False
    tiles: dict = field(default_factory=dict)
    block_mask: np.ndarray | None = None
    note: str = ""

    @property
    def density(self) -> float | None:
        if self.block_mask is None:
            return None
        return float(np.asarray(self.block_mask, dtype=bool).mean())

    def closed_form(self) -> bounds.IOCount:
        N, d, t = self.seqlen, self.headdim, self.tiles
        a = self.algorithm
        if a == "standard":
            return bounds.standard_io(N, d, t["bm"], t["bn"], t["bk"], t["softmax_rows"],
                                      t["softmax_chunk"], t["cm"], t["cd"], t["ck"])
        if a == "flash1":
            return bounds.flash1_io(N, d, t["br"], t["bc"], self.causal)
        if a == "flash2":
            return bounds.flash2_io(N, d, t["br"], t["bc"], self.causal)
        if a == "block-sparse":
            return bounds.block_sparse_io(N, d, t["br"], t["bc"], self.block_mask, self.causal)
        if a == "square-tiling":
            return bounds.square_tiling_io(N, d, t["bm"], t["bn"], t["bk"], t["cm"], t["cd"], t["ck"])
        if a == "flash-bwd":
            return bounds.flash_backward_io(N, d, t["br"], t["bc"], t["delta_rows"], self.causal)
        if a == "tiled-bwd":
            return bounds.tiled_backward_io(N, d, t["p"], t["ds"], t["nd"], t["delta_rows"], t["delta_chunk"])
        raise KeyError(a)


def block_sizes(n: int) -> list[int]:
    """Every distinct ceil(n / T), T = 1..n, ascending: one block size per achievable block count."""
    return sorted(set((-(-n // np.arange(1, n + 1))).tolist()))


def _largest(lo: int, hi: int, ok) -> int:
    """Largest x in [lo, hi] with ok(x), ok monotone (true then false); lo - 1 if none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def search_tiles(m: int, n: int, M: int, peak, cost):
    """Minimise cost(bm, bn) over 1 <= bm <= m, 1 <= bn <= n with peak(bm, bn) <= M.

    cost must depend on (ceil(m/bm), ceil(n/bn)) only and not increase with either size; peak must
    increase with both. Ties go to fewer tiles (a faster simulation), then to the larger bm.
    Returns (bm, bn) normalised to the smallest sizes with the same block counts, or None.
    """
    best, best_key = None, None
    for bm in block_sizes(m):
        bn = _largest(1, n, lambda x: peak(bm, x) <= M)
        if bn < 1:
            break
        bn = cdiv(n, cdiv(n, bn))
        key = (cost(bm, bn), cdiv(m, bm) * cdiv(n, bn), -bm)
        if best_key is None or key < best_key:
            best, best_key = (bm, bn), key
    return best


def largest_chunk(limit: int, M: int, peak) -> int:
    """Largest chunk in [1, limit] with peak(chunk) <= M (the chunk never changes the count)."""
    return max(1, _largest(1, limit, lambda c: peak(c) <= M))


class CacheTooSmall(ValueError):
    pass


def _need(found, algorithm, M, minimum):
    if found is None:
        raise CacheTooSmall(f"{algorithm}: M = {M} words is too small (needs at least {minimum})")
    return found


def _gemm_nd_tiles(N, d, M):
    """Tiles for an N x d product that streams an N-long reduction (P V, P^T dO, dS K, dS^T Q):
    reads N^2 * T_d of the N x N operand and N d * T_m of the N x d one."""
    t = search_tiles(N, d, M, lambda bm, bd: bm * bd + bm + bd,
                     lambda bm, bd: N * N * cdiv(d, bd) + N * d * cdiv(N, bm))
    bm, bd = _need(t, "N x d product", M, 3)
    bk = largest_chunk(N, M, lambda c: bm * bd + c * (bm + bd))
    return bm, bd, bk


def plan_standard(N, d, M):
    t = search_tiles(N, N, M, lambda bm, bn: bm * bn + bm + bn,
                     lambda bm, bn: N * d * (cdiv(N, bm) + cdiv(N, bn)))
    bm, bn = _need(t, "standard", M, 4)
    bk = largest_chunk(d, M, lambda c: bm * bn + c * (bm + bn))
    rows = min(N, M // (N + 2))
    chunk = 0 if rows else min(N, M - 2)
    cm, cd, ck = _gemm_nd_tiles(N, d, M)
    return dict(bm=bm, bn=bn, bk=bk, softmax_rows=rows, softmax_chunk=chunk, cm=cm, cd=cd, ck=ck)


def fit_flash1(N, d, M):
    """FA1's block sizes B_c = ceil(M / 4d), B_r = min(ceil(M / 4d), d) (capped at N), fitted to
    the strict capacity: the paper's sizes can overflow M (ceilings; K_j, V_j, Q_i, O_i already
    fill M when B_r = B_c = M/4d, plus S_ij and six row vectors), so B_c is shrunk one step at a
    time, B_r in proportion (rounded down, at least 1), until the exact peak fits."""
    bc0 = min(cdiv(M, 4 * d), N)
    br0 = min(cdiv(M, 4 * d), d, N)
    for bc in range(bc0, 0, -1):
        br = max(1, min(br0, br0 * bc // bc0))
        if bounds.flash1_peak(d, br, bc) <= M:
            note = "" if (br, bc) == (br0, bc0) else f"paper sizes B_r={br0}, B_c={bc0} overflow M; shrunk"
            return dict(br=br, bc=bc, paper_br=br0, paper_bc=bc0), note
    raise CacheTooSmall(f"flash1: M = {M} words is too small (needs at least {bounds.flash1_peak(d, 1, 1)})")


def plan_flash2(N, d, M):
    t = search_tiles(N, N, M, lambda br, bc: bounds.flash2_peak(d, br, bc),
                     lambda br, bc: bounds.flash2_io(N, d, br, bc).io_words)
    br, bc = _need(t, "flash2", M, bounds.flash2_peak(d, 1, 1))
    return dict(br=br, bc=bc)


def plan_square_tiling(N, d, M):
    """Stage-1 tiles (bm, bn) and stage-2 tiles (cm, cd) minimising the total count jointly (the
    stage-2 count depends on stage 1's T_n through the block shifts Mblk)."""
    stage2 = {}

    def best_stage2(T_n):
        if T_n not in stage2:
            t = search_tiles(N, d, M, lambda cm, cd: cm * cd + 3 * cm + cd,
                             lambda cm, cd: N * N * cdiv(d, cd) + N * d * cdiv(N, cm) + N * (1 + T_n) * cdiv(d, cd))
            stage2[T_n] = t
        return stage2[T_n]

    best, best_key = None, None
    for bn in block_sizes(N):
        bm = _largest(1, N, lambda x: x * bn + 4 * x + bn <= M)
        if bm < 1:
            break
        bm = cdiv(N, cdiv(N, bm))
        T_n = cdiv(N, bn)
        s2 = best_stage2(T_n)
        if s2 is None:
            continue
        cm, cd = s2
        io = bounds.square_tiling_io(N, d, bm, bn, 1, cm, cd, 1).io_words
        key = (io, cdiv(N, bm) * T_n, -bn)
        if best_key is None or key < best_key:
            best, best_key = (bm, bn, cm, cd), key
    bm, bn, cm, cd = _need(best, "square-tiling", M, 8)
    bk = largest_chunk(d, M, lambda c: bm * bn + 3 * bm + c * (bm + bn))
    ck = largest_chunk(bn, M, lambda c: cm * cd + 2 * cm + c * (cm + cd))
    return dict(bm=bm, bn=bn, bk=bk, cm=cm, cd=cd, ck=ck)


def plan_flash_backward(N, d, M):
    # search over (bc, br): the count depends on T_c only; B_r takes what is left.
    t = search_tiles(N, N, M, lambda bc, br: bounds.flash_backward_peak(d, br, bc),
                     lambda bc, br: bounds.flash_backward_io(N, d, br, bc, 1).io_words)
    bc, br = _need(t, "flash-bwd", M, bounds.flash_backward_peak(d, 1, 1))
    return dict(br=br, bc=bc, delta_rows=min(N, M // (2 * d + 1)))


def plan_tiled_backward(N, d, M):
    p = search_tiles(N, N, M, lambda bm, bn: bm * bn + 2 * bm + bn,
                     lambda bm, bn: N * d * (cdiv(N, bm) + cdiv(N, bn)) + N * cdiv(N, bn))
    am, an = _need(p, "tiled-bwd", M, 4)
    ak = largest_chunk(d, M, lambda c: am * an + am + c * (am + an))

    def ds_peak(sm, sn, sk=1):
        return sm * sn + sm + max(sk * (sm + sn), sm * sn)

    s = search_tiles(N, N, M, ds_peak,
                     lambda sm, sn: N * d * (cdiv(N, sm) + cdiv(N, sn)) + N * cdiv(N, sn))
    sm, sn = _need(s, "tiled-bwd", M, 4)
    sk = largest_chunk(d, M, lambda c: ds_peak(sm, sn, c))
    nd = _gemm_nd_tiles(N, d, M)
    rows = min(N, M // (2 * d + 1))
    chunk = 0 if rows else (M - 1) // 2
    return dict(p=(am, an, ak), ds=(sm, sn, sk), nd=nd, delta_rows=rows, delta_chunk=chunk)


def random_block_mask(rows: int, cols: int, density: float, seed: int = 0) -> np.ndarray:
    """A (rows, cols) block mask with round(density * rows * cols) non-zero blocks, uniformly placed."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    total = rows * cols
    nnz = int(round(density * total))
    flat = np.zeros(total, dtype=bool)
    flat[np.random.default_rng(seed).choice(total, size=nnz, replace=False)] = True
    return flat.reshape(rows, cols)


def plan_for(algorithm: str, seqlen: int, headdim: int, cache_words: int, *, causal: bool = False,
             density: float | None = None, block_mask=None, seed: int = 0) -> Plan:
    """The tiles each schedule uses for (N, d, M). block_mask: an array of shape (T_r, T_c) for
    the chosen tiles, or a callable (T_r, T_c) -> array; otherwise a random mask of ``density``."""
    N, d, M = int(seqlen), int(headdim), int(cache_words)
    if N < 1 or d < 1:
        raise ValueError("seqlen and headdim must be positive")
    note = ""
    if algorithm == "standard":
        tiles = plan_standard(N, d, M)
    elif algorithm == "flash1":
        tiles, note = fit_flash1(N, d, M)
    elif algorithm in ("flash2", "block-sparse"):
        tiles = plan_flash2(N, d, M)
        if causal:
            note = "causal: the dense-optimal tiles, fully masked tiles skipped"
    elif algorithm == "square-tiling":
        tiles = plan_square_tiling(N, d, M)
    elif algorithm == "flash-bwd":
        tiles = plan_flash_backward(N, d, M)
    elif algorithm == "tiled-bwd":
        tiles = plan_tiled_backward(N, d, M)
    else:
        raise KeyError(f"unknown algorithm {algorithm!r}")
    mask = None
    if algorithm == "block-sparse":
        shape = (cdiv(N, tiles["br"]), cdiv(N, tiles["bc"]))
        if block_mask is None:
            mask = random_block_mask(*shape, 1.0 if density is None else density, seed)
        else:
            mask = np.asarray(block_mask(*shape) if callable(block_mask) else block_mask, dtype=bool)
            if mask.shape != shape:
                raise ValueError(f"block mask has shape {mask.shape}; the tiles for M = {M} need {shape}")
    return Plan(algorithm, N, d, M, causal, tiles, mask, note)
