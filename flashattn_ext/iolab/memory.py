"""The two-level memory model: a slow memory of named arrays and a fast memory of M words.

A schedule sees slow memory only through this object. It loads regions of slow arrays into tiles
(fast memory), allocates scratch tiles, computes on tiles, stores tiles back and frees them. The
model counts every word read from and written to slow memory, per array, and refuses

* any allocation or load that would make the resident words exceed ``cache_words``
  (:class:`CapacityError`), and
* any computation on a tile that is no longer resident (:class:`ResidencyError`): a tile's
  ``data`` cannot be touched after it is freed, and slow arrays are not reachable at all.

Counting is by tiles: a load of an r x c region costs r*c words in one step. With
``word_level=True`` the model instead moves, reserves and counts one word at a time and keeps a
per-word residency map of every slow array; that mode is slow and exists to cross-check the
tile-level counts on small problems.

Lanes. FlashAttention-style schedules run an outer loop whose iterations are independent and
have identical footprints (one query block per iteration, say). To keep the simulation fast the
schedules may execute a group of such iterations in lock-step with NumPy: a *lane tile* holds one
tile per iteration along a leading axis. The model charges slow-memory traffic for every lane but
reserves fast memory for one lane only, because the iterations run one after another in the
algorithm being modelled. A schedule that runs with ``max_lanes == 1`` (always the case in
word-level mode) executes every iteration separately, so the word-level cross-check also checks
that lock-step execution charges the same words as sequential execution.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from math import prod

import numpy as np

__all__ = [
    "CapacityError",
    "ResidencyError",
    "Tile",
    "TwoLevelMemory",
    "Operand",
]


class CapacityError(RuntimeError):
    """A step would need more than M words of fast memory."""


class ResidencyError(RuntimeError):
    """A step computes on (or stores from) a tile that is not resident in fast memory."""


def _region(shape: tuple[int, ...], index) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Validate a rectangular region of an array of ``shape``; return (slices, region shape)."""
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) < len(shape):
        index = index + (slice(None),) * (len(shape) - len(index))
    if len(index) != len(shape):
        raise IndexError(f"region {index} has more axes than the array {shape}")
    slices, sizes = [], []
    for axis, (sl, dim) in enumerate(zip(index, shape)):
        if isinstance(sl, (int, np.integer)):
            sl = slice(int(sl), int(sl) + 1)
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise IndexError(f"axis {axis}: regions are contiguous slices, got {sl!r}")
        start = 0 if sl.start is None else int(sl.start)
        stop = dim if sl.stop is None else int(sl.stop)
        if not 0 <= start < stop <= dim:
            raise IndexError(f"axis {axis}: region {start}:{stop} is empty or outside 0:{dim}")
        slices.append(slice(start, stop))
        sizes.append(stop - start)
    return tuple(slices), tuple(sizes)


class Tile:
    """A buffer in fast memory. ``data`` has shape ``shape`` or, for a lane tile, (lanes, *shape)."""

    __slots__ = ("label", "shape", "lanes", "words", "_array", "_mem", "_live", "_origin")

    def __init__(self, mem, label, shape, lanes, array, origin=None):
        self.label = label
        self.shape = tuple(shape)
        self.lanes = lanes  # None: a single tile; an int: a lane tile
        self.words = prod(self.shape)  # fast-memory words of ONE lane
        self._array = array
        self._mem = mem
        self._live = True
        self._origin = origin  # word-level mode: list of (array name, flat indices) it holds

    @property
    def resident(self) -> bool:
        return self._live

    @property
    def data(self) -> np.ndarray:
        if not self._live:
            raise ResidencyError(f"tile {self.label!r} is not resident in fast memory (it was freed)")
        if self._mem.word_level:
            self._mem._check_words_resident(self)
        return self._array

    def __repr__(self):
        lanes = "" if self.lanes is None else f" x{self.lanes} lanes"
        state = "resident" if self._live else "freed"
        return f"Tile({self.label!r}, {self.shape}{lanes}, {state})"


@dataclass(frozen=True)
class Operand:
    """A matrix operand read from slow memory by :meth:`TwoLevelMemory.stream_product`.

    ``span`` selects the operand's non-reduced extent (rows of A, columns of B); ``transposed``
    says the slow array holds the operand transposed (A = arr.T, i.e. A[i, k] = arr[k, i]).
    """

    name: str
    span: slice
    transposed: bool = False


@dataclass
class _Counts:
    reads: dict = field(default_factory=lambda: defaultdict(int))
    writes: dict = field(default_factory=lambda: defaultdict(int))


class TwoLevelMemory:
    """Slow memory (named float64 arrays) and a fast memory of ``cache_words`` words."""

    def __init__(self, cache_words: int, *, word_level: bool = False, max_lanes: int | None = None):
        cache_words = int(cache_words)
        if cache_words < 1:
            raise ValueError(f"cache_words must be positive, got {cache_words}")
        self.cache_words = cache_words
        self.word_level = bool(word_level)
        # Lock-step lanes are a simulation device; word-level mode runs every iteration on its own.
        self.max_lanes = 1 if self.word_level else (max_lanes or 1 << 30)
        self._slow: dict[str, np.ndarray] = {}
        self._resident_map: dict[str, np.ndarray] = {}
        self._counts = _Counts()
        self.used_words = 0
        self.peak_words = 0
        self.live_tiles = 0

    # ------------------------------------------------------------------ slow memory (no I/O)
    def place(self, name: str, array) -> None:
        """Put an input array in slow memory (its initial contents; costs nothing)."""
        self._slow[name] = np.array(array, dtype=np.float64, copy=True)
        self._new_map(name)

    def create(self, name: str, shape, fill: float = np.nan) -> None:
        """Create an output/intermediate array in slow memory (uninitialised: NaN)."""
        self._slow[name] = np.full(tuple(int(s) for s in shape), fill, dtype=np.float64)
        self._new_map(name)

    def result(self, name: str) -> np.ndarray:
        """Read an array back after the schedule has finished (for checking; not an I/O)."""
        return self._slow[name].copy()

    def _new_map(self, name):
        if self.word_level:
            self._resident_map[name] = np.zeros(self._slow[name].shape, dtype=np.int64)

    # ------------------------------------------------------------------ counters
    @property
    def reads(self) -> dict[str, int]:
        return {k: v for k, v in self._counts.reads.items() if v}

    @property
    def writes(self) -> dict[str, int]:
        return {k: v for k, v in self._counts.writes.items() if v}

    @property
    def reads_words(self) -> int:
        return sum(self._counts.reads.values())

    @property
    def writes_words(self) -> int:
        return sum(self._counts.writes.values())

    # ------------------------------------------------------------------ fast-memory accounting
    def _reserve(self, words: int, what: str) -> None:
        if self.word_level:
            for _ in range(words):  # one word at a time
                if self.used_words + 1 > self.cache_words:
                    raise CapacityError(self._overflow_message(what))
                self.used_words += 1
                if self.used_words > self.peak_words:
                    self.peak_words = self.used_words
            return
        if self.used_words + words > self.cache_words:
            self.used_words += words  # for the message only
            msg = self._overflow_message(what)
            self.used_words -= words
            raise CapacityError(msg)
        self.used_words += words
        if self.used_words > self.peak_words:
            self.peak_words = self.used_words

    def _overflow_message(self, what):
        return (
            f"{what} needs {self.used_words} words of fast memory, more than M = {self.cache_words}"
        )

    def _release(self, words: int) -> None:
        if self.word_level:
            for _ in range(words):
                self.used_words -= 1
        else:
            self.used_words -= words
        assert self.used_words >= 0

    def _count(self, table, name, words):
        if self.word_level:
            for _ in range(words):
                table[name] += 1
        else:
            table[name] += words

    # ------------------------------------------------------------------ word-level residency
    def _flat(self, name, slices):
        shape = self._slow[name].shape
        idx = np.arange(prod(shape)).reshape(shape)[slices]
        return idx.ravel()

    def _mark(self, name, flat, delta):
        m = self._resident_map[name].reshape(-1)
        for w in flat:  # word by word
            m[w] += delta

    def _check_words_resident(self, tile):
        for name, flat in tile._origin or ():
            m = self._resident_map[name].reshape(-1)
            for w in flat:
                if m[w] <= 0:
                    raise ResidencyError(f"word {w} of {name} in tile {tile.label!r} is not resident")

    # ------------------------------------------------------------------ tiles
    def alloc(self, shape, label: str = "scratch", *, lanes: int | None = None, fill: float = 0.0) -> Tile:
        """Allocate on-chip scratch (no I/O). ``lanes``: one tile per lock-step lane."""
        shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        if any(s < 1 for s in shape):
            raise ValueError(f"empty tile {label!r}: {shape}")
        self._check_lanes(lanes)
        self._reserve(prod(shape), f"allocating {label!r} {shape}")
        full = shape if lanes is None else (lanes,) + shape
        self.live_tiles += 1
        return Tile(self, label, shape, lanes, np.full(full, fill, dtype=np.float64), origin=[])

    def load(self, name: str, region, *, label: str | None = None, lanes: int = 1) -> Tile:
        """Load one region of a slow array. ``lanes`` > 1: each of that many lock-step lanes
        issues this same load (charged ``lanes`` times; the data, identical, is held once)."""
        arr = self._slow[name]
        slices, shape = _region(arr.shape, region)
        label = label or f"{name}{_fmt(slices)}"
        self._check_lanes(lanes if lanes > 1 else None)
        self._reserve(prod(shape), f"loading {label}")
        self._count(self._counts.reads, name, lanes * prod(shape))
        origin = []
        if self.word_level:
            flat = self._flat(name, slices)
            self._mark(name, flat, +1)
            origin = [(name, flat)]
            data = np.empty(shape)
            src = arr[slices]
            for ix in np.ndindex(shape):  # word by word
                data[ix] = src[ix]
        else:
            data = arr[slices].copy()
        self.live_tiles += 1
        return Tile(self, label, shape, None, data, origin=origin)

    def load_rows(self, name: str, starts, size: int, cols: slice | None = None, *, label: str | None = None) -> Tile:
        """Lane load: lane l gets rows starts[l] : starts[l] + size (and ``cols``) of ``name``."""
        arr = self._slow[name]
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        lanes = len(starts)
        if lanes == 0:
            raise ValueError("load_rows needs at least one lane")
        self._check_lanes(lanes)
        extra = () if cols is None else (cols,)
        for s in (starts.min(), starts.max()):  # every lane's region is inside the array
            _, shape = _region(arr.shape, (slice(int(s), int(s) + size),) + extra)
        label = label or f"{name}[rows x{lanes} lanes]"
        self._reserve(prod(shape), f"loading {label}")
        self._count(self._counts.reads, name, lanes * prod(shape))
        block = _consecutive(starts, size)
        if block is not None:  # adjacent row blocks: one slice, reshaped per lane
            data = arr[block].reshape((lanes, size) + arr.shape[1:])
        else:
            data = arr[starts[:, None] + np.arange(size)[None, :]]
        data = np.array(data if cols is None else data[..., cols])  # a copy: the tile's own words
        origin = []
        if self.word_level:
            for s in starts:
                sl = _region(arr.shape, (slice(int(s), int(s) + size),) + extra)[0]
                flat = self._flat(name, sl)
                self._mark(name, flat, +1)
                origin.append((name, flat))
        self.live_tiles += 1
        return Tile(self, label, shape, lanes, data, origin=origin)

    def store(self, tile: Tile, name: str, region, *, part=None, lanes: int = 1) -> None:
        """Write a resident tile (or ``part`` of it, a tuple of slices) to a region of ``name``."""
        arr = self._slow[name]
        slices, shape = _region(arr.shape, region)
        src = tile.data if part is None else tile.data[part]
        if tile.lanes is not None:
            raise ValueError("store() takes a single tile; use store_rows() for a lane tile")
        if src.shape != shape:
            raise ValueError(f"storing {tile.label!r} part {src.shape} into region {shape} of {name}")
        self._count(self._counts.writes, name, lanes * prod(shape))
        if self.word_level:
            dst = arr[slices]
            for ix in np.ndindex(shape):
                dst[ix] = src[ix]
        else:
            arr[slices] = src

    def store_rows(self, tile: Tile, name: str, starts, size: int, cols: slice | None = None, *, part=None) -> None:
        """Lane store: lane l of ``tile`` (or ``part`` of it) goes to rows starts[l] : starts[l]+size."""
        arr = self._slow[name]
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        data = tile.data
        if tile.lanes is None:
            raise ValueError("store_rows() takes a lane tile")
        if part is not None:
            data = data[(slice(None),) + tuple(part)]
        if len(starts) != data.shape[0]:
            raise ValueError(f"{len(starts)} row blocks for {data.shape[0]} lanes")
        if starts.min() < 0 or starts.max() + size > arr.shape[0]:
            raise IndexError(f"row blocks of {name} outside 0:{arr.shape[0]}")
        region_shape = (size,) + (arr.shape[1:] if cols is None else (_region(arr.shape[1:], cols)[1]))
        if data.shape[1:] != region_shape:
            raise ValueError(f"storing lanes of {data.shape[1:]} into row blocks of {region_shape} of {name}")
        self._count(self._counts.writes, name, len(starts) * prod(region_shape))
        block = _consecutive(starts, size)
        if block is not None:
            view = arr[block].reshape((len(starts), size) + arr.shape[1:])
            if cols is None:
                view[...] = data
            else:
                view[..., cols] = data
            return
        rows = starts[:, None] + np.arange(size)[None, :]
        if cols is None:
            arr[rows] = data
        else:
            sub = arr[rows]
            sub[..., cols] = data
            arr[rows] = sub

    def free(self, *tiles: Tile) -> None:
        for t in tiles:
            if t is None:
                continue
            if not t._live:
                raise ResidencyError(f"tile {t.label!r} freed twice")
            t._live = False
            self._release(t.words)
            self.live_tiles -= 1
            if self.word_level:
                for name, flat in t._origin or ():
                    self._mark(name, flat, -1)
            t._array = None

    def _check_lanes(self, lanes):
        if lanes is not None and lanes > self.max_lanes:
            raise ValueError(f"{lanes} lanes requested; this memory runs at most {self.max_lanes}")

    # ------------------------------------------------------------------ streamed products
    def stream_product(
        self,
        acc: Tile,
        a: Operand,
        b: Operand,
        k_span: slice,
        chunk: int,
        *,
        alpha: float = 1.0,
        a_row_scale: Tile | None = None,
    ) -> None:
        """acc += alpha * diag(a_row_scale) A[:, k] B[k, :], streaming the reduced axis in chunks.

        The algorithm being modelled loads, for each chunk of ``chunk`` indices of ``k_span``, the
        slice A[:, chunk] and B[chunk, :], multiplies into the resident accumulator and frees the
        slices. Tile-level mode charges the whole panels at once and reserves the footprint of the
        largest chunk; word-level mode runs the chunk loop literally with word-by-word loads.
        """
        k0, k1 = k_span.start, k_span.stop
        if not (0 <= k0 < k1) or chunk < 1:
            raise ValueError(f"bad stream: k {k0}:{k1}, chunk {chunk}")
        acc_data = acc.data  # residency checks
        scale = None if a_row_scale is None else a_row_scale.data.reshape(-1, 1)
        m = a.span.stop - a.span.start
        n = b.span.stop - b.span.start
        if acc_data.shape != (m, n):
            raise ValueError(f"accumulator {acc.shape} does not match A rows {m} x B cols {n}")

        def a_region(lo, hi):
            return (slice(lo, hi), a.span) if a.transposed else (a.span, slice(lo, hi))

        def b_region(lo, hi):
            return (b.span, slice(lo, hi)) if b.transposed else (slice(lo, hi), b.span)

        if self.word_level:
            for lo in range(k0, k1, chunk):
                hi = min(lo + chunk, k1)
                ta = self.load(a.name, a_region(lo, hi))
                tb = self.load(b.name, b_region(lo, hi))
                A = ta.data.T if a.transposed else ta.data
                B = tb.data.T if b.transposed else tb.data
                if scale is not None:
                    A = scale * A
                acc_data += alpha * (A @ B)
                self.free(ta, tb)
            return
        width = min(chunk, k1 - k0)
        a_arr, b_arr = self._slow[a.name], self._slow[b.name]
        sa, _ = _region(a_arr.shape, a_region(k0, k1))
        sb, _ = _region(b_arr.shape, b_region(k0, k1))
        self._reserve(width * (m + n), f"streaming {a.name} x {b.name} in chunks of {width}")
        self._release(width * (m + n))
        self._count(self._counts.reads, a.name, m * (k1 - k0))
        self._count(self._counts.reads, b.name, n * (k1 - k0))
        A = a_arr[sa].T if a.transposed else a_arr[sa]
        B = b_arr[sb].T if b.transposed else b_arr[sb]
        if scale is not None:
            A = scale * A
        acc_data += alpha * (A @ B)


def _consecutive(starts: np.ndarray, size: int):
    """The slice covering row blocks starts[0], starts[0] + size, ... if they are adjacent, else None."""
    s0 = int(starts[0])
    if len(starts) == 1 or (np.diff(starts) == size).all():
        return slice(s0, s0 + len(starts) * size)
    return None


def _fmt(slices):
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in slices) + "]"
