"""Forward and every gradient against the float64 reference over a grid of shapes, masks,
causal/GQA settings and dtypes (CPU)."""

import pytest
import torch

import flashattn_ext
from conftest import TOL, assert_close, rand
from reference import reference_attention

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (batch, q heads, kv heads, L, S, E, Ev)
SHAPES = [
    (2, 2, 2, 1, 1, 16, 16),        # single query, single key
    (1, 2, 2, 1, 37, 8, 8),         # L = 1
    (1, 2, 2, 37, 1, 8, 8),         # S = 1
    (2, 3, 3, 67, 131, 40, 24),     # odd sizes, L != S, E != Ev
    (1, 4, 2, 128, 128, 64, 64),    # GQA, block-aligned
    (2, 4, 1, 300, 257, 32, 48),    # MQA, L > S
    (1, 2, 2, 97, 530, 5, 3),       # tiny odd head dims, several key tiles
]

MASKS = ["none", "causal", "bool_full", "bool_2d", "bool_padding", "float_heads", "float_rows", "float_cols"]


def make_mask(kind, B, H, L, S, dtype):
    if kind == "bool_full":
        return torch.rand(B, H, L, S) > 0.3
    if kind == "bool_2d":
        return torch.rand(L, S) > 0.3
    if kind == "bool_padding":  # (B, 1, 1, S): a quarter of the keys padded
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[..., S - S // 4:] = False
        return m
    if kind == "float_heads":
        return rand(1, H, L, S, dtype=dtype)
    if kind == "float_rows":  # broadcast over keys
        return rand(B, 1, L, 1, dtype=dtype)
    if kind == "float_cols":  # float32 mask with a low-precision query (SDPA allows it)
        return rand(B, 1, 1, S, dtype=torch.float32)
    return None


def run_case(shape, mask_kind, dtype):
    B, H, Hk, L, S, E, Ev = shape
    q = rand(B, H, L, E, dtype=dtype, requires_grad=True)
    k = rand(B, Hk, S, E, dtype=dtype, requires_grad=True)
    v = rand(B, Hk, S, Ev, dtype=dtype, requires_grad=True)
    mask = make_mask(mask_kind, B, H, L, S, dtype)
    causal = mask_kind == "causal"
    out = flashattn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    assert out.shape == (B, H, L, Ev) and out.dtype == dtype
    grad_out = rand(B, H, L, Ev, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(qd, kd, vd, mask, causal=causal)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.double())
    base_out, base_grads = torch_flash_baseline(q, k, v, mask, causal, grad_out)
    assert_close(out, ref, dtype, "out", base_out)
    for name, g, r, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert g.shape == r.shape and g.dtype == dtype
        assert_close(g, r, dtype, name, bg)


def torch_flash_baseline(q, k, v, mask, causal, grad_out):
    """torch's own CPU flash kernel on the same fp16/bf16 inputs (the baseline of the 2x rule),
    or Nones where the dtype is fp32/fp64 or torch's flash kernel refuses the case."""
    if q.dtype not in (torch.float16, torch.bfloat16) or mask is not None or q.shape[1] != k.shape[1]:
        return None, (None, None, None)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
    except RuntimeError:  # "No available kernel" (E != Ev, ...)
        return None, (None, None, None)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients(shape, mask_kind, dtype):
    run_case(shape, mask_kind, dtype)


@pytest.mark.parametrize("headdim", [1, 2, 3, 7, 64, 65, 127, 128, 129, 200, 256, 320, 512, 513])
def test_head_dims(headdim):
    """Head dims from 1 to beyond 512, forward and gradients (fp32 and bf16)."""
    for dtype in (torch.float32, torch.bfloat16):
        run_case((1, 2, 2, 45, 70, headdim, headdim), "causal", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_long_sequences_many_tiles(dtype):
    """Lengths spanning many query and key tiles, not multiples of any tile size."""
    run_case((1, 2, 1, 777, 1111, 64, 64), "causal", dtype)
    run_case((1, 1, 1, 1111, 777, 32, 32), "bool_padding", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lse_matches_reference(dtype):
    B, H, L, S, E = 2, 3, 50, 90, 32
    q, k, v = rand(B, H, L, E, dtype=dtype), rand(B, H, S, E, dtype=dtype), rand(B, H, S, E, dtype=dtype)
    mask = torch.rand(B, 1, L, S) > 0.5
    mask[0, 0, 3] = False  # one fully masked row
    out, lse, _ = torch.ops.flashattn_ext.fwd(q, k, v, mask)
    _, ref_lse = reference_attention(q, k, v, mask)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, L)
    assert torch.isneginf(lse[0, :, 3]).all()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 50 * TOL[dtype]


def test_scale_argument():
    q, k, v = rand(2, 2, 33, 16), rand(2, 2, 40, 16), rand(2, 2, 40, 16)
    for scale in (0.0, 0.05, 1.0, 3.0, -0.5):
        out = flashattn_ext.scaled_dot_product_attention(q, k, v, scale=scale)
        ref, _ = reference_attention(q, k, v, scale=scale)
        assert_close(out, ref, torch.float32, f"scale={scale}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("causal", [False, True])
def test_error_within_twice_torch_math(dtype, causal):
    """The CUDA issue's rule, on CPU: error vs float64 at most 2x that of torch's math SDPA in the
    same dtype (plus a tiny absolute term), for the output and every gradient."""
    from conftest import scaled_err
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, Hk, L, S, E = 2, 4, 2, 200, 333, 64
    q, k, v = (rand(B, h, n, E, dtype=dtype, requires_grad=True) for h, n in ((H, L), (Hk, S), (Hk, S)))
    grad_out = rand(B, H, L, E, dtype=dtype)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(qd, kd, vd, causal=causal)
    ref_all = [ref] + list(torch.autograd.grad(ref, (qd, kd, vd), grad_out.double()))

    def errors(fn):
        out = fn(q, k, v, is_causal=causal, enable_gqa=True)
        return [scaled_err(x, r) for x, r in zip([out, *torch.autograd.grad(out, (q, k, v), grad_out)], ref_all)]

    ours = errors(flashattn_ext.scaled_dot_product_attention)
    with sdpa_kernel(SDPBackend.MATH):
        math = errors(torch.nn.functional.scaled_dot_product_attention)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, math):
        assert a <= 2 * b + 1e-6, f"{name}: ours {a:.2e} vs torch math {b:.2e}"
