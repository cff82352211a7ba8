import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import flashattn_ext  # noqa: E402, F401
from flashattn_ext.testing import poison_outputs  # noqa: E402

import cuda_testing  # noqa: E402

# Tolerances against the float64 reference, per dtype, relative to the reference's magnitude:
# |ours - ref| <= atol * max(1, max|ref|) elementwise-max. fp32 runs an approximate exp (20 ulp);
# bf16/fp16 round their inputs and P, dS (as tensor-core kernels do) and accumulate in fp32.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 5e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}


def scaled_err(x, ref):
    ref = ref.double()
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item() if ref.numel() else 0.0


def assert_close(x, ref, dtype, what="", baseline=None):
    """|x - ref| within TOL[dtype]; with a baseline (torch's own result in the same dtype) within
    max(TOL, 2 x the baseline's error), the flash-attn rule. The backward's delta = rowsum(dO * O)
    from the output rounded to fp16/bf16 (as FlashAttention, torch's flash kernels and ours all
    do) makes the dq error grow with |dO| |O| |K| past a fixed bound on some inputs (head dim 1)."""
    assert not torch.isnan(x).any(), f"{what}: NaN in result (an element left unwritten?)"
    err = scaled_err(x, ref)
    tol = TOL[dtype] if baseline is None else max(TOL[dtype], 2 * scaled_err(baseline, ref))
    assert err <= tol, f"{what}: error {err:.3e} > tolerance {tol:.1e} for {dtype}"


@pytest.fixture(autouse=True)
def _fresh_seed_and_poison(request):
    """Fresh random inputs per test (seeded by test name for reproducibility); outputs poisoned."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    with poison_outputs():
        yield


def rand(*shape, dtype=torch.float32, requires_grad=False, device="cpu"):
    t = torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)
    return t.requires_grad_(requires_grad)


def pytest_generate_tests(metafunc):
    """The CUDA test modules run every test on each CUDA device: the GPU, and the host emulator
    under each schedule (cuda_testing.device_params)."""
    if "device" in metafunc.fixturenames:  # device-agnostic tests: the CPU, and each CUDA device
        metafunc.parametrize("device", [pytest.param(("cpu", None), id="cpu")] + cuda_testing.device_params(("lockstep",)),
                             indirect=True)
    if "cuda_device" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("emulated_schedules")
        schedules = marker.args if marker else getattr(metafunc.module, "EMULATED_SCHEDULES",
                                                       cuda_testing.EMULATED_SCHEDULES)
        metafunc.parametrize("cuda_device", cuda_testing.device_params(schedules), indirect=True)


@pytest.fixture
def device(request):
    """The device a device-agnostic test makes its tensors on: "cpu" (the CPU kernels), "cuda"
    (a GPU) or "cpu" under the CUDA emulator (the CUDA kernels run on CPU tensors)."""
    if request.param[0] == "cpu":
        yield "cpu"
        return
    with cuda_testing.activate(request.param):
        yield cuda_testing.DEV


@pytest.fixture
def cuda_device(request):
    with cuda_testing.activate(request.param):
        yield cuda_testing.DEV
