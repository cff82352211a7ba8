"""Process groups and the point-to-point traffic of the ring: group resolution, one ring shift
(send to the next rank, receive from the previous one, asynchronously), and a byte counter."""

import contextlib
import time
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist


class Ring(NamedTuple):
    group: Optional["dist.ProcessGroup"]
    rank: int
    world: int


def resolve_group(group) -> Ring:
    """group: None (the default group; world size 1 when torch.distributed is not initialised),
    a ProcessGroup, a 1-D DeviceMesh (e.g. mesh["cp"]) or a (DeviceMesh, dim) pair."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return Ring(None, 0, 1)
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        from torch.distributed.device_mesh import DeviceMesh  # only when a mesh is passed
        if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
            group = group[0].get_group(group[1])
        elif isinstance(group, DeviceMesh):
            if group.ndim != 1:
                raise ValueError(f"flashattn_ext.distributed: group is a {group.ndim}-D DeviceMesh; pass one "
                                 f"dimension, mesh['<name>'] or (mesh, dim)")
            group = group.get_group()
        else:
            raise TypeError(f"flashattn_ext.distributed: group must be None, a ProcessGroup, a 1-D DeviceMesh or "
                            f"(DeviceMesh, dim), got {type(group).__name__}")
    return Ring(group, dist.get_rank(group), dist.get_world_size(group))


_counters: List["ByteCounter"] = []


class ByteCounter:
    """Bytes this process sent point-to-point and through all-to-all while active, and the time
    it spent blocked on communication (what is not hidden behind compute)."""

    def __init__(self):
        self.sent_bytes = 0
        self.messages = 0
        self.wait_s = 0.0

    def add(self, tensors):
        for t in tensors:
            self.sent_bytes += t.numel() * t.element_size()
            self.messages += 1


@contextlib.contextmanager
def count_bytes():
    """with count_bytes() as c: ... ; c.sent_bytes -- what this rank sent (all-to-all: the slices
    addressed to other ranks); c.wait_s -- seconds blocked on communication (ring waits, all-to-alls, the shape check)."""
    c = ByteCounter()
    _counters.append(c)
    try:
        yield c
    finally:
        _counters.remove(c)


def record(tensors):
    for c in _counters:
        c.add(tensors)


def ring_shift(ring: Ring, send: List[torch.Tensor], recv: List[torch.Tensor], tag: int, direction: int = 1) -> list:
    """Start sending `send` to rank+direction and receiving `recv` from rank-direction; returns the
    works to wait on. Tensor i travels with tag tag+i, so two shifts may be in flight at once (K/V
    and dK/dV)."""
    nxt, prv = (ring.rank + direction) % ring.world, (ring.rank - direction) % ring.world
    ops = [dist.P2POp(dist.isend, t, group=ring.group, group_peer=nxt, tag=tag + i) for i, t in enumerate(send)]
    ops += [dist.P2POp(dist.irecv, t, group=ring.group, group_peer=prv, tag=tag + i) for i, t in enumerate(recv)]
    record(send)
    return dist.batch_isend_irecv(ops)


@contextlib.contextmanager
def _blocked():
    """Counts the time inside as blocked on communication (for the active counters)."""
    start = time.perf_counter() if _counters else 0.0
    yield
    for c in _counters:
        c.wait_s += time.perf_counter() - start


def wait_all(works) -> None:
    with _blocked():
        for w in works:
            w.wait()


def all_to_all(ring: Ring, send: torch.Tensor) -> torch.Tensor:
    """all_to_all_single over dim 0 (split in world equal parts): part w goes to rank w."""
    recv = torch.empty_like(send)
    record([send[: send.size(0) * (ring.world - 1) // ring.world]])  # the slices that leave this rank
    with _blocked():
        dist.all_to_all_single(recv, send, group=ring.group)
    return recv


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_MAX_DIMS = 6


def _describe(row: List[int], names: List[str]) -> str:
    parts = []
    for n, i in enumerate(range(0, len(row) - 1, _MAX_DIMS + 1)):
        ndim = row[i]
        parts.append(f"{names[n]} {tuple(row[i + 1:i + 1 + ndim])}")
    dtype = _DTYPES[row[-1]] if 0 <= row[-1] < len(_DTYPES) else "other"
    return ", ".join(parts) + f", {dtype}"


def check_same_shapes(ring: Ring, fn: str, **tensors) -> None:
    """All ranks must pass shards of the same shapes and dtype (a mismatch would hang or corrupt
    the ring): one small all-gather, after which every rank raises the same ValueError."""
    row = []
    for t in tensors.values():
        dims = list(t.shape)[:_MAX_DIMS]
        row += [len(dims)] + dims + [0] * (_MAX_DIMS - len(dims))
    first = next(iter(tensors.values()))
    row.append(_DTYPES.index(first.dtype) if first.dtype in _DTYPES else len(_DTYPES))
    mine = torch.tensor(row, dtype=torch.int64, device=first.device)
    gathered = [torch.empty_like(mine) for _ in range(ring.world)]
    with _blocked():
        dist.all_gather(gathered, mine, group=ring.group)
    rows = [g.tolist() for g in gathered]
    if any(r != rows[0] for r in rows):
        names = list(tensors)
        per_rank = "; ".join(f"rank {i}: {_describe(r, names)}" for i, r in enumerate(rows))
        raise ValueError(f"flashattn_ext.distributed.{fn}: every rank must pass shards of the same shape and dtype "
                         f"(shards of different lengths are not supported); got {per_rank}")
