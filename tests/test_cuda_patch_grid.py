"""Under patch_sdpa(), every call torch's SDPA accepts on CUDA in fp16/bf16/fp32 runs in the
extension (no fallback) and matches the float64 reference within the CUDA rule (our error at
most 2x that of the same math in the call's dtype, plus 1e-4), output and gradients, over a grid
of masks x dropout x GQA x shapes x dtypes. Skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    import flashattn_ext
    from flashattn_ext.testing import dropout_mask, poison_outputs
    from cuda_testing import assert_close, rand, reference

SHAPES = [  # (B, H, Hk, L, S, E)
    (2, 4, 4, 128, 128, 64),
    (1, 8, 2, 257, 300, 128),
    (2, 4, 1, 64, 1000, 96),
    (1, 2, 2, 33, 17, 40),
]
MASKS = ["none", "causal", "bool_padding", "float_causal_padding", "float_2d", "bool_full"]


def make_mask(kind, B, H, L, S, dtype):
    if kind == "bool_padding":  # (B, 1, 1, S), a quarter of the keys padded
        m = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")
        m[..., S - S // 4:] = False
        return m
    if kind == "float_causal_padding":  # what Hugging Face transformers builds
        neg = torch.finfo(dtype).min
        causal = torch.ones(L, S, dtype=torch.bool, device="cuda").tril(S - L)
        pad = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")
        pad[0, ..., : S // 8] = False
        return torch.zeros(B, 1, L, S, dtype=dtype, device="cuda").masked_fill(~(causal & pad), neg)
    if kind == "float_2d":
        return rand(L, S, dtype=dtype)
    if kind == "bool_full":
        return torch.rand(B, H, L, S, device="cuda") > 0.2
    return None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_patched_sdpa_grid(shape, mask_kind, dropout_p, dtype):
    B, H, Hk, L, S, E = shape
    q, k, v = rand(B, H, L, E, dtype=dtype, requires_grad=True), rand(B, Hk, S, E, dtype=dtype, requires_grad=True), \
        rand(B, Hk, S, E, dtype=dtype, requires_grad=True)
    mask = make_mask(mask_kind, B, H, L, S, dtype)
    causal = mask_kind == "causal"
    gqa = Hk != H
    grad_out = rand(B, H, L, E, dtype=dtype)
    seed = 1234
    with poison_outputs(), flashattn_ext.patch_sdpa() as patch:
        torch.manual_seed(seed)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                             enable_gqa=gqa)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    assert patch.calls == 1 and not patch.fallbacks, patch.fallbacks

    keep = None
    if dropout_p > 0:  # the same generator state gives the same Philox stream: recover the keep mask
        torch.manual_seed(seed)
        _, _, rng_state = torch.ops.flashattn_ext.fwd(q.detach(), k.detach(), v.detach(), mask, dropout_p=dropout_p,
                                                      window_right=0 if causal else -1)
        keep = dropout_mask(q, k, rng_state, dropout_p)
    kwargs = dict(attn_mask=mask, causal=causal, keep=keep, dropout_p=dropout_p)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(qd, kd, vd, **kwargs)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.double())
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base, _ = reference(qb, kb, vb, dtype=dtype, **kwargs)
    base_grads = torch.autograd.grad(base, (qb, kb, vb), grad_out)
    assert_close("out", out, ref, base)
    for name, a, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, base_grads):
        assert_close(name, a, r, b)


def test_head_dim_above_cuda_limit_is_a_clear_error_and_patch_falls_back():
    import warnings
    q = rand(1, 2, 16, 520, dtype=torch.float32)
    with pytest.raises(ValueError, match="head dims above 512 are not supported on CUDA"):
        flashattn_ext.scaled_dot_product_attention(q, q, q)
    with flashattn_ext.patch_sdpa() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = F.scaled_dot_product_attention(q, q, q)
    assert patch.fallbacks == {"head dim above 512 on CUDA": 1}
    assert torch.isfinite(out).all()
