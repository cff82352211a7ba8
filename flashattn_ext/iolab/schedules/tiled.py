"""Schedules built from tiled matrix products: standard attention and Saha & Ye's square tiling.

A product C = A B is computed C-stationary: a tile of C stays resident while the reduced axis is
streamed through fast memory in chunks (TwoLevelMemory.stream_product). Its count is
|A| * T_n + |B| * T_m words, which square tiles of side ~sqrt(M) make ~2mnk / sqrt(M).
"""

from __future__ import annotations

import numpy as np

from ..bounds import cdiv
from ..memory import Operand, TwoLevelMemory
from ..plans import Plan
from ..reference import Problem
from .common import NEG_INF, blocks, exp_diff, lse_of, row_groups


def _place_inputs(mem: TwoLevelMemory, prob: Problem) -> None:
    mem.place("Q", prob.q)
    mem.place("K", prob.k)
    mem.place("V", prob.v)


def scores_tile(mem, prob, rows, cols, bk, acc):
    """acc = scale * Q[rows] K[cols]^T, streaming the head dimension in chunks of bk."""
    mem.stream_product(acc, Operand("Q", rows), Operand("K", cols, transposed=True),
                       slice(0, prob.headdim), bk, alpha=prob.scale)


def product_nd(mem, out, a: Operand, b_name: str, tiles, n_rows, k_len, d, *, alpha=1.0):
    """out (n_rows x d) = alpha * A B with A = a (n_rows x k_len) and B = b_name[:, cols] (k_len x d)."""
    bm, bd, bk = tiles
    for r0, r in blocks(n_rows, bm):
        for c0, c in blocks(d, bd):
            acc = mem.alloc((r, c), f"{out} tile")
            mem.stream_product(acc, Operand(a.name, slice(r0, r0 + r), a.transposed),
                               Operand(b_name, slice(c0, c0 + c)), slice(0, k_len), bk, alpha=alpha)
            mem.store(acc, out, (slice(r0, r0 + r), slice(c0, c0 + c)))
            mem.free(acc)


def run_standard(mem: TwoLevelMemory, prob: Problem, plan: Plan) -> dict:
    """Standard attention: S = scale Q K^T to slow memory, P = softmax(S) to slow memory, O = P V.
    Each of the three kernels is tiled as well as M allows; S and P are materialised."""
    N, d, t = prob.seqlen, prob.headdim, plan.tiles
    _place_inputs(mem, prob)
    for name, shape in (("S", (N, N)), ("P", (N, N)), ("O", (N, d))):
        mem.create(name, shape)

    # 1. S = scale Q K^T
    for r0, r in blocks(N, t["bm"]):
        for c0, c in blocks(N, t["bn"]):
            acc = mem.alloc((r, c), "S tile")
            scores_tile(mem, prob, slice(r0, r0 + r), slice(c0, c0 + c), t["bk"], acc)
            mem.store(acc, "S", (slice(r0, r0 + r), slice(c0, c0 + c)))
            mem.free(acc)

    # 2. P = softmax(S), row by row
    if t["softmax_rows"]:
        for r0, r in blocks(N, t["softmax_rows"]):
            rows = mem.load("S", slice(r0, r0 + r))
            mx = mem.alloc((r,), "row max")
            sm = mem.alloc((r,), "row sum")
            x = rows.data
            mx.data[:] = x.max(axis=1)
            x[:] = np.exp(x - mx.data[:, None])
            sm.data[:] = x.sum(axis=1)
            x /= sm.data[:, None]
            mem.store(rows, "P", slice(r0, r0 + r))
            mem.free(rows, mx, sm)
    else:  # a row does not fit: two passes over each row in column chunks (online max/sum, then
        # normalise); rows are independent iterations, run as lock-step lanes
        chunk = t["softmax_chunk"]
        for starts, _ in row_groups(N, 1, mem.max_lanes, chunk + 2):
            lanes = len(starts)
            mx = mem.alloc((1,), "row max", lanes=lanes, fill=NEG_INF)
            sm = mem.alloc((1,), "row sum", lanes=lanes)
            for c0, c in blocks(N, chunk):
                x = mem.load_rows("S", starts, 1, slice(c0, c0 + c))
                new = np.maximum(mx.data, x.data.max(axis=-1))
                sm.data[:] = sm.data * exp_diff(mx.data, new) + np.exp(x.data - new[..., None]).sum(axis=-1)
                mx.data[:] = new
                mem.free(x)
            for c0, c in blocks(N, chunk):
                x = mem.load_rows("S", starts, 1, slice(c0, c0 + c))
                x.data[:] = np.exp(x.data - mx.data[..., None]) / sm.data[..., None]
                mem.store_rows(x, "P", starts, 1, slice(c0, c0 + c))
                mem.free(x)
            mem.free(mx, sm)

    # 3. O = P V
    product_nd(mem, "O", Operand("P", slice(0, N)), "V", (t["cm"], t["cd"], t["ck"]), N, N, d)
    return {"O": mem.result("O")}


def run_square_tiling(mem: TwoLevelMemory, prob: Problem, plan: Plan) -> dict:
    """Saha & Ye's algorithm for M < d^2: two blocked products with ~sqrt(M) tiles, the N x N
    matrix written to slow memory once, the softmax normaliser fused into both products.

    Stage 1, query tiles outer and key tiles inner: compute the tile S_IJ (d streamed), update the
    rows' running max m and sum l (resident for the whole row of tiles), write Pt_IJ =
    exp(S_IJ - m) and the shift m used (Mblk[I, J]); at the end of the row write lse = m + log l.
    Stage 2: O = P V with P_IJ = diag(exp(Mblk[:, J] - lse)) Pt_IJ: each O tile reads, for each
    key block J, the shifts of its rows and scales Pt's rows while streaming Pt and V.
    Exact softmax, and no pass over the N x N matrix beyond one write and one read per O column tile.
    """
    N, d, t = prob.seqlen, prob.headdim, plan.tiles
    bm, bn, bk = min(t["bm"], N), min(t["bn"], N), t["bk"]
    cm, cd, ck = min(t["cm"], N), min(t["cd"], d), t["ck"]
    T_n = cdiv(N, bn)
    _place_inputs(mem, prob)
    mem.create("Pt", (N, N))
    mem.create("Mblk", (N, T_n))
    mem.create("lse", (N,))
    mem.create("O", (N, d))

    for r0, r in blocks(N, bm):
        rows = slice(r0, r0 + r)
        m = mem.alloc((r,), "running max", fill=NEG_INF)
        l = mem.alloc((r,), "running sum")
        for j, (c0, c) in enumerate(blocks(N, bn)):
            s = mem.alloc((r, c), "S tile")
            shift = mem.alloc((r,), "new max")
            scores_tile(mem, prob, rows, slice(c0, c0 + c), bk, s)
            S = s.data
            shift.data[:] = np.maximum(m.data, S.max(axis=1))
            S[:] = np.exp(S - shift.data[:, None])
            l.data[:] = l.data * exp_diff(m.data, shift.data) + S.sum(axis=1)
            m.data[:] = shift.data
            mem.store(s, "Pt", (rows, slice(c0, c0 + c)))
            mem.store(shift, "Mblk", (rows, slice(j, j + 1)), part=(slice(None), None))
            mem.free(s, shift)
        m.data[:] = lse_of(m.data, l.data)
        mem.store(m, "lse", rows)
        mem.free(m, l)

    for r0, r in blocks(N, cm):
        rows = slice(r0, r0 + r)
        for e0, e in blocks(d, cd):
            acc = mem.alloc((r, e), "O tile")
            lse = mem.load("lse", rows)
            for j, (c0, c) in enumerate(blocks(N, bn)):
                sc = mem.load("Mblk", (rows, slice(j, j + 1)))
                sc.data[:] = np.exp(sc.data - lse.data[:, None])  # this block's softmax scale
                mem.stream_product(acc, Operand("Pt", rows), Operand("V", slice(e0, e0 + e)),
                                   slice(c0, c0 + c), min(ck, c), a_row_scale=sc)
                mem.free(sc)
            mem.store(acc, "O", (rows, slice(e0, e0 + e)))
            mem.free(acc, lse)
    return {"O": mem.result("O"), "lse": mem.result("lse")}


__all__ = ["run_standard", "run_square_tiling", "product_nd", "scores_tile"]
