"""I/O complexity lab: attention schedules on a two-level memory model.

Slow memory holds named arrays; fast memory holds M words. A schedule moves tiles between them
through :class:`TwoLevelMemory`, which refuses to exceed M or to compute on data that is not
resident, and counts every word read and written per array. Each schedule really computes
attention (NumPy, float64) while it is counted, so its output is checked against a reference.

    from flashattn_ext import iolab
    r = iolab.simulate("flash2", seqlen=1024, headdim=64, cache_words=16384)
    r.io_words, r.closed_form_io_words, r.max_abs_error

Command line: ``python -m flashattn_ext.iolab {simulate,compare,sweep,tune,measure} --help``.
NumPy only; torch is imported by ``measure`` alone, when it runs.
"""

from . import bounds
from .memory import CapacityError, Operand, ResidencyError, Tile, TwoLevelMemory
from .plans import CacheTooSmall, Plan, plan_for, random_block_mask
from .schedules import BACKWARD, FORWARD, SCHEDULES
from .simulate import SimResult, predict, simulate

__all__ = [
    "TwoLevelMemory", "Tile", "Operand", "CapacityError", "ResidencyError", "CacheTooSmall",
    "Plan", "plan_for", "random_block_mask", "SCHEDULES", "FORWARD", "BACKWARD",
    "SimResult", "simulate", "predict", "bounds",
]
