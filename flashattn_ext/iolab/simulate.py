"""Run a schedule on the two-level memory model and set its counts against the closed forms."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import bounds, schedules
from ._blas import single_threaded_blas
from .memory import TwoLevelMemory
from .plans import Plan, plan_for
from .reference import attention_backward, attention_forward, element_mask, make_problem

__all__ = ["SimResult", "simulate", "predict"]


@dataclass
class SimResult:
    algorithm: str
    seqlen: int
    headdim: int
    cache_words: int
    causal: bool
    backward: bool
    density: float | None
    tiles: dict
    reads_words: int
    writes_words: int
    io_words: int
    peak_words: int
    max_abs_error: float | None
    closed_form_io_words: int
    closed_form_peak_words: int
    lower_bound_words: float
    ratio_to_lower_bound: float
    seconds: float
    simulated: bool = True
    reads_by_array: dict = field(default_factory=dict)
    writes_by_array: dict = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        out["tiles"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.tiles.items()}
        return out


def _bound(plan: Plan, backward: bool) -> float:
    return bounds.lower_bound(plan.seqlen, plan.headdim, plan.cache_words, backward=backward,
                              density=plan.density)


def predict(algorithm: str, seqlen: int, headdim: int, cache_words: int, *, causal=False,
            backward=False, density=None, block_mask=None, seed=0) -> SimResult:
    """The closed-form count for the schedule's tiles, without simulating."""
    sched = schedules.get(algorithm, backward)
    t0 = time.perf_counter()
    plan = plan_for(sched.name, seqlen, headdim, cache_words, causal=causal, density=density,
                    block_mask=block_mask, seed=seed)
    cf = plan.closed_form()
    lb = _bound(plan, sched.backward)
    return SimResult(sched.name, plan.seqlen, plan.headdim, plan.cache_words, causal, sched.backward,
                     plan.density, plan.tiles, cf.reads_words, cf.writes_words, cf.io_words, cf.peak,
                     None, cf.io_words, cf.peak, lb, cf.io_words / lb, time.perf_counter() - t0,
                     simulated=False, reads_by_array=cf.reads, writes_by_array=cf.writes, note=plan.note)


def simulate(algorithm: str, seqlen: int, headdim: int, cache_words: int, *, causal=False,
             backward=False, density=None, block_mask=None, seed=0, word_level=False,
             max_lanes=None, return_outputs=False):
    """Plan, run and check one schedule. Returns a SimResult (and the outputs if asked)."""
    with single_threaded_blas():
        return _simulate(algorithm, seqlen, headdim, cache_words, causal, backward, density, block_mask,
                         seed, word_level, max_lanes, return_outputs)


def _simulate(algorithm, seqlen, headdim, cache_words, causal, backward, density, block_mask, seed,
              word_level, max_lanes, return_outputs):
    sched = schedules.get(algorithm, backward)
    if causal and not sched.causal:
        raise ValueError(f"{sched.name} has no causal variant (causal: "
                         f"{', '.join(n for n, s in schedules.SCHEDULES.items() if s.causal)})")
    t0 = time.perf_counter()
    plan = plan_for(sched.name, seqlen, headdim, cache_words, causal=causal, density=density,
                    block_mask=block_mask, seed=seed)
    prob = make_problem(plan.seqlen, plan.headdim, seed)
    mem = TwoLevelMemory(plan.cache_words, word_level=word_level, max_lanes=max_lanes)
    outputs = sched.run(mem, prob, plan)
    seconds = time.perf_counter() - t0
    if mem.used_words != 0 or mem.live_tiles != 0:
        raise AssertionError(f"{sched.name} left {mem.live_tiles} tiles ({mem.used_words} words) resident")

    bm = plan.block_mask
    mask = element_mask(plan.seqlen, causal, bm, plan.tiles.get("br", 0), plan.tiles.get("bc", 0))
    if sched.backward:
        ref = attention_backward(prob.q, prob.k, prob.v, prob.do, prob.scale, mask)
        err = max(float(np.max(np.abs(outputs[n] - r))) for n, r in zip(("dQ", "dK", "dV"), ref))
    else:
        ref_o, _ = attention_forward(prob.q, prob.k, prob.v, prob.scale, mask)
        err = float(np.max(np.abs(outputs["O"] - ref_o)))
    cf = plan.closed_form()
    lb = _bound(plan, sched.backward)
    res = SimResult(sched.name, plan.seqlen, plan.headdim, plan.cache_words, causal, sched.backward,
                    plan.density, plan.tiles, mem.reads_words, mem.writes_words,
                    mem.reads_words + mem.writes_words, mem.peak_words, err, cf.io_words, cf.peak,
                    lb, (mem.reads_words + mem.writes_words) / lb, seconds,
                    reads_by_array=mem.reads, writes_by_array=mem.writes, note=plan.note)
    return (res, outputs) if return_outputs else res
