"""flash_attn_func: (B, S, H, D) layout, bottom-right causal, GQA by fewer K/V heads, windows,
softcap, ALiBi, lse."""

import pytest
import torch

import flashattn_ext
from conftest import TOL, assert_close, rand
from reference import reference_attention


def to_ref(x):
    return x.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,S", [(40, 40), (17, 53), (53, 17), (1, 30)])
@pytest.mark.parametrize("options", [
    dict(causal=True),
    dict(window_size=(8, 3)),
    dict(causal=True, window_size=(6, -1)),
    dict(softcap=3.0),
    dict(alibi=True),
    dict(softmax_scale=0.2, causal=True, softcap=1.5),
])
def test_flash_attn_func(dtype, L, S, options):
    B, H, Hk, D = 2, 6, 2, 24
    q, k, v = rand(B, L, H, D, dtype=dtype, requires_grad=True), rand(B, S, Hk, D, dtype=dtype, requires_grad=True), \
        rand(B, S, Hk, D, dtype=dtype, requires_grad=True)
    options = dict(options)
    alibi = torch.rand(B, H) * 0.5 if options.pop("alibi", False) else None
    out, lse = flashattn_ext.flash_attn_func(q, k, v, alibi_slopes=alibi, return_lse=True, **options)
    assert out.shape == (B, L, H, D) and lse.shape == (B, H, L) and lse.dtype == torch.float32
    assert out.is_contiguous()
    causal = options.get("causal", False)
    qd, kd, vd = (to_ref(t).detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference_attention(qd, kd, vd, scale=options.get("softmax_scale"), causal=causal, bottom_right=True,
                                       window=options.get("window_size", (-1, -1)), softcap=options.get("softcap", 0.0),
                                       alibi_slopes=alibi)
    assert_close(to_ref(out), ref, dtype, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 50 * TOL[dtype]
    g = rand(*out.shape, dtype=dtype)
    ours = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (qd, kd, vd), to_ref(g).double())
    for name, a, b in zip(("dq", "dk", "dv"), ours, refs):
        assert_close(to_ref(a), b, dtype, name)


def test_sdpa_keywords_window_softcap_alibi_top_left():
    q, k, v = (rand(2, 4, n, 16, requires_grad=True) for n in (30, 45, 45))
    alibi = torch.rand(4)
    out = flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(5, 0), softcap=4.0,
                                                      alibi_slopes=alibi)
    ref, _ = reference_attention(q, k, v, causal=True, window=(5, 0), softcap=4.0, alibi_slopes=alibi)
    assert_close(out, ref, torch.float32)
    g = rand(*out.shape)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.double())):
        assert_close(a, b, torch.float32)


def test_deterministic_flag_and_bitwise_repeatability():
    q, k, v = (rand(2, 4, 100, 32, requires_grad=True) for _ in range(3))
    results = []
    for _ in range(3):
        out = flashattn_ext.flash_attn_func(q, k, v, causal=True, deterministic=True)
        results.append(torch.autograd.grad(out.sum(), (q, k, v)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
