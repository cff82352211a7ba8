"""A drop-in that never surprises (issue 12): errors torch users can catch, window arguments,
head dim 0, autocast, flash-attn's return convention, bounded per-shape memory."""

import sys

import pytest
import torch
import torch.nn.functional as F

import flashattn_ext
from conftest import assert_close, rand

sdpa = flashattn_ext.scaled_dot_product_attention
fwd = torch.ops.flashattn_ext.fwd


def qkv(B=2, H=3, L=5, S=7, E=8, Ev=8, dtype=torch.float32, requires_grad=False):
    ts = rand(B, H, L, E, dtype=dtype), rand(B, H, S, E, dtype=dtype), rand(B, H, S, Ev, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in ts]


# ---- errors: also instances of what torch raises (RuntimeError), messages naming the argument ----

@pytest.mark.parametrize("name,call,kind,text", [
    ("rank 1", lambda q, k, v: sdpa(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), ValueError, "at least 2 dims"),
    ("mixed dtypes", lambda q, k, v: sdpa(q, k.double(), v), TypeError, "same dtype"),
    ("integer dtype", lambda q, k, v: sdpa(q.long(), k.long(), v.long()), TypeError, "query must be float16"),
    ("head dim mismatch", lambda q, k, v: sdpa(q, k[..., :4], v), ValueError, "same head dim"),
    ("mask with is_causal", lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool),
                                                 is_causal=True), ValueError, "Explicit attn_mask"),
    ("batch mismatch", lambda q, k, v: sdpa(q, k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)),
     ValueError, "do not broadcast"),
    ("flash rank", lambda q, k, v: flashattn_ext.flash_attn_func(q[0], k[0], v[0]), ValueError, "4-D"),
    ("flash dtype", lambda q, k, v: flashattn_ext.flash_attn_func(q, k.double(), v), TypeError, "same dtype"),
])
def test_errors_are_also_runtime_errors(name, call, kind, text):
    q, k, v = qkv()
    with pytest.raises(RuntimeError) as info:
        call(q, k, v)
    assert isinstance(info.value, kind), type(info.value).__mro__
    assert text in str(info.value) and "flashattn_ext" in str(info.value)


@pytest.mark.parametrize("window,kind,text", [
    ((3,), ValueError, "pair"), (5, TypeError, "window_size"), ((1, 2, 3), ValueError, "3 values"),
    ((1.7, 2.2), TypeError, "two ints"), (("a", 1), TypeError, "two ints"), ((True, 1), TypeError, "two ints"),
])
@pytest.mark.parametrize("api", ["sdpa", "flash"])
def test_window_size_is_validated(window, kind, text, api):
    q, k, v = qkv()
    with pytest.raises(kind, match="window_size") as info:
        if api == "sdpa":
            sdpa(q, k, v, window_size=window)
        else:
            flashattn_ext.flash_attn_func(q, k, v, window_size=window)
    assert text in str(info.value)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("huge", [sys.maxsize, 2 ** 70, (1 << 63) - 1, 10 ** 12])
def test_huge_windows_are_unbounded(huge):
    q, k, v = qkv(L=9, S=9)
    ref = sdpa(q, k, v)
    for window in [(-1, huge), (huge, -1), (huge, huge)]:
        assert torch.equal(sdpa(q, k, v, window_size=window), ref), window
        assert torch.equal(flashattn_ext.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         window_size=window).transpose(1, 2), ref), window
    causal = sdpa(q, k, v, is_causal=True)
    assert torch.equal(sdpa(q, k, v, is_causal=True, window_size=(huge, huge)), causal)
    # the op itself clamps too (direct callers)
    out, _, _ = fwd(q, k, v, window_left=(1 << 63) - 1, window_right=(1 << 63) - 1)
    assert torch.equal(out, ref)


def test_list_and_nested_query_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="query must be a torch.Tensor, got list"):
        sdpa(q.tolist(), k, v)
    with pytest.raises(TypeError, match="value must be a torch.Tensor"):
        sdpa(q, k, None)
    nested = torch.nested.nested_tensor([rand(3, 5, 8), rand(3, 6, 8)], layout=torch.jagged)
    with pytest.raises(TypeError, match="query is a nested"):
        sdpa(nested, nested, nested)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flashattn_ext.flash_attn_func([1.0], k, v)


def test_one_dim_attn_mask_broadcasts_like_sdpa():
    q, k, v = qkv(requires_grad=True)
    mask = rand(7).requires_grad_(True)
    out = sdpa(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    assert_close(out, ref, torch.float32)
    (g,) = torch.autograd.grad(out.sum(), mask)
    (g_ref,) = torch.autograd.grad(ref.sum(), mask)
    assert_close(g, g_ref, torch.float32)


def test_alibi_slopes_that_require_grad_raise():
    q, k, v = qkv()
    slopes = torch.rand(3, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes requires grad"):
        sdpa(q, k, v, alibi_slopes=slopes)
    sdpa(q, k, v, alibi_slopes=slopes.detach())  # detached: fine
    with torch.no_grad():
        sdpa(q, k, v, alibi_slopes=slopes)


@pytest.mark.parametrize("E,Ev", [(0, 8), (8, 0), (0, 0)])
@pytest.mark.parametrize("masked", [False, True])
def test_zero_head_dim_matches_torch(E, Ev, masked):
    q, k, v = qkv(E=E, Ev=Ev, dtype=torch.float64, requires_grad=True)
    mask = rand(5, 7, dtype=torch.float64) if masked else None
    out = sdpa(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    if Ev == 0 and not masked:
        assert out.numel() == 0
    if E == 0 and not masked and Ev:
        torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand_as(out))
    grads = torch.autograd.grad((out * 1.5).sum(), (q, k, v), allow_unused=True)
    grads_ref = torch.autograd.grad((ref * 1.5).sum(), (q, k, v), allow_unused=True)
    for g, gr in zip(grads, grads_ref):
        gr = torch.zeros_like(g) if gr is None else gr
        assert g.shape == gr.shape
        torch.testing.assert_close(g, gr)


def test_flash_attn_func_return_attn_probs():
    q, k, v = (t.transpose(1, 2) for t in qkv())
    out, lse, s_dmask = flashattn_ext.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert s_dmask is None
    out2, lse2 = flashattn_ext.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    # positional, as in flash-attn's signature
    out3, _, _ = flashattn_ext.flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, True)
    assert torch.equal(out3, out)


# ---- autocast: what torch's SDPA does (a lower-precision-fp op) ----

def _rope_like_inputs():
    q, k = rand(2, 4, 9, 16), rand(2, 4, 9, 16)           # fp32 after RoPE
    v = rand(2, 4, 9, 16).to(torch.bfloat16)              # bf16 from a linear under autocast
    return q, k, v


@pytest.mark.parametrize("entry", ["direct", "patch", "op"])
def test_autocast_casts_like_sdpa(entry):
    q, k, v = _rope_like_inputs()
    with torch.autocast("cpu", torch.bfloat16):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref_fp32 = F.scaled_dot_product_attention(q, k, v.float())
        if entry == "direct":
            out = sdpa(q, k, v, is_causal=True)
            out_fp32 = sdpa(q, k, v.float())
        elif entry == "patch":
            with flashattn_ext.patch_sdpa() as patch:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out_fp32 = F.scaled_dot_product_attention(q, k, v.float())
            assert patch.calls == 2 and not patch.fallbacks
        else:
            out = fwd(q, k, v, window_right=0)[0]
            out_fp32 = fwd(q, k, v.float())[0]
    assert ref.dtype == out.dtype == torch.bfloat16
    assert ref_fp32.dtype == out_fp32.dtype == torch.bfloat16
    assert_close(out, F.scaled_dot_product_attention(q.bfloat16().double(), k.bfloat16().double(),
                                                     v.double(), is_causal=True), torch.bfloat16)


def test_autocast_float_mask_is_cast_and_training_works():
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = rand(5, 7)
    with torch.autocast("cpu", torch.bfloat16):
        out = sdpa(q, k, v, attn_mask=mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == ref.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0
    # float64 stays float64 under autocast, as for torch
    q64 = rand(1, 1, 3, 4, dtype=torch.float64)
    with torch.autocast("cpu", torch.bfloat16):
        assert sdpa(q64, q64, q64).dtype == torch.float64


# ---- memory: no per-shape growth (micro-kernel configurations are bounded) ----

def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distinct_shapes_do_not_grow_memory(dtype):
    import random
    rng = random.Random(1)

    def step(L, S, E, Ev):
        q = torch.randn(1, 2, L, E, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 2, S, E, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 2, S, Ev, dtype=dtype, requires_grad=True)
        sdpa(q, k, v).sum().backward()

    for _ in range(30):  # warm-up: allocator pools, probes, the admitted micro-kernels
        step(rng.randint(1, 160), rng.randint(1, 160), rng.randint(1, 96), rng.randint(1, 96))
    before = _rss_mb()
    for _ in range(200):  # ~45 MB per 200 shapes (fp32) before the micro-kernel budget
        step(rng.randint(1, 160), rng.randint(1, 160), rng.randint(1, 96), rng.randint(1, 96))
    assert _rss_mb() - before < 6.0


# ---- semantics ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [1e9, 1e10, 3e11])
def test_huge_finite_scores_stay_finite(dtype, magnitude):
    torch.manual_seed(0)
    q = torch.randn(2, 2, 16, 8)
    k = torch.randn(2, 2, 33, 8)
    v = torch.randn(2, 2, 33, 8)
    scale = magnitude / 8  # scores ~ magnitude
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = sdpa(q, k, v, scale=scale)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    assert torch.isfinite(out).all()
    assert_close(out, ref, dtype)


# ---- patch_sdpa: torch's CausalBias masks, sdpa_kernel backend selection ----

@pytest.mark.parametrize("L,S", [(6, 6), (5, 9)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_patch_maps_causal_bias_masks(L, S, variant):
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    q, k, v = (t.requires_grad_() for t in (rand(2, 3, L, 8), rand(2, 3, S, 8), rand(2, 3, S, 8)))
    bias = make(L, S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    (gq_ref,) = torch.autograd.grad(ref.sum(), q)
    with flashattn_ext.patch_sdpa() as patch:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        (gq,) = torch.autograd.grad(out.sum(), q)
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    assert patch.calls == 1 and not patch.fallbacks
    assert_close(out, ref.double(), torch.float32)
    assert_close(gq, gq_ref.double(), torch.float32)


def test_patch_honours_sdpa_kernel_backend_selection():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = qkv()
    with flashattn_ext.patch_sdpa() as patch:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert patch.calls == 0 and sum(patch.fallbacks.values()) == 1
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # nothing torch can serve on CPU: torch raises
            with pytest.raises(RuntimeError):
                F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            F.scaled_dot_product_attention(q, k, v)
        assert patch.calls == 1
        F.scaled_dot_product_attention(q, k, v)
        assert patch.calls == 2
    assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True),
                 torch.float32)


def test_patch_dispatches_torch_function_overrides():
    class Logged(torch.Tensor):
        seen = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                cls.seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    q, k, v = qkv()
    with flashattn_ext.patch_sdpa():
        F.scaled_dot_product_attention(q.as_subclass(Logged), k, v)
    assert Logged.seen, "the subclass's __torch_function__ was not consulted"


def test_float64_mask_gradient_accumulates_in_float64():
    q, k, v = qkv(L=20, S=30, dtype=torch.float64, requires_grad=True)
    mask = rand(3, 20, 30, dtype=torch.float64).requires_grad_(True)  # broadcast over the batch: sums
    out = sdpa(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grad = rand(*out.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, mask, grad)
    (g_ref,) = torch.autograd.grad(ref, mask, grad)
    assert g.dtype == torch.float64
    assert (g - g_ref).abs().max().item() < 1e-12  # float32 accumulation: ~1e-7


@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_results_do_not_depend_on_the_thread_count(causal):
    torch.manual_seed(3)
    q = rand(1, 2, 300, 40, requires_grad=True)
    k = rand(1, 1, 1100, 40, requires_grad=True)  # 9 key blocks: 4, 8, 9 chunks by thread count before
    v = rand(1, 1, 1100, 24, requires_grad=True)
    grad = rand(1, 2, 300, 24)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = sdpa(q, k, v, is_causal=causal, enable_gqa=True, deterministic=True)
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_patch_warns_when_nothing_called_sdpa():
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    x = rand(2, 7, 32)
    with pytest.warns(UserWarning, match="set_fastpath_enabled"):
        with torch.no_grad(), flashattn_ext.patch_sdpa() as patch:
            layer(x)
    assert patch.calls == 0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with flashattn_ext.patch_sdpa(warn_if_unused=False):
            pass
        with flashattn_ext.patch_sdpa():
            sdpa_out = F.scaled_dot_product_attention(*qkv())
    assert sdpa_out.shape == (2, 3, 5, 8)


def test_patch_warns_when_checkpointed_calls_recompute_outside_it():
    from torch.utils.checkpoint import checkpoint
    q, k, v = qkv(requires_grad=True)
    attend = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    with pytest.warns(UserWarning, match="activation checkpointing"):
        with flashattn_ext.patch_sdpa() as patch:
            out = checkpoint(attend, q, k, v, use_reentrant=False)
    assert patch.checkpointed_calls == 1
    # the supported way: installed for the whole step, forward and backward
    handle = flashattn_ext.patch_sdpa()
    try:
        out = checkpoint(attend, q, k, v, use_reentrant=False)
        out.sum().backward()
        assert handle.calls == 2  # forward and its recompute
    finally:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle.undo()
    ref = F.scaled_dot_product_attention(q.detach().double(), k.detach().double(), v.detach().double(), is_causal=True)
    assert_close(out, ref, torch.float32)
