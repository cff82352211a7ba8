"""Dropout on CPU: seeded from torch's generator, the backward reuses the forward's keep mask, the
keep rate is right, and same seed gives the same result."""

import math

import pytest
import torch

import flashattn_ext
from conftest import assert_close, rand
from flashattn_ext.testing import dropout_mask
from reference import reference_attention

fwd = torch.ops.flashattn_ext.fwd


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setting", ["plain", "causal", "mask_gqa"])
def test_backward_uses_the_forwards_mask(dtype, setting):
    B, H, Hk, L, S, E, p = 2, 4, 2, 70, 90, 16, 0.3
    q = rand(B, H, L, E, dtype=dtype, requires_grad=True)
    k = rand(B, Hk, S, E, dtype=dtype, requires_grad=True)
    v = rand(B, Hk, S, E, dtype=dtype, requires_grad=True)
    mask = (torch.rand(B, 1, L, S) > 0.2) if setting == "mask_gqa" else None
    right = 0 if setting == "causal" else -1
    out, lse, rng_state = fwd(q, k, v, mask, dropout_p=p, window_right=right)
    keep = dropout_mask(q, k, rng_state, p)
    assert keep.shape == (B, H, L, S) and keep.dtype == torch.bool
    grad_out = rand(B, H, L, E, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(qd, kd, vd, mask, causal=setting == "causal", dropout_keep=keep, dropout_p=p)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.double())
    assert_close(out, ref, dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    q, k = rand(4, 8, 256, 8), rand(4, 8, 300, 8)
    _, _, rng_state = fwd(q, k, rand(4, 8, 300, 8), dropout_p=p)
    keep = dropout_mask(q, k, rng_state, p).double()
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # no structure along rows, columns or heads: every slice's rate is within 6 sigma
    for dim in (2, 3):
        rates = keep.mean(dim=tuple(d for d in range(4) if d != dim))
        m = n // rates.numel()
        assert (rates - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / m)
    # neighbours are independent: correlation of adjacent keys and adjacent groups of 4
    x = keep - keep.mean()
    for shift in (1, 4):
        corr = (x[..., shift:] * x[..., :-shift]).mean() / x.var()
        assert abs(corr.item()) < 6 / math.sqrt(n)


def test_same_seed_same_result_and_different_seed_differs():
    q, k, v = rand(2, 2, 50, 16), rand(2, 2, 60, 16), rand(2, 2, 60, 16)
    torch.manual_seed(1234)
    a = flashattn_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(1234)
    b = flashattn_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    c = flashattn_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dropout_is_unbiased():
    q, k, v = rand(1, 1, 8, 8), rand(1, 1, 16, 8), rand(1, 1, 16, 8)
    clean = flashattn_ext.scaled_dot_product_attention(q, k, v)
    runs = torch.stack([flashattn_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(3000)])
    err = (runs.mean(0) - clean).abs().max().item()
    spread = runs.std(0).max().item() / math.sqrt(runs.shape[0])
    assert err < 6 * spread


def test_dropout_extremes():
    q, k, v = (rand(1, 2, 10, 8, requires_grad=True) for _ in range(3))
    out = flashattn_ext.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert (out == 0).all()
    for g in torch.autograd.grad(out.sum(), (q, k, v)):
        assert (g == 0).all()
    a = flashattn_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    b = flashattn_ext.scaled_dot_product_attention(q, k, v)
    assert torch.equal(a, b)
