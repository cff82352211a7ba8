"""GPU tests of the CUDA kernels (tensor-core and SIMT paths), skipped without CUDA.

Every result is compared with a float64 reference. The tolerance rule: our error is at most twice
the error of torch's math SDPA in the same dtype (or, for features SDPA lacks, the same math
reference run in that dtype), plus 1e-4; measured both as max-abs and as relative Frobenius norm.
Inputs are fresh random numbers (never zeros) and every output buffer is poisoned with NaN
before the kernels run (flashattn_ext.testing.poison_outputs), so an unwritten element fails.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import cuda_testing as ct
import flashattn_ext
from cuda_testing import (assert_close, check_fwd_bwd, gpu_only, grads_of, rand, reference, sdpa,
                          torch_math_sdpa)
from flashattn_ext.testing import dropout_mask, poison_outputs

pytestmark = pytest.mark.usefixtures("cuda_device")
LOW = [torch.float16, torch.bfloat16]
HEAD_DIMS = ct.HEAD_DIM_BUCKETS
ODD_HEAD_DIMS = [8, 24, 40, 72, 80, 100, 160, 200, 250]


# --------------------------------------------------------------------------------------------
# Build and routing


def test_build_info_has_cuda():
    gpu_only()
    info = flashattn_ext.build_info()
    assert info["cuda"] is True
    assert "cuda" in info["devices"]
    assert info["cuda_archs"] and info["cuda_headdims"] and info["cuda_dtypes"]


# --------------------------------------------------------------------------------------------
# Forward and backward: dtypes x head-dim buckets x causal, against torch's math SDPA baseline


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_buckets(dtype, head_dim, causal):
    B, H, L, S = 2, 3, 197, 211
    q, k, v = rand(B, H, L, head_dim, dtype=dtype), rand(B, H, S, head_dim, dtype=dtype), rand(B, H, S, head_dim, dtype=dtype)
    check_fwd_bwd(q, k, v, ours=sdpa(is_causal=causal), ref_kwargs=dict(causal=causal),
                  baseline=torch_math_sdpa(is_causal=causal), name=f"d={head_dim} causal={causal}")


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
def test_odd_head_dims(dtype, head_dim):
    q, k, v = rand(1, 2, 77, head_dim, dtype=dtype), rand(1, 2, 90, head_dim, dtype=dtype), rand(1, 2, 90, head_dim, dtype=dtype)
    check_fwd_bwd(q, k, v, ours=sdpa(is_causal=True), ref_kwargs=dict(causal=True),
                  baseline=torch_math_sdpa(is_causal=True), name=f"d={head_dim}")


@pytest.mark.parametrize("dims", [(192, 128), (64, 32), (128, 64), (40, 72), (256, 128), (96, 200)])
def test_value_head_dim_differs(dims):
    E, Ev = dims
    q, k, v = rand(2, 2, 70, E), rand(2, 2, 83, E), rand(2, 2, 83, Ev)
    check_fwd_bwd(q, k, v, ours=sdpa(), ref_kwargs={}, baseline=torch_math_sdpa(), name=f"E={E} Ev={Ev}")


@pytest.mark.parametrize("L,S", [(1, 1), (1, 300), (300, 1), (17, 63), (64, 64), (65, 129), (128, 127),
                                 (257, 1000), (1000, 257)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths(L, S, causal):
    q, k, v = rand(2, 2, L, 64), rand(2, 2, S, 64), rand(2, 2, S, 64)
    check_fwd_bwd(q, k, v, ours=sdpa(is_causal=causal), ref_kwargs=dict(causal=causal),
                  name=f"L={L} S={S} causal={causal}")


@pytest.mark.parametrize("L,S", [(100, 300), (300, 100), (129, 64), (64, 129)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_causal_alignment(L, S, head_dim):
    """SDPA's is_causal aligns top-left, flash_attn_func's causal bottom-right."""
    q, k, v = rand(2, 4, L, head_dim), rand(2, 4, S, head_dim), rand(2, 4, S, head_dim)
    check_fwd_bwd(q, k, v, ours=sdpa(is_causal=True), ref_kwargs=dict(causal=True), name="top-left")

    def fa(q_, k_, v_):
        return flashattn_ext.flash_attn_func(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                             causal=True).transpose(1, 2)

    check_fwd_bwd(q, k, v, ours=fa, ref_kwargs=dict(causal=True, bottom_right=True), name="bottom-right")


@pytest.mark.parametrize("window", [(16, 0), (32, 32), (0, 0), (100, -1), (-1, 5)])
@pytest.mark.parametrize("bottom_right", [False, True])
def test_sliding_window(window, bottom_right):
    q, k, v = rand(1, 2, 250, 64), rand(1, 2, 300, 64), rand(1, 2, 300, 64)
    if bottom_right:
        def ours(q_, k_, v_):
            return flashattn_ext.flash_attn_func(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                 window_size=window).transpose(1, 2)
    else:
        ours = sdpa(window_size=window)
    check_fwd_bwd(q, k, v, ours=ours, ref_kwargs=dict(window=window, bottom_right=bottom_right),
                  name=f"window={window} br={bottom_right}")


def test_fully_masked_rows_give_zero():
    """Bottom-right causal with L > S: the first L - S query rows see no key. Their output,
    gradient and lse must be 0, 0 and -inf (never NaN)."""
    B, H, L, S, D = 2, 2, 200, 70, 64
    q, k, v = rand(B, L, H, D, requires_grad=True), rand(B, S, H, D, requires_grad=True), rand(B, S, H, D, requires_grad=True)
    with poison_outputs():
        out, lse = flashattn_ext.flash_attn_func(q, k, v, causal=True, return_lse=True)
    empty = L - S
    assert torch.all(out[:, :empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :empty]))
    assert torch.isfinite(lse[:, :, empty:]).all()
    dout = rand(*out.shape)
    with poison_outputs():
        out.backward(dout)
    assert torch.all(q.grad[:, :empty] == 0)
    assert not torch.isnan(q.grad).any() and not torch.isnan(k.grad).any() and not torch.isnan(v.grad).any()


def test_fully_masked_rows_bool_mask():
    B, H, L, S, D = 1, 2, 90, 130, 128
    q, k, v = rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D)
    mask = torch.rand(B, H, L, S, device=ct.DEV) > 0.3
    mask[:, :, 5] = False
    mask[:, :, 60:70] = False
    check_fwd_bwd(q, k, v, ours=sdpa(attn_mask=mask), ref_kwargs=dict(attn_mask=mask), name="bool mask rows")
    with poison_outputs():
        out = flashattn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.all(out[:, :, 5] == 0) and torch.all(out[:, :, 60:70] == 0)


def test_lse_matches_reference():
    q, k, v = rand(2, 100, 4, 64), rand(2, 150, 4, 64), rand(2, 150, 4, 64)
    with poison_outputs():
        _, lse = flashattn_ext.flash_attn_func(q, k, v, causal=True, return_lse=True)
    ref = reference(q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
                    causal=True, bottom_right=True)[1]
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 100)
    assert torch.allclose(lse, ref.float(), atol=2e-2, rtol=0)


# --------------------------------------------------------------------------------------------
# GQA / MQA, strides, > 2^31 elements


@pytest.mark.parametrize("heads_k", [1, 2, 4])
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_gqa(heads_k, dtype):
    q, k, v = rand(2, 8, 130, 64, dtype=dtype), rand(2, heads_k, 140, 64, dtype=dtype), rand(2, heads_k, 140, 64, dtype=dtype)
    check_fwd_bwd(q, k, v, ours=sdpa(enable_gqa=True, is_causal=True), ref_kwargs=dict(causal=True),
                  baseline=torch_math_sdpa(enable_gqa=True, is_causal=True), name=f"gqa Hk={heads_k}")


def test_gqa_flash_attn_func():
    q, k, v = rand(2, 120, 6, 128), rand(2, 120, 2, 128), rand(2, 120, 2, 128)

    def ours(q_, k_, v_):
        return flashattn_ext.flash_attn_func(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(1, 2)

    check_fwd_bwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ours=ours, ref_kwargs={}, name="fa gqa")


def test_strided_bshd_inputs():
    """(B, S, H, D).transpose(1, 2): non-contiguous head/row strides, read in place."""
    base = [rand(2, 150, 4, 64) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)
    assert not q.is_contiguous()
    check_fwd_bwd(q, k, v, ours=sdpa(is_causal=True), ref_kwargs=dict(causal=True), name="bshd")


def test_sliced_and_unaligned_inputs():
    """Views whose rows are not 16-byte aligned (odd column offset) take the element-wise
    load path; a sliced batch and a non-contiguous last dim (copied by the op layer) too."""
    big = rand(3, 2, 100, 72)
    q = big[:2, :, :, 3:67]            # row start 3 elements in: not 16-byte aligned
    k = rand(2, 2, 100, 128)[..., ::2]  # last-dim stride 2: the op layer copies
    v = rand(4, 2, 100, 64)[1:3]
    check_fwd_bwd(q, k, v, ours=sdpa(), ref_kwargs={}, name="unaligned")


@pytest.mark.slow
def test_indexing_past_2_31_elements():
    """A q/k/v view whose batch stride puts elements beyond 2^31: offsets must be 64-bit."""
    H, L, D = 2, 64, 64
    gpu_only()
    stride_b = 2**31 + 1024
    need = stride_b + 3 * H * L * D + 1024
    try:
        buf = torch.randn(need, device=ct.DEV, dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    views = [buf.as_strided((2, H, L, D), (stride_b, L * D, D, 1), storage_offset=i * H * L * D) for i in range(3)]
    q, k, v = (x.detach().clone() for x in views)  # contiguous copies for the reference
    with poison_outputs():
        out = flashattn_ext.scaled_dot_product_attention(*views)
    ref = reference(q.double(), k.double(), v.double())[0]
    base = reference(q, k, v, dtype=torch.bfloat16)[0]
    assert_close("2^31 out", out, ref, base)
    del buf


# --------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("head_dim,causal,heads_k", [(64, False, 4), (128, True, 2), (256, False, 1)])
def test_deterministic_backward_is_bitwise_reproducible(head_dim, causal, heads_k):
    # The emulator runs blocks one at a time (so any order is reproducible there); what it checks
    # is that the turn protocol never deadlocks and that the gradients are right: smaller, 2 runs.
    B, H, L, S = (1, 4, 150, 260) if ct.EMULATED else (2, 4, 333, 517)
    q = rand(B, H, L, head_dim, requires_grad=True)
    k, v = rand(B, heads_k, S, head_dim, requires_grad=True), rand(B, heads_k, S, head_dim, requires_grad=True)
    dout = rand(B, H, L, head_dim)
    results = []
    for _ in range(2 if ct.EMULATED else 10):
        _, g = grads_of(lambda a, b, c: flashattn_ext.scaled_dot_product_attention(
            a, b, c, is_causal=causal, enable_gqa=True, deterministic=True), [q, k, v], dout)
        results.append(g)
    for g in results[1:]:
        for a, b in zip(results[0], g):
            assert torch.equal(a, b), "deterministic backward differs between runs"
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference(*leaves64, causal=causal)[0].backward(dout.double())
    leaves_low = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    reference(*leaves_low, dtype=q.dtype, causal=causal)[0].backward(dout)
    for name, g, r, b in zip("qkv", results[0], leaves64, leaves_low):
        assert_close(f"deterministic d{name}", g, r.grad, b.grad)


def test_deterministic_follows_torch_flag():
    q, k, v = (rand(1, 2, 300, 64, requires_grad=True) for _ in range(3))
    dout = rand(1, 2, 300, 64)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [grads_of(lambda a, b, c: flashattn_ext.scaled_dot_product_attention(a, b, c), [q, k, v], dout)[1]
                for _ in range(5)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for g in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], g))


# --------------------------------------------------------------------------------------------
# fp32 / fp64 (SIMT path), head dims above 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("head_dim", [16, 64, 100, 256, 300])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_simt_float(dtype, head_dim, causal):
    q, k, v = rand(2, 2, 70, head_dim, dtype=dtype), rand(2, 2, 95, head_dim, dtype=dtype), rand(2, 2, 95, head_dim, dtype=dtype)
    if dtype == torch.float64:
        # The fp64 baseline is exact: the +1e-4 term (and fp32 lse) is the whole budget.
        check_fwd_bwd(q, k, v, ours=sdpa(is_causal=causal), ref_kwargs=dict(causal=causal), name="fp64")
    else:
        check_fwd_bwd(q, k, v, ours=sdpa(is_causal=causal), ref_kwargs=dict(causal=causal),
                      baseline=torch_math_sdpa(is_causal=causal), name="fp32")


@pytest.mark.parametrize("head_dim", [320, 512])
def test_large_head_dim_low_precision_uses_simt(head_dim):
    q, k, v = rand(1, 2, 60, head_dim), rand(1, 2, 80, head_dim), rand(1, 2, 80, head_dim)
    check_fwd_bwd(q, k, v, ours=sdpa(), ref_kwargs={}, name=f"d={head_dim}")


# --------------------------------------------------------------------------------------------
# Masks, dropout, ALiBi, softcap, block-sparse (the "extras" kernels)


@pytest.mark.parametrize("shape", [(2, 3, 90, 130), (2, 1, 90, 130), (90, 130), (1, 3, 1, 130)])
@pytest.mark.parametrize("kind", ["bool", "float", "half"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_attn_mask(shape, kind, head_dim):
    q, k, v = rand(2, 3, 90, head_dim), rand(2, 3, 130, head_dim), rand(2, 3, 130, head_dim)
    if kind == "bool":
        mask = torch.rand(*shape, device=ct.DEV) > 0.4
    else:
        mask = torch.randn(*shape, device=ct.DEV, dtype=torch.float32 if kind == "float" else torch.bfloat16)
    check_fwd_bwd(q, k, v, ours=sdpa(attn_mask=mask), ref_kwargs=dict(attn_mask=mask),
                  baseline=torch_math_sdpa(attn_mask=mask), name=f"mask {kind} {shape}")


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attn_mask_with_empty_tiles(kind, head_dim):
    """A causal mask given as attn_mask (as many models do) and a float mask with -inf blocks:
    the tiles it removes entirely are skipped, the others masked element by element."""
    L = S = 333
    q, k, v = rand(2, 2, L, head_dim), rand(2, 2, S, head_dim), rand(2, 2, S, head_dim)
    causal = torch.ones(L, S, dtype=torch.bool, device=ct.DEV).tril()
    if kind == "bool":
        mask = causal
    else:
        mask = torch.randn(L, S, device=ct.DEV).masked_fill(~causal, float("-inf"))
        mask[:, 200:] = float("-inf")
        mask[:, 0] = 0.0  # every row keeps a key
    check_fwd_bwd(q, k, v, ours=sdpa(attn_mask=mask), ref_kwargs=dict(attn_mask=mask),
                  baseline=torch_math_sdpa(attn_mask=mask), name=f"mask tiles {kind}")


@pytest.mark.parametrize("shape", [(2, 3, 90, 130), (90, 130), (2, 1, 1, 130)])
def test_attn_mask_gradient(shape):
    q, k, v = rand(2, 3, 90, 64), rand(2, 3, 130, 64), rand(2, 3, 130, 64)
    mask = torch.randn(*shape, device=ct.DEV, dtype=torch.float32, requires_grad=True)
    mask64 = mask.detach().double().requires_grad_(True)
    with poison_outputs():
        out = flashattn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dout = rand(*out.shape)
    with poison_outputs():
        out.backward(dout)
    ref = reference(q.double(), k.double(), v.double(), attn_mask=mask64)[0]
    ref.backward(dout.double())
    mask_low = mask.detach().clone().requires_grad_(True)
    reference(q, k, v, dtype=q.dtype, attn_mask=mask_low)[0].backward(dout)
    assert_close("dmask", mask.grad, mask64.grad, mask_low.grad)


@pytest.mark.parametrize("shape", [(2, 3, 20, 30), (3, 20, 30), (1, 1, 30)], ids=["full", "batch-bcast", "row-bcast"])
def test_float64_gradients_are_float64_exact(shape):
    """fp64 (the SIMT path): lse, delta and a float64 mask's gradient are kept in float64, broadcast
    mask elements included (a float32 lse or float32 atomics would leave ~1e-7 relative error)."""
    q, k, v = (rand(2, 3, n, 16, dtype=torch.float64, requires_grad=True) for n in (20, 30, 30))
    mask = rand(*shape, dtype=torch.float64, requires_grad=True)
    with poison_outputs():
        out = flashattn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dout = rand(*out.shape, dtype=torch.float64)
    with poison_outputs():
        grads = torch.autograd.grad(out, (q, k, v, mask), dout)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, mask)]
    refs = torch.autograd.grad(reference(*leaves[:3], attn_mask=leaves[3])[0], leaves, dout)
    assert grads[3].dtype == torch.float64 and grads[3].shape == mask.shape
    for name, g, ref in zip(("dq", "dk", "dv", "dmask"), grads, refs):
        err = (g - ref).abs().max().item()
        assert err < 1e-12 * max(1.0, ref.abs().max().item()), (name, err)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_keep_mask(head_dim, causal):
    p_drop = 0.2
    q, k, v = rand(2, 3, 150, head_dim), rand(2, 3, 170, head_dim), rand(2, 3, 170, head_dim)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with poison_outputs():
        out, lse, rng_state = torch.ops.flashattn_ext.fwd(*leaves, dropout_p=p_drop, window_left=-1,
                                                          window_right=0 if causal else -1)
    keep = dropout_mask(q, k, rng_state, p_drop)
    assert 0.7 < keep.float().mean().item() < 0.9
    ref = reference(q.double(), k.double(), v.double(), causal=causal, keep=keep, dropout_p=p_drop)[0]
    base = reference(q, k, v, dtype=q.dtype, causal=causal, keep=keep, dropout_p=p_drop)[0]
    assert_close("dropout out", out, ref, base)
    # Gradients through the autograd path with the same generator state.
    torch.manual_seed(1234)
    check_grad_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with poison_outputs():
        out2 = flashattn_ext.scaled_dot_product_attention(*check_grad_leaves, dropout_p=p_drop, is_causal=causal)
    assert not torch.isnan(out2).any()
    dout = rand(*out2.shape)
    with poison_outputs():
        out2.backward(dout)
    for t in check_grad_leaves:
        assert torch.isfinite(t.grad).all()


def test_dropout_gradients_against_reference():
    """Backward with dropout: the op's bwd regenerates the forward's keep mask from rng_state."""
    p_drop = 0.25
    q, k, v = rand(1, 2, 100, 64), rand(1, 2, 120, 64), rand(1, 2, 120, 64)
    with poison_outputs():
        out, lse, rng_state = torch.ops.flashattn_ext.fwd(q, k, v, dropout_p=p_drop)
    keep = dropout_mask(q, k, rng_state, p_drop)
    dout = rand(*out.shape)
    with poison_outputs():
        dq, dk, dv, _ = torch.ops.flashattn_ext.bwd(dout, q, k, v, out, lse, rng_state, dropout_p=p_drop)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference(*leaves64, keep=keep, dropout_p=p_drop)[0].backward(dout.double())
    leaves_low = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    reference(*leaves_low, dtype=q.dtype, keep=keep, dropout_p=p_drop)[0].backward(dout)
    for name, g, r, b in zip("qkv", (dq, dk, dv), leaves64, leaves_low):
        assert_close(f"dropout d{name}", g, r.grad, b.grad)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_alibi(head_dim):
    H = 4
    slopes = torch.rand(H, device=ct.DEV, dtype=torch.float32) * 0.5
    q, k, v = rand(2, H, 110, head_dim), rand(2, H, 150, head_dim), rand(2, H, 150, head_dim)
    check_fwd_bwd(q, k, v, ours=sdpa(alibi_slopes=slopes, is_causal=True),
                  ref_kwargs=dict(alibi=slopes, causal=True), name="alibi")


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_softcap(head_dim):
    q, k, v = rand(2, 2, 110, head_dim) * 3, rand(2, 2, 150, head_dim), rand(2, 2, 150, head_dim)
    check_fwd_bwd(q, k, v, ours=sdpa(softcap=5.0), ref_kwargs=dict(softcap=5.0), name="softcap")


@pytest.mark.parametrize("block", [(64, 64), (128, 128), (32, 96)])
def test_block_sparse(block):
    bm, bn = block
    B, H, L, S, D = 2, 2, 300, 280, 64
    q, k, v = rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D)
    nbm, nbn = -(-L // bm), -(-S // bn)
    blocks = torch.rand(B, H, nbm, nbn, device=ct.DEV) > 0.5
    blocks[0, 0, 0] = False  # a fully empty query block row
    elem = blocks.repeat_interleave(bm, 2).repeat_interleave(bn, 3)[:, :, :L, :S]
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with poison_outputs():
        out, lse, _ = torch.ops.flashattn_ext.fwd(q, k, v, block_mask=blocks, sparse_block_m=bm, sparse_block_n=bn)
    ref = reference(q.double(), k.double(), v.double(), attn_mask=elem)[0]
    base = reference(q, k, v, dtype=q.dtype, attn_mask=elem)[0]
    assert_close("block sparse", out, ref, base)
    assert torch.all(out[0, 0, :bm] == 0)
    del leaves


def test_block_sparse_with_element_masks():
    """int32 block mask: -1 empty, -2 full, e >= 0 partial with element mask e; forward and backward."""
    bm = bn = 64
    B, H, L, S, D = 1, 2, 200, 230, 64
    nbm, nbn = -(-L // bm), -(-S // bn)
    index = torch.randint(-2, 3, (B, H, nbm, nbn), device=ct.DEV, dtype=torch.int32)
    elem = torch.rand(3, bm, bn, device=ct.DEV) > 0.3
    full = torch.zeros(B, H, nbm * bm, nbn * bn, dtype=torch.bool, device=ct.DEV)
    for b in range(B):
        for h in range(H):
            for i in range(nbm):
                for j in range(nbn):
                    e = int(index[b, h, i, j])
                    blk = full[b, h, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                    blk[:] = False if e == -1 else (True if e == -2 else elem[e])
    visible = full[:, :, :L, :S]

    def ours(q_, k_, v_):
        return torch.ops.flashattn_ext.fwd(q_, k_, v_, block_mask=index, block_elem_masks=elem, sparse_block_m=bm,
                                           sparse_block_n=bn)[0]

    q, k, v = rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D)
    check_fwd_bwd(q, k, v, ours=ours, ref_kwargs=dict(attn_mask=visible), name="block elem masks",
                  check_grad=False)


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (64, 32), (32, 128), (96, 48), (200, 24)])
def test_block_sparse_small_and_uneven_blocks(block):
    """Sparse blocks smaller than the kernel tiles or not dividing them (the last key tile reaches
    past the last block column: tile_skipped must clamp to the sequence, not read past the block
    mask), forward and backward. The last block row is empty under the last 64-key tile (keys
    64..127, S = 91), so the block scan of that tile runs past the last block column unless clamped
    (run under compute-sanitizer with PYTORCH_NO_CUDA_MEMORY_CACHING=1 to see such a read)."""
    bm, bn = block
    B, H, L, S, D = 2, 2, 77, 91, 64
    nbm, nbn = -(-L // bm), -(-S // bn)
    blocks = torch.rand(B, H, nbm, nbn, device=ct.DEV) > 0.4
    blocks[:, :, -1, 64 // bn:] = False
    blocks[:, :, 0, 0] = True
    elem = blocks.repeat_interleave(bm, 2).repeat_interleave(bn, 3)[:, :, :L, :S]

    def ours(q_, k_, v_):
        return flashattn_ext.block_sparse_attention(q_, k_, v_, blocks, block_size=(bm, bn))

    q, k, v = rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D)
    check_fwd_bwd(q, k, v, ours=ours, ref_kwargs=dict(attn_mask=elem), name=f"sparse blocks {block}")


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 64)],
                         ids=["bf16-tensor-core", "fp16-tensor-core", "fp32-simt"])
def test_dropout_p_one_gives_zeros(dtype, head_dim):
    """dropout_p = 1 drops every probability: out 0 and gradients 0 (as on the CPU), never
    0 * 1 / (1 - p) = NaN; lse is the undropped one."""
    q, k, v = (rand(2, 2, n, head_dim, dtype=dtype, requires_grad=True) for n in (70, 90, 90))
    with poison_outputs():
        out, lse, _ = torch.ops.flashattn_ext.fwd(q, k, v, dropout_p=1.0)
    assert torch.all(out == 0), "dropout_p=1: output not zero"
    _, lse0, _ = torch.ops.flashattn_ext.fwd(q.detach(), k.detach(), v.detach())
    assert torch.allclose(lse, lse0, atol=1e-3, rtol=0)
    with poison_outputs():
        grads = torch.autograd.grad(out, (q, k, v), rand(*out.shape, dtype=dtype))
    for name, g in zip("qkv", grads):
        assert torch.all(g == 0), f"dropout_p=1: d{name} not zero"


@pytest.mark.parametrize("dtype,extra", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, None),
                                         (torch.bfloat16, "float_mask"), (torch.float32, "float_mask")],
                         ids=["fp32-simt", "fp64-simt", "bf16-plain", "bf16-extras", "fp32-simt-mask"])
def test_nan_query_row_propagates(dtype, extra):
    """A NaN in a query row makes that row's output NaN (as SDPA and the CPU path do), never a
    silent 0; every other row stays finite. (The SIMT forward's fmax dropped the NaN scores.)"""
    q, k, v = rand(1, 2, 40, 64, dtype=dtype), rand(1, 2, 300, 64, dtype=dtype), rand(1, 2, 300, 64, dtype=dtype)
    q[0, 1, 7, 3] = float("nan")
    kw = {}
    if extra == "float_mask":
        kw["attn_mask"] = torch.randn(40, 300, device=ct.DEV, dtype=torch.float32)
    out = flashattn_ext.scaled_dot_product_attention(q, k, v, **kw)
    assert out[0, 1, 7].isnan().all(), "NaN query row did not propagate"
    nan_rows = out.isnan().any(-1)
    nan_rows[0, 1, 7] = False
    assert not nan_rows.any(), "NaN leaked into other rows"


# --------------------------------------------------------------------------------------------
# Both forward K/V pipelines (the two-stage ring is the default where it fits, e.g. H100; the
# interleave elsewhere). FLASHATTN_CUDA_KV_STAGES is read once per process: run each in a child.

_PIPELINE_SCRIPT = r"""
import contextlib, math, sys, torch, flashattn_ext
from flashattn_ext.testing import emulated_cuda
device, schedule = sys.argv[1], sys.argv[2]
B, H, L, S = (2, 3, 300, 333) if device == "cuda" else (1, 2, 140, 150)
torch.manual_seed(0)
buckets = [int(x) for x in sys.argv[3].split(",")]
worst = 0.0
with emulated_cuda(schedule) if device == "cpu" else contextlib.nullcontext():
    for d in buckets:
        for causal in (False, True):
            q, k, v = (torch.randn(B, H, n, d, device=device, dtype=torch.bfloat16) for n in (L, S, S))
            out = flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
            s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
            if causal:
                s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=device).tril(), float("-inf"))
            ref = torch.softmax(s, -1) @ v.double()
            worst = max(worst, (out.double() - ref).abs().max().item())
print(worst)
sys.exit(0 if worst < 3e-2 else 1)
"""


@pytest.mark.parametrize("stages", ["1", "2"])
def test_forward_pipelines(stages, cuda_device, request):
    """FLASHATTN_CUDA_KV_STAGES is read once per process: each pipeline runs in a child."""
    import os
    import subprocess
    import sys

    schedule = request.node.callspec.params["cuda_device"][1] or "lockstep"
    env = dict(os.environ, FLASHATTN_CUDA_KV_STAGES=stages)
    buckets = ",".join(map(str, ct.HEAD_DIM_BUCKETS))
    res = subprocess.run([sys.executable, "-c", _PIPELINE_SCRIPT, cuda_device, schedule, buckets], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"kv_stages={stages}: max err {res.stdout.strip()} {res.stderr[-2000:]}"


# --------------------------------------------------------------------------------------------
# torch integration


def test_patch_sdpa_routes_cuda_calls():
    q, k, v = rand(2, 4, 128, 64), rand(2, 4, 128, 64), rand(2, 4, 128, 64)
    with flashattn_ext.patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = reference(q.double(), k.double(), v.double(), causal=True)[0]
    base = reference(q, k, v, dtype=q.dtype, causal=True)[0]
    assert_close("patched", out, ref, base)


def test_runs_on_current_stream_and_device_guard():
    gpu_only()
    q, k, v = rand(1, 2, 256, 64), rand(1, 2, 256, 64), rand(1, 2, 256, 64)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = flashattn_ext.scaled_dot_product_attention(q, k, v)
    s.synchronize()
    ref = flashattn_ext.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, ref)
