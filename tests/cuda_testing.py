"""Helpers shared by the CUDA test modules (test_cuda*.py), which run on every available CUDA
device: a GPU ("cuda"), and the host emulator of csrc/cuda/emulator, which executes the same
kernel sources on the CPU (CPU tensors, marked cuda_emulated) under several thread schedules.

The `cuda_device` fixture (conftest.py) selects one per test and sets DEV: "cuda" on the GPU,
"cpu" under the emulator. Helpers allocate on DEV at call time.
"""

import contextlib
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import flashattn_ext
import reference as reference_module
from flashattn_ext.testing import emulated_cuda, emulator_unavailable_reason, poison_outputs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda", "tools"))
import table as cuda_table  # noqa: E402  (the head-dim x dtype table of csrc/cuda/buckets.h)

sys.path.pop(0)
HEAD_DIM_BUCKETS = cuda_table.headdims()

DEV = "cuda"   # the device tensors are made on in the current test
EMULATED = False  # whether the current test runs on the emulator
# Each emulated test runs under these schedules (csrc/cuda/emulator/internal.h): round-robin over
# all threads, and one warp at a time to its next barrier (races on plain stores show only when
# warps skew).
EMULATED_SCHEDULES = ("lockstep", "warp")


def device_params(schedules=EMULATED_SCHEDULES):
    """pytest params for the cuda_device fixture: the GPU if there is one, the emulator per schedule."""
    params = []
    if torch.cuda.is_available():
        params.append(pytest.param(("cuda", None), marks=pytest.mark.cuda, id="gpu"))
    why = emulator_unavailable_reason()
    for s in schedules:
        marks = [pytest.mark.cuda_emulated]
        if why:
            marks.append(pytest.mark.skip(reason=f"CUDA emulator unavailable: {why}"))
        params.append(pytest.param(("emulated", s), marks=marks, id=f"emu-{s}"))
    return params


@contextlib.contextmanager
def activate(param, hopper=False):
    """One test on `param` ((kind, schedule) from device_params); DEV is "cuda" again afterwards.
    hopper: the emulated GPU runs the sm_90a kernels where they apply (a GPU does so by itself)."""
    global DEV, EMULATED
    kind, schedule = param
    EMULATED = kind == "emulated"
    DEV = "cpu" if EMULATED else "cuda"
    try:
        with emulated_cuda(schedule, hopper=hopper) if EMULATED else contextlib.nullcontext():
            yield
    finally:
        DEV, EMULATED = "cuda", False


def gpu_only():
    if EMULATED:
        pytest.skip("GPU-only behaviour (streams, graphs, device memory); not emulated")


# --------------------------------------------------------------------------------------------
# Reference


def band_mask(L, S, window_left=-1, window_right=-1, bottom_right=False, device=None):
    """Bool (L, S): True where query i sees key j under the band, on the current test's device."""
    return reference_module.band_mask(L, S, window_left, window_right, bottom_right, DEV if device is None else device)


def reference(q, k, v, *, dtype=torch.float64, alibi=None, keep=None, **kwargs):
    """tests/reference.py's reference_attention in `dtype` (float64: the reference; q's dtype:
    the baseline), with this module's names for ALiBi slopes and the dropout keep mask."""
    return reference_module.reference_attention(q, k, v, dtype=dtype, alibi_slopes=alibi, dropout_keep=keep, **kwargs)


def errors(x, ref):
    x, ref = x.double(), ref.double()
    diff = (x - ref).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    # Relative to the reference's norm; where the reference is exactly zero (a single key: the
    # gradients of q and k vanish) the absolute norm, so rounding noise is not divided by zero.
    ref_norm = ref.norm().item() if diff.numel() else 0.0
    rel = (diff.norm().item() / ref_norm if ref_norm > 0 else diff.norm().item()) if diff.numel() else 0.0
    return max_abs, rel


def assert_close(name, ours, ref, baseline, slack=2.0, atol=1e-4):
    """ours vs ref within slack x (baseline vs ref) + atol, max-abs and relative norm."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in output (unwritten element?)"
    a_ours, r_ours = errors(ours, ref)
    a_base, r_base = errors(baseline, ref)
    # Both ours and the baseline end by rounding to the result's dtype, up to half a unit in the
    # last place each: a baseline that happens to round its largest element well must not make
    # our rounding of it fail (bf16 dq of a row that sees 3 keys: ours 1.26 ulp, baseline 0.55).
    if ours.dtype in (torch.float16, torch.bfloat16) and ref.numel():
        atol_max = atol + 0.5 * torch.finfo(ours.dtype).eps * ref.abs().max().item()
    else:
        atol_max = atol
    assert a_ours <= slack * a_base + atol_max, \
        f"{name}: max abs err {a_ours:.3e} > {slack} x {a_base:.3e} + {atol_max:.2e}"
    assert r_ours <= slack * r_base + atol, f"{name}: rel err {r_ours:.3e} > {slack} x {r_base:.3e} + {atol}"


def rand(*shape, dtype=torch.bfloat16, requires_grad=False):
    # Fresh, non-zero values every call (a zero input would hide layout errors).
    x = torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.requires_grad_(requires_grad)


def grads_of(fn, inputs, dout):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [t.grad.detach().clone() for t in inputs]


def check_fwd_bwd(q, k, v, dout=None, *, ours, ref_kwargs, name="", check_grad=True, baseline=None):
    """Runs `ours(q, k, v)` (poisoned outputs), the fp64 reference and the same-dtype baseline,
    compares the outputs and the gradients."""
    # detach() keeps the exact strides and storage offset (clone() would make gapped views
    # contiguous and hide the strided / unaligned paths under test).
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with poison_outputs():
        out = ours(*leaves)
    dout = rand(*out.shape, dtype=q.dtype) if dout is None else dout
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out = reference(*leaves64, **ref_kwargs)[0]
    leaves_low = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if baseline is None:
        base_out = reference(*leaves_low, dtype=q.dtype, **ref_kwargs)[0]
    else:
        base_out = baseline(*leaves_low)
    assert_close(f"{name} out", out.detach(), ref_out.detach(), base_out.detach())
    if not check_grad:
        return
    with poison_outputs():
        out.backward(dout)
    ref_out.backward(dout.double())
    base_out.backward(dout)
    for label, a, r, bse in zip("qkv", leaves, leaves64, leaves_low):
        assert a.grad is not None, f"{name}: no gradient for {label}"
        assert_close(f"{name} d{label}", a.grad, r.grad, bse.grad)


def sdpa(**kw):
    return lambda q, k, v: flashattn_ext.scaled_dot_product_attention(q, k, v, **kw)


def torch_math_sdpa(**kw):
    """torch's math SDPA in the inputs' dtype: the baseline of the 2x rule. On a GPU it rounds
    scores, P and the gradients' products to fp16/bf16; on the CPU torch upcasts fp16/bf16 to
    fp32 inside its math backend, which would make the baseline the error of rounding the
    result alone. Under the emulator the baseline is therefore the same math run in the dtype as
    on a GPU (flash-attn's reference with upcast=False): reference(..., dtype=q.dtype)."""
    def run(q, k, v):
        if EMULATED and q.dtype in (torch.float16, torch.bfloat16):
            return reference(q, k, v, dtype=q.dtype, scale=kw.get("scale"), attn_mask=kw.get("attn_mask"),
                             causal=kw.get("is_causal", False))[0]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    return run


