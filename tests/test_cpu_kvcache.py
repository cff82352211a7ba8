"""flash_attn_with_kvcache against the float64 reference on the gathered cache: in-place append,
rotary (both layouts), paged == contiguous, cache_batch_idx, cache_leftpad, GQA/MQA packing,
split-KV counts, bad inputs."""

import pytest
import torch

import flashattn_ext
from conftest import TOL, assert_close, rand
from reference import reference_attention, reference_kvcache


def make_case(dtype, B=3, S=600, Hq=8, Hk=2, D=32, Sq=1, Sn=1):
    q = rand(B, Sq, Hq, D, dtype=dtype)
    k_cache, v_cache = rand(B, S, Hk, D, dtype=dtype), rand(B, S, Hk, D, dtype=dtype)
    k, v = (rand(B, Sn, Hk, D, dtype=dtype), rand(B, Sn, Hk, D, dtype=dtype)) if Sn else (None, None)
    cache_seqlens = torch.randint(0, S - Sn + 1, (B,), dtype=torch.int32)
    cache_seqlens[0] = S - Sn  # one batch fills its cache
    return q, k_cache, v_cache, k, v, cache_seqlens


OPTIONS = [dict(), dict(causal=True), dict(window_size=(40, 0)), dict(softcap=3.0), dict(alibi=True, causal=True),
           dict(softmax_scale=0.2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("Sq,Sn", [(1, 1), (4, 3), (2, 0)])
@pytest.mark.parametrize("options", OPTIONS)
def test_kvcache_matches_reference(dtype, heads, Sq, Sn, options):
    Hq, Hk = heads
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(dtype, Hq=Hq, Hk=Hk, Sq=Sq, Sn=Sn)
    options = dict(options)
    alibi = torch.rand(q.shape[0], Hq) * 0.3 if options.pop("alibi", False) else None
    exp_k, exp_v, ref, ref_lse = reference_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, alibi=alibi,
                                                   causal=options.get("causal", False),
                                                   window=options.get("window_size", (-1, -1)),
                                                   softcap=options.get("softcap", 0.0),
                                                   scale=options.get("softmax_scale"))
    out, lse = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                                     alibi_slopes=alibi, return_softmax_lse=True, **options)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    assert out.shape == q.shape and lse.shape == (q.shape[0], Hq, Sq)
    assert_close(out, ref, dtype, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 50 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [128, 88])
@pytest.mark.parametrize("group,Sq", [(1, 1), (2, 1), (3, 1), (5, 1), (6, 1), (7, 1), (4, 2), (20, 1), (12, 2), (16, 2),
                                      (32, 1)])
def test_direct_decode_row_tiles(dtype, D, group, Sq):
    """The direct decode kernel (group * Sq <= 32 rows per kv head): every row-tile size of the
    scores (4 or 2 rows, the last one or two rows alone) and of P V (up to 8), head dims with and
    without vector tails (88: partial fp32 vectors, and bf16 widened instead of the AVX512-BF16
    loops), bf16 scores from the packed keys (16 rows and more: 20, 24, 32), odd key counts per
    block, split-KV."""
    Hk = 2
    q, k_cache, v_cache, _, _, cache_seqlens = make_case(dtype, B=3, S=333, Hq=group * Hk, Hk=Hk, D=D, Sq=Sq, Sn=0)
    cache_seqlens[1] = 1
    _, _, ref, ref_lse = reference_kvcache(q, k_cache, v_cache, None, None, cache_seqlens, causal=True)
    finite = torch.isfinite(ref_lse)
    for splits in (1, 3):
        out, lse = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                         causal=True, num_splits=splits, return_softmax_lse=True)
        assert_close(out, ref, dtype, f"out, {splits} splits")
        assert torch.equal(finite, torch.isfinite(lse))
        assert (lse[finite].double() - ref_lse[finite]).abs().max() < 50 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_cache_rows_with_odd_stride(dtype):
    """MQA decode on caches whose rows are views with an odd element stride (each row of a wider
    tensor): bf16's packed-key scores read keys as element pairs and must not take them."""
    B, S, D = 2, 200, 128
    q = rand(B, 1, 32, D, dtype=dtype)
    k_cache, v_cache = rand(B, S, 1, D + 1, dtype=dtype)[..., :D], rand(B, S, 1, D + 1, dtype=dtype)[..., :D]
    assert k_cache.stride(1) % 2 == 1
    lens = torch.tensor([S, 77], dtype=torch.int32)
    _, _, ref, _ = reference_kvcache(q, k_cache, v_cache, None, None, lens)
    out = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    assert_close(out, ref, dtype, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(dtype, interleaved, causal):
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(dtype, Sq=3, Sn=3, D=32)
    rd = 16
    angles = torch.arange(700)[:, None] * (1.0 / 10000 ** (torch.arange(rd // 2) / (rd // 2)))[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    exp_k, exp_v, ref, _ = reference_kvcache(q, k_cache, v_cache, k, v, cache_seqlens,
                                             rotary=(cos, sin, interleaved), causal=causal)
    out = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                                cache_seqlens=cache_seqlens, causal=causal,
                                                rotary_interleaved=interleaved)
    # The rotated keys are rounded to the cache dtype once, by both.
    assert (k_cache.double() - exp_k.double()).abs().max() <= 2 * TOL[dtype] * exp_k.double().abs().max()
    assert torch.equal(v_cache, exp_v)
    assert_close(out, ref, dtype, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page", [16, 256])
def test_paged_equals_contiguous(dtype, page):
    B, S, Hk = 3, 512, 2
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(dtype, B=B, S=S, Hk=Hk, Sq=2, Sn=2)
    blocks_per_seq = S // page
    num_blocks = B * blocks_per_seq + 3
    perm = torch.randperm(num_blocks)[:B * blocks_per_seq]
    block_table = perm.view(B, blocks_per_seq).to(torch.int32)
    k_paged = rand(num_blocks, page, Hk, k_cache.shape[-1], dtype=dtype)
    v_paged = rand(num_blocks, page, Hk, v_cache.shape[-1], dtype=dtype)
    for b in range(B):
        for j in range(blocks_per_seq):
            k_paged[block_table[b, j]] = k_cache[b, j * page:(j + 1) * page]
            v_paged[block_table[b, j]] = v_cache[b, j * page:(j + 1) * page]
    ref = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)
    out = flashattn_ext.flash_attn_with_kvcache(q, k_paged, v_paged, k, v, cache_seqlens=cache_seqlens,
                                                block_table=block_table, causal=True)
    for b in range(B):
        for j in range(blocks_per_seq):
            assert torch.equal(k_paged[block_table[b, j]], k_cache[b, j * page:(j + 1) * page])
            assert torch.equal(v_paged[block_table[b, j]], v_cache[b, j * page:(j + 1) * page])
    if page >= 256:
        assert torch.equal(out, ref)  # the same tiles in the same order
    else:
        assert_close(out, ref.double(), dtype, "paged")


def test_cache_batch_idx_and_leftpad():
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(torch.float32, B=3, S=300)
    k_cache, v_cache = rand(5, 300, 2, 32), rand(5, 300, 2, 32)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    leftpad = torch.minimum(torch.tensor([7, 0, 50], dtype=torch.int32), cache_seqlens)
    exp_k, exp_v, ref, _ = reference_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=idx,
                                             leftpad=leftpad, causal=True)
    out = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                                cache_batch_idx=idx, cache_leftpad=leftpad, causal=True)
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    assert_close(out, ref, torch.float32, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_splits_agree(dtype):
    q, k_cache, v_cache, _, _, cache_seqlens = make_case(dtype, B=1, S=4000, Hq=8, Hk=1, Sn=0)
    cache_seqlens[0] = 3999
    outs = [flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, num_splits=n,
                                                  return_softmax_lse=True) for n in (1, 2, 3, 7, 16, 0)]
    for out, lse in outs[1:]:
        assert_close(out, outs[0][0].double(), dtype, "splits")
        assert (lse - outs[0][1]).abs().max() < 1e-5


def test_empty_cache_and_int_seqlens():
    q = rand(2, 1, 4, 16)
    k_cache, v_cache = rand(2, 10, 4, 16), rand(2, 10, 4, 16)
    out, lse = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, return_softmax_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache)  # no cache_seqlens: the whole cache
    ref, _ = reference_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2))
    assert_close(out, ref.transpose(1, 2), torch.float32)


def test_kvcache_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, kc, vc = torch.empty(2, 1, 8, 16), torch.empty(2, 20, 2, 16), torch.empty(2, 20, 2, 16)
        out, lse = torch.ops.flashattn_ext.fwd_kvcache(q, kc, vc, cache_seqlens=torch.zeros(2, dtype=torch.int32))
        assert out.shape == (2, 1, 8, 16) and lse.shape == (2, 8, 1)


def _bad(**change):
    a = dict(q=rand(2, 1, 4, 16), k_cache=rand(2, 10, 2, 16), v_cache=rand(2, 10, 2, 16), k=rand(2, 1, 2, 16),
             v=rand(2, 1, 2, 16), cache_seqlens=torch.tensor([3, 9], dtype=torch.int32))
    a.update(change)
    return a


@pytest.mark.parametrize("args,match", [
    (_bad(cache_seqlens=torch.tensor([3, 10], dtype=torch.int32)), "cache_seqlens\\[1\\] = 10 .*cache too short"),
    (_bad(cache_seqlens=torch.tensor([3, 9], dtype=torch.int64)), "cache_seqlens must be int32"),
    (_bad(cache_seqlens=torch.tensor([3], dtype=torch.int32)), "cache_seqlens must have shape \\(batch,\\)"),
    (_bad(cache_seqlens=None), "cache_seqlens is needed"),
    (_bad(v=None), "k and v must be given together"),
    (_bad(k=rand(2, 1, 3, 16)), "k and v must be \\(batch, seqlen_new, heads_k, headdim\\)"),
    (_bad(block_table=torch.tensor([[0], [5]], dtype=torch.int32)), "block_table entries must index"),
    (_bad(block_table=torch.tensor([[0], [1]], dtype=torch.int64)), "block_table must be int32"),
    (_bad(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), "cache_batch_idx entries must index"),
    (_bad(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)), "cache_leftpad\\[0\\] = 4"),
    (_bad(rotary_cos=torch.ones(20, 4)), "rotary_cos and rotary_sin must be given together"),
    (_bad(rotary_cos=torch.ones(20, 9), rotary_sin=torch.ones(20, 9)), "rotary_dim"),
    (_bad(rotary_cos=torch.ones(5, 4), rotary_sin=torch.ones(5, 4)), "fewer than the 10 needed"),
    (_bad(q=rand(2, 1, 3, 16)), "multiple of the number of key/value heads"),
    (_bad(q=rand(2, 4, 16)), "q must be \\(batch, seqlen_q, heads, headdim\\)"),
    (_bad(alibi_slopes=torch.ones(3)), "alibi_slopes must have shape"),
    (_bad(num_splits=-1), "num_splits must be >= 0"),
])
def test_kvcache_bad_inputs_name_the_argument(args, match):
    q, kc, vc = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    with pytest.raises((ValueError, TypeError), match=match):
        flashattn_ext.flash_attn_with_kvcache(q, kc, vc, **args)


def test_kvcache_under_compile_mutates_the_caches():
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(torch.float32, B=2, S=64, Hq=4, Hk=2, D=16)
    kc_eager, vc_eager = k_cache.clone(), v_cache.clone()
    ref = flashattn_ext.flash_attn_with_kvcache(q, kc_eager, vc_eager, k, v, cache_seqlens=cache_seqlens, causal=True)

    def step(q, kc, vc, k, v):
        return flashattn_ext.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cache_seqlens, causal=True)

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k_cache, v_cache, k, v)
    assert torch.equal(out, ref)
    assert torch.equal(k_cache, kc_eager) and torch.equal(v_cache, vc_eager)
