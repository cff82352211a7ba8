#!/usr/bin/env python3
"""CPU checks of the CUDA kernels' control logic, mirrored by hand from the .cuh files (change both
together); the tile sizes come from kernel_configs.h (tools/table.py). Run by .ci/compile_cuda.sh
and tests/test_cuda_tools.py; a few seconds, no GPU.

1. Band ranges (attention_params.h helpers, fwd_kernel.cuh key-block range, bwd_kernel.cuh
   query-block range, the per-row [lo, hi) masks and tile_inside_band) against a brute-force
   visibility matrix, for random lengths, windows and both diagonal alignments: every visible
   (i, j) is visited by both directions and masked exactly.
2. Deterministic backward: the key blocks that add into a query block's dQ form a contiguous run
   starting at band_key_begin(m0) / block_n, so the turn counter (n_block - first) takes each
   value once; a simulation of CTAs dispatched in block order onto a few SMs (waiting CTAs keep
   their slot) always finishes (no deadlock), also with CTAs whose tiles are skipped.
3. Block-sparse tile mapping (score_mod.h tile_skipped / block_kept): kernel tiles of any size
   against sparse blocks of any size, incl. ones that do not divide the tile or the sequence: a
   tile is skipped iff no kept block meets its valid part, and every block index read is in range.
4. Shared-memory schedules: the forward (K/V ring and interleave) and backward (single and
   double-buffered Q/dO/lse/D) pipelines as traces of loads, commits, waits, barriers, reads and
   plain stores. Checks every read sees the intended tile, landed (cp.async group waited for) and
   published (a __syncthreads after the wait), and every overwrite comes after a barrier that
   follows the last read of the old contents (no write-after-read race).
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import table  # noqa: E402

rnd = random.Random(1)

# The kernels' tiles, from kernel_configs.h (tools/table.py): forward (block_m, block_n, sub-tiles;
# a ring kernel is built as the interleave for sm80, so both sub-tilings), backward, extras kernels.
CONFIGS = table.tile_configs()
FWD_TILES = sorted({(c["block_m"], c["block_n"], sub) for c in CONFIGS if c["dir"] == "fwd"
                    for sub in {1, c["sub_tiles"]}})
BWD_TILES = sorted({(c["block_m"], c["block_n"]) for c in CONFIGS if c["dir"] == "bwd"})
EXTRAS_TILES = sorted({(c["block_m"], c["block_n"]) for c in CONFIGS if c["extras"]})
BWD_BLOCK_M = {c["block_m"] for c in CONFIGS if c["dir"] == "bwd"}
assert len(BWD_BLOCK_M) == 1, "one backward block_m for every bucket (dispatch.cu relies on it)"


# ---------------------------------------------------------------------------------------------
# attention_params.h
class P:
    def __init__(s, L, S, wl, wr, br):
        s.seqlen_q, s.seqlen_k, s.window_left, s.window_right, s.bottom_right = L, S, wl, wr, br


def band_diag(p):
    return p.seqlen_k - p.seqlen_q if p.bottom_right else 0


def band_key_begin(p, i):
    if p.window_left < 0:
        return 0
    b = i + band_diag(p) - p.window_left
    return 0 if b < 0 else (p.seqlen_k if b > p.seqlen_k else b)


def band_key_end(p, i):
    if p.window_right < 0:
        return p.seqlen_k
    e = i + band_diag(p) + p.window_right + 1
    return p.seqlen_k if e > p.seqlen_k else (0 if e < 0 else e)


def visible(p, i, j):
    diag = band_diag(p)
    if p.window_left >= 0 and j < i + diag - p.window_left:
        return False
    if p.window_right >= 0 and j > i + diag + p.window_right:
        return False
    return 0 <= j < p.seqlen_k and 0 <= i < p.seqlen_q


def cdiv(a, b):
    return -(-a // b)


# fwd_kernel.cuh: key blocks of query block m0
def fwd_key_blocks(p, m0, bm, bn):
    rows = min(p.seqlen_q - m0, bm)
    m_last = m0 + rows - 1
    kb, ke = band_key_begin(p, m0), band_key_end(p, m_last)
    n_min = kb // bn
    n_max = cdiv(ke, bn) if ke > kb else n_min
    return m_last, n_min, n_max


def tile_inside_band(p, m0, m_last, n0, n_last):
    return n_last < p.seqlen_k and band_key_begin(p, m_last) <= n0 and band_key_end(p, m0) > n_last


def masked_row(p, i, n0s, sub_n):  # fwd/bwd: the [lo, hi) interval of row i inside a tile
    begin, end = band_key_begin(p, i) - n0s, band_key_end(p, i) - n0s
    lo = 0 if begin < 0 else min(begin, sub_n)
    hi = 0 if i >= p.seqlen_q else (0 if end < 0 else min(end, sub_n))
    return lo, hi


# bwd_kernel.cuh: query blocks of key block n_block
def bwd_query_blocks(p, n_block, bm, bn):
    n0, n_last = n_block * bn, n_block * bn + bn - 1
    m_blocks = cdiv(p.seqlen_q, bm)

    def last_row(i):
        return min((i + 1) * bm - 1, p.seqlen_q - 1)

    def first(pred):
        lo, hi = 0, m_blocks
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    i_lo = first(lambda i: band_key_end(p, last_row(i)) > n0)
    i_hi = first(lambda i: band_key_begin(p, i * bm) > n_last)
    return i_lo, max(i_hi, i_lo)


def random_band():
    L, S = rnd.choice([1, 2, 7, 63, 64, 65, 128, 129, 200, 257, 300]), rnd.choice([1, 3, 16, 64, 65, 127, 128, 200, 333])
    wl = rnd.choice([-1, -1, 0, 1, 5, 16, 64, 100, 500])
    wr = rnd.choice([-1, -1, 0, 0, 1, 7, 64, 300])
    return P(L, S, wl, wr, rnd.random() < 0.5)


def check_band(trials=120):
    for _ in range(trials):
        p = random_band()
        vis = {(i, j) for i in range(p.seqlen_q) for j in range(p.seqlen_k) if visible(p, i, j)}
        for bm, bn, sub in FWD_TILES:
            seen = set()
            for mb in range(cdiv(p.seqlen_q, bm)):
                m0 = mb * bm
                m_last, n_min, n_max = fwd_key_blocks(p, m0, bm, bn)
                for nb in range(n_min, n_max):
                    assert 0 <= nb < cdiv(p.seqlen_k, bn), "forward visits a key block past the sequence"
                    for s in range(sub):
                        n0s, sub_n = nb * bn + s * (bn // sub), bn // sub
                        inside = tile_inside_band(p, m0, m_last, n0s, n0s + sub_n - 1)
                        for i in range(m0, m0 + bm):
                            lo, hi = masked_row(p, i, n0s, sub_n)
                            for c in range(sub_n):
                                j = n0s + c
                                kept = True if (inside and i < p.seqlen_q) else lo <= c < hi
                                if i < p.seqlen_q:
                                    assert kept == ((i, j) in vis), ("forward mask", vars(p), bm, bn, i, j)
                                    if kept:
                                        seen.add((i, j))
            assert seen == vis, ("forward misses visible scores", vars(p), bm, bn)
        for bm, bn in BWD_TILES:
            seen = set()
            for nb in range(cdiv(p.seqlen_k, bn)):
                i_lo, i_hi = bwd_query_blocks(p, nb, bm, bn)
                n0 = nb * bn
                for mb in range(i_lo, i_hi):
                    m0, m_last = mb * bm, min(mb * bm + bm - 1, p.seqlen_q - 1)
                    inside = tile_inside_band(p, m0, m_last, n0, n0 + bn - 1)
                    for i in range(m0, m0 + bm):
                        lo, hi = masked_row(p, i, n0, bn)
                        for c in range(bn):
                            j = n0 + c
                            if i >= p.seqlen_q or j >= p.seqlen_k:
                                continue  # lse = +inf in shared memory (P = 0), never stored
                            kept = True if inside else lo <= c < hi
                            assert kept == ((i, j) in vis), ("backward mask", vars(p), bm, bn, i, j)
                            if kept:
                                seen.add((i, j))
            assert seen == vis, ("backward misses visible scores", vars(p), bm, bn)
    print(f"band ranges and masks: ok ({trials} configurations)")


# ---------------------------------------------------------------------------------------------
# 2. deterministic dQ order
def check_deterministic(trials=300):
    for _ in range(trials):
        p = random_band()
        if rnd.random() < 0.5:  # longer sequences: many key blocks per query block and back
            p.seqlen_q, p.seqlen_k = rnd.randint(1, 1500), rnd.randint(1, 1500)
            p.window_left = rnd.choice([-1, 0, 37, 200, 700])
            p.window_right = rnd.choice([-1, 0, 5, 300])
        bm, bn = rnd.choice(BWD_TILES)
        group = rnd.choice([1, 2, 3])
        n_blocks, m_blocks = cdiv(p.seqlen_k, bn), cdiv(p.seqlen_q, bm)
        items = {}
        for nb in range(n_blocks):
            i_lo, i_hi = bwd_query_blocks(p, nb, bm, bn)
            items[nb] = [(h, mb) for h in range(group) for mb in range(i_lo, i_hi)]
        # each (h, m) gets turns 0, 1, 2, ... from consecutive key blocks
        for mb in range(m_blocks):
            users = [nb for nb in range(n_blocks) if (0, mb) in items[nb]]
            first = band_key_begin(p, mb * bm) // bn
            turns = [nb - first for nb in users]
            assert turns == list(range(len(users))), ("turns not 0..k-1", vars(p), bn, mb, users, first)
        # CTAs dispatched in block-index order onto `slots` resident places; a waiting CTA keeps
        # its slot (it spins). Each step every resident CTA tries to make progress.
        for slots in (1, 2, 5):
            sem = {}
            pending, resident, done = list(range(n_blocks)), [], 0
            pos = {nb: 0 for nb in range(n_blocks)}
            steps = 0
            while done < n_blocks:
                while pending and len(resident) < slots:
                    resident.append(pending.pop(0))
                progressed = False
                for nb in list(resident):
                    if pos[nb] == len(items[nb]):
                        resident.remove(nb)
                        done += 1
                        progressed = True
                        continue
                    h, mb = items[nb][pos[nb]]
                    turn = nb - band_key_begin(p, mb * bm) // bn
                    if sem.get((h, mb), 0) == turn:  # skipped tiles still take their turn
                        sem[(h, mb)] = turn + 1
                        pos[nb] += 1
                        progressed = True
                assert progressed, ("deterministic backward deadlocks", vars(p), bn, slots)
                steps += 1
    print(f"deterministic dQ turns and progress: ok ({trials} configurations)")


# ---------------------------------------------------------------------------------------------
# 3. block-sparse mapping (score_mod.h)
def tile_skipped(block, bsm, bsn, L, S, m0, m_last, n0, n_last, reads):
    # m_last / n_last are clamped to the sequence inside tile_skipped (block rows/cols beyond
    # ceil(L / bsm) / ceil(S / bsn) do not exist)
    m_last = min(m_last, L - 1)
    n_last = min(n_last, S - 1)
    for bi in range(m0 // bsm, m_last // bsm + 1):
        for bj in range(n0 // bsn, n_last // bsn + 1):
            reads.append((bi, bj))
            if block[bi][bj]:
                return False
    return True


def check_block_sparse(trials=400):
    for _ in range(trials):
        L, S = rnd.randint(1, 300), rnd.randint(1, 300)
        bsm, bsn = rnd.choice([16, 32, 48, 64, 96, 128, 256]), rnd.choice([16, 32, 64, 80, 128, 256])
        nbm, nbn = cdiv(L, bsm), cdiv(S, bsn)
        block = [[rnd.random() < 0.3 for _ in range(nbn)] for _ in range(nbm)]
        for bm, bn in EXTRAS_TILES:  # the block mask is read by the extras kernels only
            for mb in range(cdiv(L, bm)):
                for nb in range(cdiv(S, bn)):
                    m0, n0 = mb * bm, nb * bn
                    m_last = min(m0 + bm, L) - 1  # the kernels pass the clamped last row ...
                    n_last = n0 + bn - 1          # ... and the unclamped last key
                    reads = []
                    skipped = tile_skipped(block, bsm, bsn, L, S, m0, m_last, n0, n_last, reads)
                    assert all(0 <= bi < nbm and 0 <= bj < nbn for bi, bj in reads), "block mask read out of range"
                    truth = not any(block[i // bsm][j // bsn] for i in range(m0, m_last + 1)
                                    for j in range(n0, min(n0 + bn, S)))
                    assert skipped == truth, ("tile_skipped", L, S, bsm, bsn, bm, bn, mb, nb)
    print(f"block-sparse tile mapping: ok ({trials} configurations)")


# ---------------------------------------------------------------------------------------------
# 4. shared-memory schedules
class Trace:
    """The per-thread program of a CTA (uniform control flow, so all warps run the same trace and
    barriers line up). Ops: load (cp.async, or a plain store when sync=True), commit, wait(n),
    sync, read(buf, tag), store(buf, tag) (plain st.shared)."""

    def __init__(s):
        s.ops = []

    def load(s, buf, tag):
        s.ops.append(("load", buf, tag))

    def store(s, buf, tag):
        s.ops.append(("store", buf, tag))

    def commit(s):
        s.ops.append(("commit",))

    def wait(s, n):
        s.ops.append(("wait", n))

    def sync(s):
        s.ops.append(("sync",))

    def read(s, buf, tag):
        s.ops.append(("read", buf, tag))


def check_trace(tr, name, async_loads=True):
    groups, open_group = [], []       # committed groups (lists of write ids), the open one
    writes = []                       # [buf, tag, landed, published]
    last = {}                         # buf -> index into writes of the newest write
    pending_reads = {}                # buf -> True if read since the last barrier
    for k, op in enumerate(tr.ops):
        kind = op[0]
        if kind in ("load", "store"):
            buf, tag = op[1], op[2]
            assert not pending_reads.get(buf), f"{name}: op {k} overwrites {buf} while warps may still read it (WAR)"
            if buf in last:
                w = writes[last[buf]]
                assert w[2] and w[3], f"{name}: op {k} writes {buf} while the previous write is in flight (WAW)"
            is_async = kind == "load" and async_loads
            writes.append([buf, tag, not is_async, False])
            last[buf] = len(writes) - 1
            if is_async:
                open_group.append(len(writes) - 1)
        elif kind == "commit":
            groups.append(open_group)
            open_group = []
        elif kind == "wait":
            for g in groups[: max(0, len(groups) - op[1])]:
                for w in g:
                    writes[w][2] = True
        elif kind == "sync":
            for w in writes:
                if w[2]:
                    w[3] = True
            pending_reads = {}
        elif kind == "read":
            buf, tag = op[1], op[2]
            assert buf in last, f"{name}: op {k} reads {buf} before anything was written"
            w = writes[last[buf]]
            assert w[1] == tag, f"{name}: op {k} reads {buf} = {w[1]}, wants {tag}"
            assert w[2], f"{name}: op {k} reads {buf} before its cp.async group was waited for"
            assert w[3], f"{name}: op {k} reads {buf} before a barrier published it"
            pending_reads[buf] = True
    return len(tr.ops)


def fwd_trace(n_min, n_max, ring, extras_mask, skips):
    """fwd_kernel.cuh, one CTA."""
    t = Trace()
    t.load("Q", "Q")
    if n_max > n_min:
        t.load("K0", n_max - 1)
        if ring:
            t.load("V0", n_max - 1)
    t.commit()
    if ring:
        if n_max - 1 > n_min:
            t.load("K1", n_max - 2)
            t.load("V1", n_max - 2)
        t.commit()

    def iteration(stage, n):
        if ring:
            t.wait(1)
            t.sync()
        else:
            t.wait(0)
            t.sync()
            t.load("V0", n)
            t.commit()
        if extras_mask:
            t.sync()  # __syncthreads_or of the attn_mask pre-pass
        skip = skips(n)
        if ring:
            if not skip:
                t.read("Q", "Q"), t.read(f"K{stage}", n), t.read(f"V{stage}", n)
            t.sync()
            if n - 2 >= n_min:
                t.load(f"K{stage}", n - 2)
                t.load(f"V{stage}", n - 2)
            t.commit()
        else:
            if not skip:
                t.read("Q", "Q"), t.read("K0", n)
            t.wait(0)
            t.sync()
            if n - 1 >= n_min:
                t.load("K0", n - 1)
            t.commit()
            if not skip:
                t.read("V0", n)

    n = n_max - 1
    if ring:
        while n >= n_min:
            iteration(0, n)
            if n - 1 < n_min:
                break
            iteration(1, n - 1)
            n -= 2
    else:
        while n >= n_min:
            iteration(0, n)
            n -= 1
    t.wait(0)
    t.sync()
    t.store("Q", "O")  # O through the Q tile
    t.sync()
    t.read("Q", "O")
    return t


def bwd_trace(total, stages, deterministic, extras_mask, skips):
    """bwd_kernel.cuh, one CTA; `total` (query head, query block) pairs."""
    t = Trace()

    def load_stage(it, s):
        t.load(f"Q{s}", it), t.load(f"dO{s}", it)
        t.store(f"lse{s}", it), t.store(f"D{s}", it)

    t.load("K", "K"), t.load("V", "V")
    if total > 0:
        load_stage(0, 0)
    t.commit()
    for it in range(total):
        s = it & 1 if stages == 2 else 0
        if stages == 2 and it + 1 < total:
            load_stage(it + 1, s ^ 1)
            t.commit()
            t.wait(1)
        else:
            t.wait(0)
        t.sync()
        if extras_mask:
            t.sync()
        skip = skips(it)
        if not skip:
            for b in ("K", "V"):
                t.read(b, b)
            for b in (f"Q{s}", f"dO{s}", f"lse{s}", f"D{s}"):
                t.read(b, it)
            t.store("P", it), t.store("dS", it)
        t.sync()
        if not skip:
            t.read("P", it), t.read("dS", it), t.read(f"dO{s}", it), t.read(f"Q{s}", it)
        if deterministic:
            t.sync()
        if not skip:
            t.read("dS", it), t.read("K", "K")
        if deterministic:
            t.sync()
        t.sync()
        if stages == 1 and it + 1 < total:
            load_stage(it + 1, 0)
            t.commit()
    t.wait(0)
    t.sync()
    t.store("K", "dK"), t.store("V", "dV")
    t.sync()
    t.read("K", "dK"), t.read("V", "dV")
    return t


def check_pipelines():
    count = 0
    for n_min in range(0, 3):
        for n_max in range(n_min, n_min + 7):
            for ring in (False, True):
                for extras in (False, True):
                    for pattern in range(4):
                        skips = (lambda n: False) if pattern == 0 else (lambda n, m=pattern: (n * 7 + m) % 3 == 0)
                        for async_loads in (True, False):
                            tr = fwd_trace(n_min, n_max, ring, extras, skips)
                            check_trace(tr, f"fwd ring={ring} n=[{n_min},{n_max}) pattern {pattern}", async_loads)
                            count += 1
    for total in range(0, 8):
        for stages in (1, 2):
            for det in (False, True):
                for extras in (False, True):
                    for pattern in range(4):
                        skips = (lambda it: False) if pattern == 0 else (lambda it, m=pattern: (it * 5 + m) % 3 == 0)
                        for async_loads in (True, False):
                            tr = bwd_trace(total, stages, det, extras, skips)
                            check_trace(tr, f"bwd stages={stages} total={total} det={det}", async_loads)
                            count += 1
    print(f"shared-memory pipeline schedules: ok ({count} traces)")


def self_test():
    """The trace checker must catch the classic mistakes (else it proves nothing)."""
    bad = []
    t = Trace()  # read without waiting
    t.load("A", 0), t.commit(), t.sync(), t.read("A", 0)
    bad.append(t)
    t = Trace()  # waited but no barrier
    t.load("A", 0), t.commit(), t.wait(0), t.read("A", 0)
    bad.append(t)
    t = Trace()  # overwrite without a barrier after the last read (WAR)
    t.load("A", 0), t.commit(), t.wait(0), t.sync(), t.read("A", 0), t.load("A", 1)
    bad.append(t)
    t = Trace()  # wait<1> leaves the wanted group in flight
    t.load("A", 0), t.commit(), t.load("B", 1), t.commit(), t.wait(1), t.sync(), t.read("B", 1)
    bad.append(t)
    t = Trace()  # uncommitted loads are not covered by wait_group
    t.load("A", 0), t.wait(0), t.sync(), t.read("A", 0)
    bad.append(t)
    for k, tr in enumerate(bad):
        try:
            check_trace(tr, f"self-test {k}")
        except AssertionError:
            continue
        raise SystemExit(f"check_schedules.py: the trace checker missed broken schedule {k}")


if __name__ == "__main__":
    self_test()
    check_pipelines()
    check_band()
    check_deterministic()
    check_block_sparse()
    print("check_schedules.py: all ok")
    sys.exit(0)
