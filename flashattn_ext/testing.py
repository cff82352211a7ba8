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
