"""Test helpers: output poisoning and the dropout keep mask of a forward call."""

import contextlib

import torch

from . import _C


@contextlib.contextmanager
def poison_outputs():
    """Inside this block the op layer fills every output and gradient buffer with NaN right after
    allocating it, so an element a kernel fails to write shows up as NaN."""
    previous = _C.poison_outputs()
    _C.set_poison_outputs(True)
    try:
        yield
    finally:
        _C.set_poison_outputs(previous)


def dropout_mask(q, k, rng_state, dropout_p):
    """The keep mask (bool, shape (..., Hq, L, S)) that the forward with this rng_state applied,
    from the same Philox stream the kernels use. q, k in the op layout (..., heads, seq, dim)."""
    return torch.ops.flashattn_ext.dropout_mask(q, k, rng_state, float(dropout_p))


# ---- the CUDA kernels on the host emulator ---------------------------------------------------

EMULATOR_LIBRARY = "libflashattn_emulator.so"
SCHEDULES = {"lockstep": 0, "warp": 1, "warp-reverse": 2, "random": 3}


def emulator_unavailable_reason():
    """None if the emulated CUDA kernels can run here, else why not (one line)."""
    import os

    # FLASHATTN_EMULATOR_LIBRARY: another build of it (csrc/cuda/emulator/mutate.py uses one per planted bug).
    path = os.environ.get("FLASHATTN_EMULATOR_LIBRARY") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                         EMULATOR_LIBRARY)
    if not os.path.exists(path):
        return (f"{EMULATOR_LIBRARY} was not built (build with FLASHATTN_BUILD_EMULATOR=1; it needs g++, ninja "
                "and the CUDA toolkit headers)")
    error = _C.emulator_load(path)
    return error or None


@contextlib.contextmanager
def emulated_cuda(schedule="lockstep", seed=1, copies_land_at_issue=False, sm=(9, 0), hopper=False):
    """Inside this block, CPU tensors passed to the flashattn_ext ops run the CUDA kernels'
    launch path (csrc/cuda: dispatch, tensor-core and SIMT kernels) on the host emulator
    (csrc/cuda/emulator) instead of the CPU kernels. The emulator executes every CUDA thread as
    a fiber under `schedule` ("lockstep", "warp", "warp-reverse" or "random" with `seed`), checks
    shared-memory races, barriers, collectives and out-of-bounds accesses, and raises
    RuntimeError with a report on the first problem. `copies_land_at_issue`: cp.async writes
    shared memory when issued instead of at its wait_group. `sm`: the emulated GPU (its
    shared-memory limits pick the tile pipeline: (9, 0) H100-class, (8, 0) A100-class). `hopper`:
    the sm_90a kernels (TMA, mbarrier, wgmma; csrc/cuda/fwd_sm90.cuh) take the calls they support,
    as on an H100/H200 with a build that includes 9.0a (sm must be (9, 0)).
    An emulator pass is not a GPU pass: see csrc/cuda/README.md for what it cannot catch."""
    why = emulator_unavailable_reason()
    if why:
        raise RuntimeError(f"flashattn_ext: the CUDA emulator is not available: {why}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    previous = _C.emulating_cuda()
    _C.emulator_configure(True, SCHEDULES[schedule], int(seed), bool(copies_land_at_issue), int(sm[0]), int(sm[1]),
                          bool(hopper))
    try:
        yield
    finally:
        _C.emulator_configure(previous, 0, 1, False, 9, 0, False)


def emulator_stats():
    """What the emulator has run so far in this process: {"launches", "blocks", "threads", "wgmma"}
    (wgmma: warpgroup wgmma ops, which only the Hopper kernels issue)."""
    launches, blocks, threads, wgmma = _C.emulator_stats()
    return {"launches": launches, "blocks": blocks, "threads": threads, "wgmma": wgmma}


def emulator_selftest(name, schedule="lockstep"):
    """Runs one of the emulator's planted-bug kernels (csrc/cuda/emulator/selftest.cu) and returns
    the emulator's report ("" if it found nothing)."""
    why = emulator_unavailable_reason()
    if why:
        raise RuntimeError(f"flashattn_ext: the CUDA emulator is not available: {why}")
    return _C.emulator_selftest(name, SCHEDULES[schedule])
