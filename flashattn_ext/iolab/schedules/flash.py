"""FlashAttention forward schedules: FA1 loop order, FA2 loop order, block-sparse (FA2 order).

Each computes attention on its resident tiles with NumPy (float64) while the memory model counts.
Inner steps whose iterations are independent run as lock-step lanes (see memory.py); with
``mem.max_lanes == 1`` they run one iteration at a time.
"""

from __future__ import annotations

import numpy as np

from ..memory import TwoLevelMemory
from ..plans import Plan
from ..reference import Problem
from .common import NEG_INF, blocks, causal_fill, exp_diff, lse_of, mm, row_groups, safe_div


def _place_inputs(mem: TwoLevelMemory, prob: Problem) -> None:
    mem.place("Q", prob.q)
    mem.place("K", prob.k)
    mem.place("V", prob.v)


def run_flash1(mem: TwoLevelMemory, prob: Problem, plan: Plan) -> dict:
    """Dao et al. 2022, Algorithm 1. Key/value blocks outer (K_j, V_j resident), query blocks
    inner; O, l, m live in slow memory and are read and rewritten at every inner step."""
    N, d = prob.seqlen, prob.headdim
    br, bc = min(plan.tiles["br"], N), min(plan.tiles["bc"], N)
    _place_inputs(mem, prob)
    for name, shape in (("O", (N, d)), ("l", (N,)), ("m", (N,))):
        mem.create(name, shape)

    # Initialise O = 0, l = 0, m = -inf in slow memory, a block of rows at a time.
    zero_o = mem.alloc((br, d), "zero O_i")
    zero_l = mem.alloc((br,), "zero l_i")
    ninf_m = mem.alloc((br,), "-inf m_i", fill=NEG_INF)
    for r0, r in blocks(N, br):
        rows = slice(r0, r0 + r)
        mem.store(zero_o, "O", rows, part=(slice(0, r),))
        mem.store(zero_l, "l", rows, part=(slice(0, r),))
        mem.store(ninf_m, "m", rows, part=(slice(0, r),))
    mem.free(zero_o, zero_l, ninf_m)

    for c0, w in blocks(N, bc):
        kj = mem.load("K", slice(c0, c0 + w))
        vj = mem.load("V", slice(c0, c0 + w))
        first = c0 // br if plan.causal else 0  # query blocks entirely above the diagonal are skipped
        for starts, size in row_groups(N, br, mem.max_lanes, br * (2 * d + w + 6), first):
            q = mem.load_rows("Q", starts, size)
            o = mem.load_rows("O", starts, size)
            l = mem.load_rows("l", starts, size)
            m = mem.load_rows("m", starts, size)
            lanes = len(starts)
            s = mem.alloc((size, w), "S_ij", lanes=lanes)
            m_tile = mem.alloc((size,), "m~_ij", lanes=lanes)
            l_tile = mem.alloc((size,), "l~_ij", lanes=lanes)
            m_new = mem.alloc((size,), "m_new", lanes=lanes)
            l_new = mem.alloc((size,), "l_new", lanes=lanes)

            S = s.data
            S[...] = mm(q.data, kj.data.T)
            S *= prob.scale
            if plan.causal:
                causal_fill(S, starts, c0)
            m_tile.data[:] = S.max(axis=-1)
            S[:] = exp_diff(S, m_tile.data[..., None])  # P~_ij
            l_tile.data[:] = S.sum(axis=-1)
            m_new.data[:] = np.maximum(m.data, m_tile.data)
            a_old = exp_diff(m.data, m_new.data)
            a_tile = exp_diff(m_tile.data, m_new.data)
            l_new.data[:] = a_old * l.data + a_tile * l_tile.data
            O = o.data
            O *= (l.data * a_old)[..., None]
            O += a_tile[..., None] * mm(S, vj.data)
            O[:] = safe_div(O, l_new.data[..., None])

            mem.store_rows(o, "O", starts, size)
            mem.store_rows(l_new, "l", starts, size)
            mem.store_rows(m_new, "m", starts, size)
            mem.free(q, o, l, m, s, m_tile, l_tile, m_new, l_new)
        mem.free(kj, vj)
    return {"O": mem.result("O")}


# Simulation shortcut for the FA2 order: consecutive key blocks are handled in batches of about
# this many keys. The model is still driven step by step (every K_j, V_j load, S_ij allocation and
# free is issued per key block and per lane), but the arithmetic of a batch runs as one NumPy
# call: the per-step running maxima m_t come from a cumulative max over the blocks' maxima, each
# P~_t = exp(S_t - m_t) exactly as in the step-by-step recurrence, and the rescale factors
# prod_{s>t} exp(m_{s-1} - m_s) are applied as exp(m_t - m_last). Algebraically identical; rounding
# differs at the 1e-16 level. With mem.max_lanes == 1 (word-level mode) every step runs alone.
BATCH_KEYS = 256


def _flash2_core(mem: TwoLevelMemory, prob: Problem, plan: Plan, block_mask=None) -> dict:
    """Query blocks outer: Q_i, the output accumulator and the row statistics stay resident while
    K_j, V_j stream past (only blocks that are not fully masked); O_i and lse_i are written once."""
    N, d = prob.seqlen, prob.headdim
    br, bc = min(plan.tiles["br"], N), min(plan.tiles["bc"], N)
    _place_inputs(mem, prob)
    mem.create("O", (N, d))
    mem.create("lse", (N,))
    key_blocks = list(blocks(N, bc))
    steps = 1 if mem.max_lanes == 1 else max(1, BATCH_KEYS // bc)
    for starts, size in row_groups(N, br, mem.max_lanes, br * (2 * d + 3 + steps * bc)):
        lanes = len(starts)
        q = mem.load_rows("Q", starts, size)
        acc = mem.alloc((size, d), "O_i", lanes=lanes)
        m = mem.alloc((size,), "m_i", lanes=lanes, fill=NEG_INF)
        l = mem.alloc((size,), "l_i", lanes=lanes)
        m_new = mem.alloc((size,), "m_new", lanes=lanes)
        last_row = starts + size - 1
        block_row = starts // br
        for b0 in range(0, len(key_blocks), steps):
            batch = key_blocks[b0:b0 + steps]
            active = np.ones((lanes, len(batch)), dtype=bool)
            if plan.causal:
                active &= np.array([c0 for c0, _ in batch])[None, :] <= last_row[:, None]
            if block_mask is not None:
                active &= block_mask[block_row, b0:b0 + len(batch)]
            k_parts, v_parts, used = [], [], []
            for t, (c0, w) in enumerate(batch):
                n_active = int(active[:, t].sum())
                if n_active == 0:
                    continue  # a fully masked block: never loaded, never computed
                # each active lane (query block) loads K_j and V_j: charged per lane, held once here
                kj = mem.load("K", slice(c0, c0 + w), lanes=n_active)
                vj = mem.load("V", slice(c0, c0 + w), lanes=n_active)
                s = mem.alloc((size, w), "S_ij", lanes=n_active)
                k_parts.append(kj.data)
                v_parts.append(vj.data)
                used.append(t)
                if len(batch) == 1:
                    _online_step(prob, plan, q, acc, m, l, m_new, starts, active[:, t], c0, kj, vj, s)
                mem.free(s, kj, vj)
            if used and len(batch) > 1:
                _online_batch(prob, plan, q, acc, m, l, m_new, starts, active[:, used],
                              [batch[t] for t in used], np.concatenate(k_parts), np.concatenate(v_parts))
        acc.data[:] = safe_div(acc.data, l.data[..., None])
        m.data[:] = lse_of(m.data, l.data)
        mem.store_rows(acc, "O", starts, size)
        mem.store_rows(m, "lse", starts, size)
        mem.free(q, acc, m, l, m_new)
    return {"O": mem.result("O"), "lse": mem.result("lse")}


def _online_step(prob, plan, q, acc, m, l, m_new, starts, active, c0, kj, vj, s):
    """One key block for the active lanes, on the resident tiles (the algorithm as written)."""
    sel = slice(None) if active.all() else np.nonzero(active)[0]
    S = s.data
    S[...] = mm(q.data[sel], kj.data.T)
    S *= prob.scale
    if plan.causal:
        causal_fill(S, starts[sel], c0)
    m_old = m.data[sel]
    mn = np.maximum(m_old, S.max(axis=-1))
    m_new.data[sel] = mn
    S[:] = exp_diff(S, mn[..., None])
    alpha = exp_diff(m_old, mn)  # computed in place of m_i in the modelled kernel
    l.data[sel] = alpha * l.data[sel] + S.sum(axis=-1)
    acc.data[sel] = alpha[..., None] * acc.data[sel] + mm(S, vj.data)
    m.data[sel] = mn


def _online_batch(prob, plan, q, acc, m, l, m_new, starts, active, batch, kb, vb):
    """Several key blocks at once (see BATCH_KEYS): the same recurrence, unrolled."""
    lanes_any = active.any(axis=1)
    sel = slice(None) if lanes_any.all() else np.nonzero(lanes_any)[0]
    active = active[sel]
    widths = np.array([w for _, w in batch])
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
    step_of_col = np.repeat(np.arange(len(batch)), widths)
    S = mm(q.data[sel], kb.T)
    S *= prob.scale
    np.copyto(S, NEG_INF, where=~active[:, step_of_col][:, None, :])  # blocks a lane skips
    if plan.causal:
        keys = np.concatenate([np.arange(c0, c0 + w) for c0, w in batch])
        rows = starts[sel][:, None] + np.arange(S.shape[1])[None, :]
        np.copyto(S, NEG_INF, where=keys[None, None, :] > rows[:, :, None])
    m_old = m.data[sel]
    block_max = np.maximum.reduceat(S, offsets, axis=-1)
    m_t = np.maximum.accumulate(np.concatenate([m_old[..., None], block_max], axis=-1), axis=-1)[..., 1:]
    m_last = m_t[..., -1]
    P = exp_diff(S, m_t[..., step_of_col])  # P~_t = exp(S_t - m_t), step by step
    carry = exp_diff(m_t, m_last[..., None])  # prod over later steps of their rescale factors
    alpha = exp_diff(m_old, m_last)
    l.data[sel] = alpha * l.data[sel] + (np.add.reduceat(P, offsets, axis=-1) * carry).sum(axis=-1)
    P *= carry[..., step_of_col]
    acc.data[sel] = alpha[..., None] * acc.data[sel] + mm(P, vb)
    m_new.data[sel] = m_last
    m.data[sel] = m_last


def run_flash2(mem: TwoLevelMemory, prob: Problem, plan: Plan) -> dict:
    return _flash2_core(mem, prob, plan)


def run_block_sparse(mem: TwoLevelMemory, prob: Problem, plan: Plan) -> dict:
    """Block-sparse FlashAttention (Dao et al. 2022, Alg. 5) in the FA2 order: a zero block of the
    mask is never loaded or computed."""
    return _flash2_core(mem, prob, plan, block_mask=np.asarray(plan.block_mask, dtype=bool))
