"""Block-sparse attention and its builders against dense attention with the expanded element mask."""

import pytest
import torch

import flashattn_ext
from conftest import assert_close, rand
from flashattn_ext import sparse
from reference import reference_attention

L, S = 300, 437  # not multiples of any block size


def check(mask, dtype=torch.float32, B=2, H=2, E=32, attn_mask=None, is_causal=False, layout="bhsd", **kw):
    Lq, Sk = mask.seqlen_q, mask.seqlen_k
    shape_q, shape_k = ((B, H, Lq, E), (B, H, Sk, E)) if layout == "bhsd" else ((B, Lq, H, E), (B, Sk, H, E))
    q, k, v = rand(*shape_q, dtype=dtype, requires_grad=True), rand(*shape_k, dtype=dtype, requires_grad=True), \
        rand(*shape_k, dtype=dtype, requires_grad=True)
    out = flashattn_ext.block_sparse_attention(q, k, v, mask, attn_mask=attn_mask, is_causal=is_causal,
                                               layout=layout, **kw)
    t = (lambda x: x.transpose(1, 2)) if layout == "bshd" else (lambda x: x)
    qd, kd, vd = (t(x).detach().double().requires_grad_() for x in (q, k, v))
    dense = mask.to_dense()
    if attn_mask is not None:
        dense = dense & attn_mask
    ref, _ = reference_attention(qd, kd, vd, dense, causal=is_causal)
    assert_close(t(out), ref, dtype, "out")
    g = rand(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), t(g).double())
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(t(a), b, dtype, name)
    return out


BUILDERS = {
    "causal": lambda bs: sparse.causal_block_mask(L, S, bs),
    "causal_bottom_right": lambda bs: sparse.causal_block_mask(L, S, bs, bottom_right=True),
    "sliding_window": lambda bs: sparse.sliding_window_block_mask(L, S, (70, 0), bs),
    "window_both_sides": lambda bs: sparse.sliding_window_block_mask(L, S, (40, 90), bs),
    "strided": lambda bs: sparse.strided_block_mask(L, S, stride=3, local_blocks=2, block_size=bs),
    "strided_causal": lambda bs: sparse.strided_block_mask(L, S, stride=2, block_size=bs, causal=True),
    "butterfly": lambda bs: sparse.butterfly_block_mask(L, S, bs),
    "butterfly_causal": lambda bs: sparse.butterfly_block_mask(L, S, bs, causal=True),
    "mask_mod_documents": lambda bs: sparse.from_mask_mod(
        lambda b, h, q, kv: (q // 50 == kv // 73) | (kv < 5), None, None, L, S, bs),
    "mask_mod_per_head": lambda bs: sparse.from_mask_mod(
        lambda b, h, q, kv: (q - kv).abs() < 30 * (h + 1) + 7 * b, 2, 2, L, S, bs),
}


@pytest.mark.parametrize("block_size", [(64, 64), (32, 128), (128, 128)])
@pytest.mark.parametrize("builder", BUILDERS)
def test_builders_match_dense(builder, block_size):
    mask = BUILDERS[builder](block_size)
    assert mask.blocks.dtype == torch.int32 and mask.block_size == block_size
    check(mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    check(sparse.sliding_window_block_mask(L, S, (100, 0), (64, 64)), dtype=dtype)


def test_random_block_masks_and_bool_form():
    for density in (0.1, 0.5, 0.9):
        kept = torch.rand(2, 2, 5, 4) < density
        mask = sparse.BlockSparseMask.from_blocks(kept, L, S, (64, 128))
        assert abs(mask.density - kept.float().mean().item()) < 1e-6
        check(mask)
        # a plain bool tensor works the same
        q, k, v = rand(2, 2, L, 16), rand(2, 2, S, 16), rand(2, 2, S, 16)
        a = flashattn_ext.block_sparse_attention(q, k, v, kept, block_size=(64, 128))
        b = flashattn_ext.block_sparse_attention(q, k, v, mask)
        assert torch.equal(a, b)


def test_rows_with_no_allowed_key_are_zero():
    kept = torch.ones(1, 1, 5, 4, dtype=torch.bool)
    kept[0, 0, 2] = False  # query block 2 sees nothing
    mask = sparse.BlockSparseMask.from_blocks(kept, L, S, (64, 128))
    out = check(mask)
    assert (out[:, :, 128:192] == 0).all()


def test_combines_with_attn_mask_causal_and_layout():
    mask = sparse.strided_block_mask(L, S, stride=2, block_size=(64, 64))
    check(mask, attn_mask=torch.rand(2, 1, L, S) > 0.2)
    check(mask, is_causal=True)
    check(mask, layout="bshd")


def test_gqa_and_dropout_run():
    mask = sparse.causal_block_mask(L, L, (64, 64))
    q, k, v = rand(1, 4, L, 16), rand(1, 2, L, 16), rand(1, 2, L, 16)
    a = flashattn_ext.block_sparse_attention(q, k, v, mask, enable_gqa=True)
    ref = flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(a, ref.double(), torch.float32)
    torch.manual_seed(0)
    d1 = flashattn_ext.block_sparse_attention(q, k, v, mask, enable_gqa=True, dropout_p=0.3)
    torch.manual_seed(0)
    d2 = flashattn_ext.block_sparse_attention(q, k, v, mask, enable_gqa=True, dropout_p=0.3)
    assert torch.equal(d1, d2)


def test_flex_attention_block_mask_conversion():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def sliding(b, h, q, kv):
        return (q >= kv) & (q - kv < 100)

    bm = flex.create_block_mask(sliding, None, None, L, S, device="cpu")
    mask = sparse.from_flex_block_mask(bm)
    dense = sliding(0, 0, torch.arange(L)[:, None], torch.arange(S)[None, :])
    assert torch.equal(mask.to_dense()[0, 0], dense)
    check(mask)


def test_empty_blocks_are_never_read():
    """Keys and values of key blocks no query block keeps are NaN: had the kernels loaded or
    multiplied them (even with P = 0), NaN would reach the output or the gradients."""
    kept = torch.rand(1, 2, 5, 4) < 0.7
    kept[..., 1] = False
    kept[..., 3] = False
    mask = sparse.BlockSparseMask.from_blocks(kept, L, S, (64, 128))
    q = rand(1, 2, L, 16, requires_grad=True)
    k, v = rand(1, 2, S, 16), rand(1, 2, S, 16)
    for t in (k, v):
        t[:, :, 128:256] = float("nan")
        t[:, :, 384:] = float("nan")
    k.requires_grad_(), v.requires_grad_()
    out = flashattn_ext.block_sparse_attention(q, k, v, mask)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    kept_cols = torch.cat([torch.arange(0, 128), torch.arange(256, 384)])
    assert torch.isfinite(dk[:, :, kept_cols]).all() and torch.isfinite(dv[:, :, kept_cols]).all()
    assert (dk[:, :, 128:256] == 0).all() and (dv[:, :, 384:] == 0).all()


def test_bad_block_masks():
    q, k, v = rand(1, 2, L, 16), rand(1, 2, S, 16), rand(1, 2, S, 16)
    with pytest.raises(ValueError, match="block_mask of shape"):
        flashattn_ext.block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="was built for"):
        flashattn_ext.block_sparse_attention(q, k, v, sparse.causal_block_mask(L, L))
    good = sparse.causal_block_mask(L, S, (64, 64))
    with pytest.raises(ValueError, match="BlockSparseMask: blocks must be -1"):
        sparse.BlockSparseMask(good.blocks + 5, good.element_masks, good.block_size, L, S)
    with pytest.raises(TypeError, match="int32"):
        sparse.BlockSparseMask(good.blocks.long(), good.element_masks, good.block_size, L, S)
    # the raw op checks an int32 block_mask it has not seen
    with pytest.raises(ValueError, match="int32 block_mask entries"):
        torch.ops.flashattn_ext.fwd(q, k, v, block_mask=good.blocks + 5, sparse_block_m=64, sparse_block_n=64)


def test_block_mask_values_read_once_per_version():
    """BlockSparseMask reads its blocks' range when made; calls with it do not read the values
    again (a host sync on CUDA, illegal under graph capture) until the tensor is modified."""
    q, k, v = rand(1, 2, L, 16), rand(1, 2, S, 16), rand(1, 2, S, 16)
    mask = sparse.causal_block_mask(L, S, (64, 64))

    def ops_run():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            flashattn_ext.block_sparse_attention(q, k, v, mask)
        return {e.name for e in prof.events()}

    assert "aten::aminmax" not in ops_run()
    mask.blocks[0, 0, 0, 0] = 7  # in place: a new version, read (and refused) again
    with pytest.raises(ValueError, match="int32 block_mask entries"):
        flashattn_ext.block_sparse_attention(q, k, v, mask)
