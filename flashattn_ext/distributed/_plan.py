"""Which (query rows, key rows) of a rank pair a ring step computes, and with which band.

Pure index arithmetic, no torch. A rank's shard is a list of segments of the global sequence
(global start, local start, length): one for contiguous sharding, two for zigzag (chunks r and
2W-1-r). Globally, query i sees key j iff i - left <= j <= i + right (-1 = unbounded; causal is
right = 0), and q and k have the same global length, so top-left and bottom-right alignment agree.
The op's band is top-left in its own local coordinates, with window sizes >= 0: a segment pair
whose band is offset from the local diagonal is translated by trimming the leading keys (or query
rows) that nothing in it can see, which puts the band's edge on the local diagonal.
"""

from typing import List, NamedTuple, Optional, Tuple


class Segment(NamedTuple):
    global_start: int
    local_start: int
    length: int


class Call(NamedTuple):
    """One op call: local query rows [q_lo, q_hi), key rows [k_lo, k_hi), band (left, right)."""
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    left: int
    right: int

    @property
    def full(self) -> bool:
        return self.left < 0 and self.right < 0


def segments(rank: int, world: int, seqlen_local: int, sharding: str) -> List[Segment]:
    """The global pieces a rank holds: contiguous (rank r holds [r*S, (r+1)*S)) or zigzag."""
    if sharding == "contiguous":
        return [Segment(rank * seqlen_local, 0, seqlen_local)]
    chunk = seqlen_local // 2
    return [Segment(rank * chunk, 0, chunk), Segment((2 * world - 1 - rank) * chunk, chunk, chunk)]


def pair_call(qs: Segment, ks: Segment, left: int, right: int) -> Optional[Call]:
    """The op call for one (query segment, key segment) pair under the global band, or None
    when the band excludes every pair of positions."""
    lq, lk = qs.length, ks.length
    if lq == 0 or lk == 0:
        return None
    d = qs.global_start - ks.global_start  # local row i sees local key j iff i+d-left <= j <= i+d+right
    if left >= 0 and d - left > lk - 1:
        return None  # even row 0 starts seeing keys after the last one
    if right >= 0 and (lq - 1) + d + right < 0:
        return None  # even the last row stops before the first key
    if (left < 0 or (lq - 1) + d - left <= 0) and (right < 0 or lk - 1 <= d + right):
        return Call(qs.local_start, qs.local_start + lq, ks.local_start, ks.local_start + lk, -1, -1)
    q0 = k0 = 0  # leading rows that see nothing / leading keys that nothing sees
    q_end, k_end = lq, lk
    if left >= 0:
        k0 = max(0, d - left)
        q_end = min(lq, lk - 1 - d + left + 1)  # rows past this start after the last key
    if right >= 0:
        q0 = max(0, -(d + right))
        k_end = min(lk, (lq - 1) + d + right + 1)  # keys past this are after the last row's band
    dd = d + q0 - k0  # the offset after trimming: -right <= dd <= left, so both sizes are >= 0
    wl = -1 if left < 0 else left - dd
    wr = -1 if right < 0 else right + dd
    assert wl >= -1 and wr >= -1 and (left < 0 or wl >= 0) and (right < 0 or wr >= 0)
    return Call(qs.local_start + q0, qs.local_start + q_end, ks.local_start + k0, ks.local_start + k_end, wl, wr)


def _merge_full(calls: List[Call]) -> List[Call]:
    """Unmasked calls on adjacent key ranges of the same rows (or adjacent rows of the same keys)
    become one call: fewer, larger GEMM tiles and fewer merges."""
    merged = True
    while merged:
        merged = False
        for a in range(len(calls)):
            for b in range(len(calls)):
                x, y = calls[a], calls[b]
                if a == b or not (x.full and y.full):
                    continue
                if (x.q_lo, x.q_hi) == (y.q_lo, y.q_hi) and x.k_hi == y.k_lo:
                    joined = Call(x.q_lo, x.q_hi, x.k_lo, y.k_hi, -1, -1)
                elif (x.k_lo, x.k_hi) == (y.k_lo, y.k_hi) and x.q_hi == y.q_lo:
                    joined = Call(x.q_lo, y.q_hi, x.k_lo, x.k_hi, -1, -1)
                else:
                    continue
                calls = [c for i, c in enumerate(calls) if i not in (a, b)] + [joined]
                merged = True
                break
            if merged:
                break
    return sorted(calls)


def plan_step(q_segments: List[Segment], k_segments: List[Segment], band: Tuple[int, int]) -> List[Call]:
    """The calls for this rank's queries against one rank's keys (empty: the step is skipped)."""
    left, right = band
    if q_segments == k_segments and left < 0 and right == 0:
        # Causal against its own shard: segments are stored in increasing global order, so the
        # local causal mask is the global one (for zigzag it also skips chunk r x chunk 2W-1-r).
        n = sum(s.length for s in q_segments)
        return [Call(0, n, 0, n, -1, 0)] if n else []
    calls = [c for qs in q_segments for ks in k_segments if (c := pair_call(qs, ks, left, right)) is not None]
    return _merge_full(calls)


def step_work(calls: List[Call]) -> int:
    """Visible (query, key) pairs the calls compute: the load-balance measure."""
    total = 0
    for c in calls:
        rows, keys = c.q_hi - c.q_lo, c.k_hi - c.k_lo
        for i in range(rows):
            lo = 0 if c.left < 0 else max(0, i - c.left)
            hi = keys if c.right < 0 else min(keys, i + c.right + 1)
            total += max(0, hi - lo)
    return total
