"""Backward schedules: FlashAttention's (recompute P from lse) and the small-cache tiled one.

Both start from slow memory holding Q, K, V, the forward output O, its lse and the upstream
gradient dO, and write dQ, dK, dV.
"""

from __future__ import annotations

from ..memory import Operand, TwoLevelMemory
from ..plans import Plan
from ..reference import Problem, attention_forward, element_mask
from .common import blocks, causal_fill, exp_diff, mm, mm_tn, row_groups
from .tiled import product_nd, scores_tile


def _place_inputs(mem: TwoLevelMemory, prob: Problem, causal: bool) -> None:
    o, lse = attention_forward(prob.q, prob.k, prob.v, prob.scale, element_mask(prob.seqlen, causal))
    for name, arr in (("Q", prob.q), ("K", prob.k), ("V", prob.v), ("O", o), ("dO", prob.do), ("lse", lse)):
        mem.place(name, arr)


def delta_pass(mem: TwoLevelMemory, N: int, d: int, rows: int, chunk: int = 0) -> None:
    """D = rowsum(dO * O), written to slow memory: `rows` whole rows at a time or, when a row of
    O and dO does not fit (rows == 0), one row at a time in column chunks."""
    mem.create("D", (N,))
    if rows:
        for r0, r in blocks(N, rows):
            o = mem.load("O", slice(r0, r0 + r))
            g = mem.load("dO", slice(r0, r0 + r))
            delta = mem.alloc((r,), "D_i")
            delta.data[:] = (o.data * g.data).sum(axis=1)
            mem.store(delta, "D", slice(r0, r0 + r))
            mem.free(o, g, delta)
        return
    for i in range(N):
        delta = mem.alloc((1,), "D_i")
        for c0, c in blocks(d, chunk):
            o = mem.load("O", (slice(i, i + 1), slice(c0, c0 + c)))
            g = mem.load("dO", (slice(i, i + 1), slice(c0, c0 + c)))
            delta.data[0] += (o.data * g.data).sum()
            mem.free(o, g)
        mem.store(delta, "D", slice(i, i + 1))
        mem.free(delta)


def run_flash_backward(mem: TwoLevelMemory, prob: Problem, plan: Plan) -> dict:
    """FlashAttention backward (Dao et al. Alg. 4 with FA2's precomputed D): key blocks outer with
    K_j, V_j and the dK_j, dV_j accumulators resident; query blocks inner recompute
    P_ij = exp(S_ij - lse_i), accumulate dV_j += P^T dO_i, form dS = P * (dO_i V_j^T - D_i),
    accumulate dK_j += scale dS^T Q_i and read-modify-write dQ_i += scale dS K_j."""
    N, d = prob.seqlen, prob.headdim
    br, bc = min(plan.tiles["br"], N), min(plan.tiles["bc"], N)
    _place_inputs(mem, prob, plan.causal)
    for name in ("dQ", "dK", "dV"):
        mem.create(name, (N, d))
    delta_pass(mem, N, d, plan.tiles["delta_rows"])

    for j, (c0, w) in enumerate(blocks(N, bc)):
        cols = slice(c0, c0 + w)
        kj, vj = mem.load("K", cols), mem.load("V", cols)
        dk, dv = mem.alloc((w, d), "dK_j"), mem.alloc((w, d), "dV_j")
        first = c0 // br if plan.causal else 0
        for starts, size in row_groups(N, br, mem.max_lanes, br * (3 * d + 2 + 2 * w), first):
            lanes = len(starts)
            q = mem.load_rows("Q", starts, size)
            g = mem.load_rows("dO", starts, size)
            lse = mem.load_rows("lse", starts, size)
            delta = mem.load_rows("D", starts, size)
            # dQ_i starts at zero on the first key block (every query block sees key block 0)
            dq = mem.load_rows("dQ", starts, size) if j else mem.alloc((size, d), "dQ_i", lanes=lanes)
            s = mem.alloc((size, w), "S_ij / P_ij", lanes=lanes)
            dp = mem.alloc((size, w), "dP_ij / dS_ij", lanes=lanes)

            P = s.data
            P[...] = mm(q.data, kj.data.T)
            P *= prob.scale
            if plan.causal:
                causal_fill(P, starts, c0)
            P[:] = exp_diff(P, lse.data[..., None])
            dv.data[...] += mm_tn(P, g.data)
            dS = dp.data
            dS[...] = mm(g.data, vj.data.T)
            dS -= delta.data[..., None]
            dS *= P
            dq.data[...] += prob.scale * mm(dS, kj.data)
            dk.data[...] += prob.scale * mm_tn(dS, q.data)

            mem.store_rows(dq, "dQ", starts, size)
            mem.free(q, g, lse, delta, dq, s, dp)
        mem.store(dk, "dK", cols)
        mem.store(dv, "dV", cols)
        mem.free(kj, vj, dk, dv)
    return {name: mem.result(name) for name in ("dQ", "dK", "dV")}


def run_tiled_backward(mem: TwoLevelMemory, prob: Problem, plan: Plan) -> dict:
    """Small-cache backward: every product tiled with ~sqrt(M) tiles, P and dS materialised.

    1. P = exp(scale Q K^T - lse)   2. dV = P^T dO   3. D = rowsum(dO * O)
    4. dS = P * (dO V^T - D)         5. dQ = scale dS K   6. dK = scale dS^T Q
    """
    N, d, t = prob.seqlen, prob.headdim, plan.tiles
    _place_inputs(mem, prob, False)
    for name, shape in (("P", (N, N)), ("dS", (N, N)), ("dQ", (N, d)), ("dK", (N, d)), ("dV", (N, d))):
        mem.create(name, shape)

    am, an, ak = t["p"]
    for r0, r in blocks(N, am):
        rows = slice(r0, r0 + r)
        for c0, c in blocks(N, an):
            acc = mem.alloc((r, c), "S tile")
            lse = mem.load("lse", rows)
            scores_tile(mem, prob, rows, slice(c0, c0 + c), ak, acc)
            acc.data[:] = exp_diff(acc.data, lse.data[:, None])
            mem.store(acc, "P", (rows, slice(c0, c0 + c)))
            mem.free(acc, lse)

    product_nd(mem, "dV", Operand("P", slice(0, N), transposed=True), "dO", t["nd"], N, N, d)
    delta_pass(mem, N, d, t["delta_rows"], t["delta_chunk"])

    sm, sn, sk = t["ds"]
    for r0, r in blocks(N, sm):
        rows = slice(r0, r0 + r)
        for c0, c in blocks(N, sn):
            delta = mem.load("D", rows)
            acc = mem.alloc((r, c), "dP tile")
            mem.stream_product(acc, Operand("dO", rows), Operand("V", slice(c0, c0 + c), transposed=True),
                               slice(0, d), sk)
            p = mem.load("P", (rows, slice(c0, c0 + c)))
            p.data[:] *= acc.data - delta.data[:, None]  # dS, in place of P
            mem.store(p, "dS", (rows, slice(c0, c0 + c)))
            mem.free(delta, acc, p)

    product_nd(mem, "dQ", Operand("dS", slice(0, N)), "K", t["nd"], N, N, d, alpha=prob.scale)
    product_nd(mem, "dK", Operand("dS", slice(0, N), transposed=True), "Q", t["nd"], N, N, d, alpha=prob.scale)
    return {name: mem.result(name) for name in ("dQ", "dK", "dV")}
