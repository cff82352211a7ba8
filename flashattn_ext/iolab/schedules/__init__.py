"""The attention schedules the lab can run, by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .backward import run_flash_backward, run_tiled_backward
from .flash import run_block_sparse, run_flash1, run_flash2
from .tiled import run_square_tiling, run_standard


@dataclass(frozen=True)
class Schedule:
    name: str
    run: Callable
    backward: bool
    causal: bool  # supports the causal variant (fully masked tiles skipped)
    summary: str


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("standard", run_standard, False, False,
                 "S = QK^T and P = softmax(S) written to slow memory; tiled products"),
        Schedule("flash1", run_flash1, False, True,
                 "FlashAttention, FA1 loop order (K/V outer), paper block sizes fitted to M"),
        Schedule("flash2", run_flash2, False, True,
                 "FlashAttention-2 loop order (Q outer), I/O-optimal tile shape for M"),
        Schedule("square-tiling", run_square_tiling, False, False,
                 "Saha & Ye: sqrt(M) tiles, N x N matrix written once, fused normaliser"),
        Schedule("block-sparse", run_block_sparse, False, True,
                 "block-sparse FlashAttention (FA2 order) for a block mask of density s"),
        Schedule("flash-bwd", run_flash_backward, True, True,
                 "FlashAttention backward: recompute P from lse; dQ read-modify-write"),
        Schedule("tiled-bwd", run_tiled_backward, True, False,
                 "small-cache backward: tiled products, P and dS written to slow memory"),
    )
}

FORWARD = [n for n, s in SCHEDULES.items() if not s.backward]
BACKWARD = [n for n, s in SCHEDULES.items() if s.backward]

# `--backward` on a forward name picks that family's backward schedule.
BACKWARD_OF = {"flash1": "flash-bwd", "flash2": "flash-bwd", "standard": "tiled-bwd",
               "square-tiling": "tiled-bwd", "flash-bwd": "flash-bwd", "tiled-bwd": "tiled-bwd"}


def get(name: str, backward: bool = False) -> Schedule:
    if backward:
        if name not in BACKWARD_OF:
            raise KeyError(f"{name!r} has no backward schedule (have: {', '.join(BACKWARD_OF)})")
        name = BACKWARD_OF[name]
    if name not in SCHEDULES:
        raise KeyError(f"unknown algorithm {name!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


__all__ = ["Schedule", "SCHEDULES", "FORWARD", "BACKWARD", "BACKWARD_OF", "get"]
