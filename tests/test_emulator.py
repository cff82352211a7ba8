"""The host emulator of the CUDA execution model (csrc/cuda/emulator), checked on its own:

- every planted bug of csrc/cuda/emulator/selftest.cu is reported (with the right check) under
  every schedule, and the same traffic done right is not;
- the emulated CUDA kernels agree with the CPU kernels on the same inputs, forward and gradients,
  within one unit in the last place of fp16/bf16 at each tensor's scale;
- the schedules test_cuda.py does not run (warp-reverse, random with two seeds) and cp.async
  copies that land at issue, on one case per head-dim bucket and on the extras kernel;
- launcher errors come back as reports; the op layer validates as for CUDA tensors.

The kernels' own correctness under emulation is tests/test_cuda.py (marked cuda_emulated there).
An emulator pass is not a GPU pass: csrc/cuda/README.md lists what it cannot see.
"""

import math

import pytest
import torch

import flashattn_ext
from cuda_testing import HEAD_DIM_BUCKETS
from reference import reference_attention
from flashattn_ext.testing import emulated_cuda, emulator_selftest, emulator_unavailable_reason, poison_outputs

_why = emulator_unavailable_reason()
pytestmark = [pytest.mark.cuda_emulated,
              pytest.mark.skipif(_why is not None, reason=f"CUDA emulator unavailable: {_why}")]

ALL_SCHEDULES = ["lockstep", "warp", "warp-reverse", "random"]

# Planted bug -> words the report must contain (which check caught it).
PLANTED = {
    "race_read_after_write": "shared-memory race",
    "race_write_after_read": "shared-memory race",  # read-after-write or write-after-read: the schedule decides
    "copy_not_waited": "still in flight",
    "wait_one_group_too_few": "still in flight",
    "divergent_barriers": "different barriers",
    "divergent_shuffles": "different collectives",
    "lane_exits_before_shuffle": "exited",
    "spin_forever": "deadlock",
    "barrier_never_reached": "deadlock",
    "global_read_past_end": "out-of-bounds global load",
    "shared_past_end": "past the end",
    "misaligned_ldmatrix": "not 16-byte aligned",
    # The Hopper pipeline (selftest_sm90.cu): TMA + mbarrier + wgmma.
    # A wrong phase reads data in flight, or leaves a load never waited for, or waits forever,
    # depending on where the schedule puts the producer.
    "sm90_wrong_mbarrier_phase": ("still in flight", "TMA load", "deadlock"),
    "sm90_missing_expect_tx": ("TMA load", "still in flight"),
    "sm90_wgmma_wait_too_early": "before the wgmma.wait_group",
    "sm90_swizzle_mismatch": "swizzle mismatch",
    "sm90_reload_without_release": "cp.async.bulk.tensor into",
    "sm90_missing_wgmma_fence": "no wgmma.fence",
    "sm90_register_budget": "setmaxnreg.inc (waiting for registers",  # in the deadlock's thread list
}


@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_reported(bug, schedule):
    report = emulator_selftest(bug, schedule)
    words = PLANTED[bug] if isinstance(PLANTED[bug], tuple) else (PLANTED[bug],)
    assert any(w in report for w in words), f"{bug} under {schedule}: report {report!r}"


@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
@pytest.mark.parametrize("kernel", ["correct_pipeline", "sm90_correct_pipeline"])
def test_correct_kernel_passes(kernel, schedule):
    assert emulator_selftest(kernel, schedule) == ""


def test_launcher_errors_are_reported():
    assert "CUDA error from the launchers" in emulator_selftest("no_such_kernel")


def test_validation_is_the_cuda_one():
    """Under the emulator CPU tensors take the CUDA path: its head-dim limit applies."""
    x = torch.randn(1, 1, 8, 600)
    with emulated_cuda(), pytest.raises(ValueError, match="head dims above 512"):
        flashattn_ext.scaled_dot_product_attention(x, x, x)


# ---- the emulated CUDA kernels against the CPU kernels ------------------------------------------


def ulps(a, b, dtype):
    """max |a - b| in units in the last place of dtype at the tensor's largest magnitude. (Per
    element the two can differ by more near zero: the tensor-core kernels round P and dS to
    fp16/bf16 before their products, the CPU kernels round them differently, and an element that
    is the difference of larger terms keeps that error at the terms' scale.)"""
    a, b = a.double(), b.double()
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    scale = b.abs().max().clamp_min(torch.finfo(dtype).tiny)
    return ((a - b).abs().max() / torch.exp2(torch.floor(torch.log2(scale)) - mantissa)).item()


CROSS_CASES = [  # (dtype, head_dim, causal, mask)
    (torch.bfloat16, 64, False, False),
    (torch.bfloat16, 128, True, False),
    (torch.float16, 64, True, False),
    (torch.float16, 96, False, False),
    (torch.bfloat16, 64, False, True),
]


@pytest.mark.parametrize("dtype,head_dim,causal,mask", CROSS_CASES,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_emulated_kernels_match_cpu_kernels(dtype, head_dim, causal, mask):
    B, H, L, S = 1, 2, 150, 170
    q, k, v = (torch.randn(B, H, n, head_dim).to(dtype) for n in (L, S, S))
    dout = torch.randn(B, H, L, head_dim).to(dtype)
    attn_mask = torch.randn(L, S) if mask else None

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with poison_outputs():
            out = flashattn_ext.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, is_causal=causal)
            out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    cpu = run()
    with emulated_cuda():
        emulated = run()
    for name, a, b in zip(["out", "dq", "dk", "dv"], emulated, cpu):
        assert not torch.isnan(a).any()
        assert ulps(a, b, dtype) <= 1.0, f"{name}: {ulps(a, b, dtype):.2f} ulp apart from the CPU kernels"


# ---- other schedules and copy landing ----------------------------------------------------------


def reference(q, k, v, causal, mask=None):
    return reference_attention(q, k, v, mask, causal=causal)[0]


SCHEDULE_CASES = [("warp-reverse", 1, False), ("random", 1, False), ("random", 2, False), ("lockstep", 1, True)]


@pytest.mark.parametrize("schedule,seed,at_issue", SCHEDULE_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("head_dim", HEAD_DIM_BUCKETS)
def test_other_schedules(schedule, seed, at_issue, head_dim):
    torch.manual_seed(head_dim)
    q, k, v = (torch.randn(1, 2, n, head_dim, dtype=torch.bfloat16, requires_grad=True) for n in (70, 90, 90))
    with emulated_cuda(schedule, seed=seed, copies_land_at_issue=at_issue), poison_outputs():
        out = flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))
    ref = reference(q, k, v, True)
    assert (out.double() - ref).abs().max().item() < 3e-2
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("schedule,seed,at_issue", SCHEDULE_CASES, ids=lambda x: str(x))
def test_other_schedules_extras_kernel(schedule, seed, at_issue):
    """The extras kernel (float mask, with the tile pre-pass and __syncthreads_or) and dropout."""
    q, k, v = (torch.randn(2, 2, n, 64, dtype=torch.float16, requires_grad=True) for n in (100, 130, 130))
    mask = torch.randn(100, 130)
    mask[:, 64:] = float("-inf")  # a tile the mask removes entirely
    with emulated_cuda(schedule, seed=seed, copies_land_at_issue=at_issue), poison_outputs():
        out = flashattn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(torch.ones_like(out))
        dropped = flashattn_ext.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), dropout_p=0.3)
    assert (out.double() - reference(q, k, v, False, mask)).abs().max().item() < 3e-3
    assert torch.isfinite(dropped).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
