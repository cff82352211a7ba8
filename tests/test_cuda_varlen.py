"""The CUDA varlen kernels: flash_attn_varlen_func on CUDA tensors (under the host emulator: on CPU
tensors), one launch over every packed sequence, each CTA reading its sequence's rows through
cu_seqlens (select_sequence, csrc/attention_params.h).

Every result is compared with the per-sequence float64 reference (tests/reference.py's
reference_varlen), within 2x the error of the same math in the inputs' dtype plus 1e-4
(cuda_testing.assert_close); inputs are fresh random numbers and outputs are poisoned with NaN
before the kernels run. Sequence lengths include 0 (no queries, no keys) and single rows.
"""

import pytest
import torch

import cuda_testing as ct
import flashattn_ext
from cuda_testing import assert_close, rand
from flashattn_ext.testing import dropout_mask, poison_outputs
from reference import reference_varlen

pytestmark = pytest.mark.usefixtures("cuda_device")
LOW = [torch.float16, torch.bfloat16]
LENS_Q = [5, 0, 37, 1, 70, 9]
LENS_K = [8, 6, 37, 0, 130, 3]


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=ct.DEV)


def varlen(q, k, v, lens_q, lens_k, **kw):
    return flashattn_ext.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q, default=0),
                                                max(lens_k, default=0), return_attn_probs=True, **kw)


def packed(lens_q, lens_k, heads, heads_k, head_dim, head_dim_v, dtype):
    return (rand(sum(lens_q), heads, head_dim, dtype=dtype), rand(sum(lens_k), heads_k, head_dim, dtype=dtype),
            rand(sum(lens_k), heads_k, head_dim_v, dtype=dtype))


def ref_kwargs(kw):
    return dict(scale=kw.get("softmax_scale"), causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                softcap=kw.get("softcap", 0.0))


def check_varlen(name, q, k, v, lens_q, lens_k, *, alibi=None, keeps=None, check_grad=True, **kw):
    """Forward (out, lse) and backward against the per-sequence reference; returns (out, lse, rng_state)."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with poison_outputs():
        out, lse, rng_state = varlen(*leaves, lens_q, lens_k, alibi_slopes=alibi, **kw)
    assert out.shape == (q.shape[0], q.shape[1], v.shape[2]) and lse.shape == (q.shape[1], q.shape[0])
    p = kw.get("dropout_p", 0.0)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, ref_lse = reference_varlen(*leaves64, lens_q, lens_k, alibi=alibi, keeps=keeps, dropout_p=p, **ref_kwargs(kw))
    leaves_low = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    base, _ = reference_varlen(*leaves_low, lens_q, lens_k, alibi=alibi, keeps=keeps, dropout_p=p, dtype=q.dtype,
                               **ref_kwargs(kw))
    assert_close(f"{name} out", out.detach(), ref.detach(), base.detach())
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse -inf pattern differs"
    lse_tol = 1e-6 if q.dtype == torch.float64 else (1e-4 if q.dtype == torch.float32 else 2e-2)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=lse_tol, rtol=0), f"{name}: lse"
    if check_grad:
        dout = rand(*out.shape, dtype=q.dtype)
        with poison_outputs():
            out.backward(dout)
        ref.backward(dout.double())
        base.backward(dout)
        for label, a, r, b in zip("qkv", leaves, leaves64, leaves_low):
            assert a.grad is not None, f"{name}: no gradient for {label}"
            assert_close(f"{name} d{label}", a.grad, r.grad, b.grad)
    return out, lse, rng_state


# --------------------------------------------------------------------------------------------
# Head-dim buckets, dtypes, options, heads


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256, 40, 72])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_buckets(dtype, head_dim, causal):
    q, k, v = packed(LENS_Q, LENS_K, 2, 2, head_dim, head_dim, dtype)
    check_varlen(f"d{head_dim}", q, k, v, LENS_Q, LENS_K, causal=causal)


@pytest.mark.parametrize("head_dim", [32, 96, 128, 192, 256])
def test_extras_kernels_per_bucket(head_dim):
    """The varlen extras tiles (kernel_configs.h TraitsVarlenExtras: other key blocks than the
    dense ones) with softcap and 2-D ALiBi."""
    q, k, v = packed(LENS_Q, LENS_K, 2, 2, head_dim, head_dim, torch.float16)
    alibi = torch.rand(len(LENS_Q), 2, device=ct.DEV) * 0.5
    check_varlen(f"extras d{head_dim}", q, k, v, LENS_Q, LENS_K, alibi=alibi, softcap=3.0, causal=True)


OPTIONS = {
    "window": dict(window_size=(5, 2)),
    "causal-window": dict(causal=True, window_size=(7, -1)),
    "softcap": dict(softcap=2.5),
    "alibi-2d-causal": dict(alibi="2d", causal=True),
    "alibi-1d": dict(alibi="1d"),
    "scale": dict(softmax_scale=0.3),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("heads", [(6, 2), (4, 1)], ids=["gqa", "mqa"])
def test_options_and_heads(options, heads):
    H, Hk = heads
    q, k, v = packed(LENS_Q, LENS_K, H, Hk, 64, 64, torch.bfloat16)
    options = dict(options)
    kind = options.pop("alibi", None)
    alibi = None
    if kind == "2d":
        alibi = torch.rand(len(LENS_Q), H, device=ct.DEV) * 0.5
    elif kind == "1d":
        alibi = torch.rand(H, device=ct.DEV) * 0.5
    check_varlen("options", q, k, v, LENS_Q, LENS_K, alibi=alibi, **options)


def test_value_head_dim_differs():
    q, k, v = packed(LENS_Q, LENS_K, 3, 3, 96, 40, torch.float16)
    check_varlen("dv40", q, k, v, LENS_Q, LENS_K, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("options", [dict(), dict(causal=True, window_size=(9, -1)), dict(softcap=3.0)],
                         ids=["plain", "causal-window", "softcap"])
def test_simt(dtype, options):
    """float32 / float64 run on the SIMT kernels."""
    q, k, v = packed(LENS_Q, LENS_K, 4, 2, 24, 16, dtype)
    check_varlen("simt", q, k, v, LENS_Q, LENS_K, **options)


def test_large_head_dim_low_precision_uses_simt():
    q, k, v = packed([3, 20, 0], [9, 20, 4], 2, 2, 320, 320, torch.bfloat16)
    check_varlen("d320", q, k, v, [3, 20, 0], [9, 20, 4], causal=True)


# --------------------------------------------------------------------------------------------
# Dropout: sequence b uses the forward's (seed, offset + b), as on the CPU


def sequence_keep_masks(q, k, lens_q, lens_k, rng_state, p):
    """The keep mask of each sequence: the dense mask of its rows under (seed, offset + b)."""
    keeps, sq, sk = [], 0, 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        seq_rng = rng_state.clone()
        seq_rng[1] += b
        keeps.append(dropout_mask(q[sq:sq + lq].transpose(0, 1), k[sk:sk + lk].transpose(0, 1), seq_rng, p))
        sq, sk = sq + lq, sk + lk
    return keeps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-simt"])
def test_dropout_matches_keep_masks(dtype):
    lens_q, lens_k, H, p = [9, 70, 4, 0, 33], [12, 70, 0, 5, 20], 2, 0.3
    q, k, v = packed(lens_q, lens_k, H, H, 64, 64, dtype)
    ops = torch.ops.flashattn_ext
    args = (cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    with poison_outputs():
        out, lse, rng = ops.varlen_fwd(q, k, v, *args, dropout_p=p, bottom_right=True)
    keeps = sequence_keep_masks(q, k, lens_q, lens_k, rng, p)
    kept = torch.cat([m.flatten() for m in keeps]).float().mean().item()
    assert 0.6 < kept < 0.8, f"kept fraction {kept}"
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = reference_varlen(*leaves64, lens_q, lens_k, keeps=keeps, dropout_p=p)
    leaves_low = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    base, _ = reference_varlen(*leaves_low, lens_q, lens_k, keeps=keeps, dropout_p=p, dtype=dtype)
    assert_close("dropout out", out, ref.detach(), base.detach())
    dout = rand(*out.shape, dtype=dtype)
    with poison_outputs():
        grads = ops.varlen_bwd(dout, q, k, v, out, lse, rng, *args, dropout_p=p, bottom_right=True)
    ref.backward(dout.double())
    base.backward(dout)
    for label, g, r, b in zip("qkv", grads, leaves64, leaves_low):
        assert_close(f"dropout d{label}", g, r.grad, b.grad)


def test_dropout_streams_of_consecutive_calls_differ():
    """A call with B sequences uses B Philox offsets: the next call's first sequence must not
    reuse the previous call's second one (the generator is advanced past all of them)."""
    lens = [40] * 6
    q, k, v = packed(lens, lens, 1, 1, 32, 32, torch.float16)
    args = (cu(lens), cu(lens), 40, 40)
    _, _, rng_a = torch.ops.flashattn_ext.varlen_fwd(q, k, v, *args, dropout_p=0.5, bottom_right=True)
    _, _, rng_b = torch.ops.flashattn_ext.varlen_fwd(q, k, v, *args, dropout_p=0.5, bottom_right=True)
    a = set(range(int(rng_a[1]), int(rng_a[1]) + len(lens))) if int(rng_a[0]) == int(rng_b[0]) else set()
    b = set(range(int(rng_b[1]), int(rng_b[1]) + len(lens)))
    assert not a & b, f"offsets overlap: {sorted(a & b)}"


# --------------------------------------------------------------------------------------------
# Against the dense path, determinism, empty inputs, layouts


def test_equal_lengths_match_dense_bitwise():
    """Equal lengths: the same tiles as the dense call with the same kernel (softcap takes the
    extras kernel in both; deterministic fixes the dQ order), so out, lse and grads are equal."""
    B, L, H, D = 3, 70, 2, 64
    q, k, v = (rand(B, L, H, D, dtype=torch.float16) for _ in range(3))
    dout = rand(B, L, H, D, dtype=torch.float16)
    kw = dict(causal=True, softcap=4.0, deterministic=True)
    dense_leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    dense, dense_lse, _ = flashattn_ext.flash_attn_func(*dense_leaves, return_attn_probs=True, **kw)
    dense.backward(dout)
    flat = [t.detach().flatten(0, 1).requires_grad_(True) for t in (q, k, v)]
    out, lse, _ = varlen(*flat, [L] * B, [L] * B, **kw)
    out.backward(dout.flatten(0, 1))
    assert torch.equal(out.view(B, L, H, D), dense)
    assert torch.equal(lse.view(H, B, L).transpose(0, 1), dense_lse)
    for label, a, b in zip("qkv", flat, dense_leaves):
        assert torch.equal(a.grad.view(B, L, H, D), b.grad), f"d{label} differs from the dense path"


def test_deterministic_backward_is_bitwise_reproducible():
    q, k, v = packed(LENS_Q, LENS_K, 4, 2, 64, 64, torch.bfloat16)
    dout = rand(sum(LENS_Q), 4, 64, dtype=torch.bfloat16)
    results = []
    for _ in range(2 if ct.EMULATED else 10):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out, _, _ = varlen(*leaves, LENS_Q, LENS_K, causal=True, deterministic=True)
        out.backward(dout)
        results.append([t.grad for t in leaves])
    for g in results[1:]:
        for a, b in zip(results[0], g):
            assert torch.equal(a, b), "deterministic varlen backward differs between runs"
    check_varlen("deterministic", q, k, v, LENS_Q, LENS_K, causal=True, deterministic=True)


@pytest.mark.parametrize("lens", [([0, 0], [3, 4]), ([3, 4], [0, 0]), ([0, 0], [0, 0]), ([], []), ([2, 0, 5], [0, 0, 7])],
                         ids=["no-queries", "no-keys", "nothing", "no-sequences", "some-empty"])
def test_empty(lens):
    lens_q, lens_k = lens
    q, k, v = packed(lens_q, lens_k, 2, 2, 64, 64, torch.float16)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with poison_outputs():
        out, lse, _ = varlen(*leaves, lens_q, lens_k)
    assert out.shape == (sum(lens_q), 2, 64) and lse.shape == (2, sum(lens_q))
    ref, ref_lse = reference_varlen(*[t.double() for t in (q, k, v)], lens_q, lens_k)
    assert torch.equal(out.double(), ref) or (out.double() - ref).abs().max() < 1e-2
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    with poison_outputs():
        out.backward(torch.ones_like(out))
    for label, t in zip("qkv", leaves):
        assert t.grad is not None and not t.grad.isnan().any(), f"d{label}: NaN (unwritten?)"
    no_keys = {b for b, lk in enumerate(lens_k) if lk == 0}
    sq = 0
    for b, lq in enumerate(lens_q):
        if b in no_keys:
            assert (out[sq:sq + lq] == 0).all() and (lse[:, sq:sq + lq] == float("-inf")).all()
            assert (leaves[0].grad[sq:sq + lq] == 0).all()
        sq += lq


def test_packed_and_strided_inputs():
    """qkv packed (rows strided by 3 heads' worth) and a sliced, unaligned k: same as contiguous."""
    lens = [7, 30, 0, 13]
    qkv = rand(sum(lens), 3, 2, 64, dtype=torch.bfloat16)
    out = flashattn_ext.flash_attn_varlen_qkvpacked_func(qkv, cu(lens), max(lens), causal=True)
    q, k, v = (t.contiguous() for t in qkv.unbind(1))
    ref = flashattn_ext.flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=True)
    assert torch.equal(out, ref)
    wide = rand(sum(lens), 2, 67, dtype=torch.bfloat16)
    k_unaligned = wide[:, :, 1:65]  # rows start off the 16-byte grid: the unvectorized loads
    out2 = flashattn_ext.flash_attn_varlen_func(q, k_unaligned, v, cu(lens), cu(lens), max(lens), max(lens))
    ref2 = flashattn_ext.flash_attn_varlen_func(q, k_unaligned.contiguous(), v, cu(lens), cu(lens), max(lens),
                                                max(lens))
    assert torch.equal(out2, ref2)


def test_max_seqlen_smaller_than_a_sequence_is_refused():
    q, k, v = packed([5, 9], [5, 9], 2, 2, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="max_seqlen"):
        flashattn_ext.flash_attn_varlen_func(q, k, v, cu([5, 9]), cu([5, 9]), 4, 9)
