"""Argument checks shared by ring and Ulysses attention (ValueError naming the argument)."""

from typing import Tuple

import torch

from .._api import _band

LAYOUTS = ("bshd", "bhsd")
SHARDINGS = ("zigzag", "contiguous")


def check_args(fn: str, q, k, v, layout: str, sharding: str, dropout_p: float, causal: bool,
               window_size) -> Tuple[int, int]:
    """Validates what the op cannot (layout, sharding, dropout) and returns the global band."""
    if layout not in LAYOUTS:
        raise ValueError(f"flashattn_ext.distributed.{fn}: layout must be 'bshd' (batch, seq, heads, dim) or 'bhsd' "
                         f"(batch, heads, seq, dim), got {layout!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"flashattn_ext.distributed.{fn}: sharding must be 'zigzag' or 'contiguous', got {sharding!r}")
    if dropout_p != 0.0:
        raise ValueError(f"flashattn_ext.distributed.{fn}: dropout_p must be 0 (dropout is not supported in context "
                         f"parallel attention), got {dropout_p}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flashattn_ext.distributed.{fn}: {name} must be a 4-D ({layout}) tensor, got {got}")
    return _band(causal, window_size)


def seq_dim(layout: str) -> int:
    return 1 if layout == "bshd" else 2


def check_zigzag_length(fn: str, seqlen_local: int, sharding: str) -> None:
    if sharding == "zigzag" and seqlen_local % 2:
        raise ValueError(f"flashattn_ext.distributed.{fn}: a zigzag shard holds two equal chunks, so the local "
                         f"sequence length must be even, got {seqlen_local} (use zigzag_shard, or "
                         f"sharding='contiguous')")
