"""flash_attn_with_kvcache on the CUDA kernels (a GPU; under the host emulator CPU tensors): the
append in place, rotary, cache_batch_idx, cache_leftpad, a paged cache, GQA/MQA, causal / window /
softcap / ALiBi, against the float64 reference on the gathered cache (tests/reference.py's
reference_kvcache) within 2x the same math in the inputs' dtype (cuda_testing.assert_close).
Outputs are poisoned before the kernels run (the split-KV scratch too). The CUDA path is the
varlen forward over the cache's rows in one launch (ops_kvcache.cpp cuda_kvcache_attention):
split-KV with a combine kernel (num_splits, or the plan's count for 0), the query heads of a KV
group packed into one tile's rows where no mask depends on the row, a paged cache read in place
where its page size is a multiple of the kernel's key block and gathered first otherwise.
"""

import pytest
import torch

import cuda_testing as ct
import flashattn_ext
from cuda_testing import assert_close, rand
from flashattn_ext.testing import poison_outputs
from reference import reference_kvcache

pytestmark = pytest.mark.usefixtures("cuda_device")
# The kernels here are test_cuda_varlen.py's, which runs them under both schedules; one suffices,
# except for what only the cache path uses (split-KV and its combine kernel, pages read in place).
EMULATED_SCHEDULES = ("lockstep",)
BOTH_SCHEDULES = pytest.mark.emulated_schedules("lockstep", "warp")


def make_case(dtype, B=3, S=300, Hq=4, Hk=2, D=64, Sq=1, Sn=1, rows=None):
    q = rand(B, Sq, Hq, D, dtype=dtype)
    rows = B if rows is None else rows
    k_cache, v_cache = rand(rows, S, Hk, D, dtype=dtype), rand(rows, S, Hk, D, dtype=dtype)
    k, v = (rand(B, Sn, Hk, D, dtype=dtype), rand(B, Sn, Hk, D, dtype=dtype)) if Sn else (None, None)
    cache_seqlens = torch.randint(0, S - Sn + 1, (B,), dtype=torch.int32, device=ct.DEV)
    cache_seqlens[0] = S - Sn  # one batch fills its cache
    return q, k_cache, v_cache, k, v, cache_seqlens


def check(name, q, k_cache, v_cache, k, v, cache_seqlens, *, alibi=None, cache_batch_idx=None, leftpad=None,
          rotary=None, **options):
    """Runs the op on copies of the caches; checks the appended caches and (out, lse)."""
    ref_kw = dict(cache_batch_idx=cache_batch_idx, leftpad=leftpad, rotary=rotary, alibi=alibi,
                  causal=options.get("causal", False), window=options.get("window_size", (-1, -1)),
                  softcap=options.get("softcap", 0.0), scale=options.get("softmax_scale"))
    exp_k, exp_v, ref, ref_lse = reference_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, **ref_kw)
    _, _, base, _ = reference_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, dtype=q.dtype, **ref_kw)
    kc, vc = k_cache.clone(), v_cache.clone()
    rot = {} if rotary is None else dict(rotary_cos=rotary[0], rotary_sin=rotary[1], rotary_interleaved=rotary[2])
    with poison_outputs():
        out, lse = flashattn_ext.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cache_seqlens,
                                                         cache_batch_idx=cache_batch_idx, cache_leftpad=leftpad,
                                                         alibi_slopes=alibi, return_softmax_lse=True, **rot, **options)
    if rotary is None:
        assert torch.equal(kc, exp_k), f"{name}: k_cache after the append"
    else:  # the rotated keys are rounded to the cache dtype once, by both
        assert (kc.double() - exp_k.double()).abs().max() <= 2e-2 * exp_k.double().abs().max(), f"{name}: k_cache"
    assert torch.equal(vc, exp_v), f"{name}: v_cache after the append"
    assert out.shape == q.shape[:3] + (v_cache.shape[-1],) and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close(f"{name} out", out, ref, base)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse -inf pattern differs"
    tol = 1e-6 if q.dtype == torch.float64 else (1e-4 if q.dtype == torch.float32 else 2e-2)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=tol, rtol=0), f"{name}: lse"
    return out


OPTIONS = {"plain": dict(), "causal": dict(causal=True), "window": dict(window_size=(40, 0)),
           "softcap": dict(softcap=3.0), "alibi-causal": dict(alibi=True, causal=True), "scale": dict(softmax_scale=0.2)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32-simt"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("Sq,Sn", [(1, 1), (4, 3), (2, 0)])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_matches_reference(dtype, heads, Sq, Sn, options):
    Hq, Hk = heads
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(dtype, Hq=Hq, Hk=Hk, Sq=Sq, Sn=Sn)
    options = dict(options)
    alibi = torch.rand(q.shape[0], Hq, device=ct.DEV) * 0.3 if options.pop("alibi", False) else None
    check("kvcache", q, k_cache, v_cache, k, v, cache_seqlens, alibi=alibi, **options)


@pytest.mark.parametrize("head_dim", [32, 128, 256])
def test_head_dims(head_dim):
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(torch.bfloat16, D=head_dim, Sq=2, Sn=2, S=200)
    check(f"d{head_dim}", q, k_cache, v_cache, k, v, cache_seqlens, causal=True)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary(interleaved):
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(torch.bfloat16, Sq=3, Sn=3, D=64)
    rd = 32
    angles = torch.arange(400, device=ct.DEV)[:, None] * (
        1.0 / 10000 ** (torch.arange(rd // 2, device=ct.DEV) / (rd // 2)))[None]
    rotary = (angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16), interleaved)
    check("rotary", q, k_cache, v_cache, k, v, cache_seqlens, rotary=rotary, causal=True)


def test_cache_batch_idx_and_leftpad():
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(torch.float16, B=3, S=300, rows=5)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32, device=ct.DEV)
    leftpad = torch.minimum(torch.tensor([7, 0, 50], dtype=torch.int32, device=ct.DEV), cache_seqlens)
    check("batch_idx+leftpad", q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=idx, leftpad=leftpad,
          causal=True)


def test_strided_cache():
    """A cache that is a slice of a longer buffer (row stride != seqlen_cache x heads x dim)."""
    q, _, _, k, v, cache_seqlens = make_case(torch.bfloat16, S=250)
    big_k, big_v = rand(3, 300, 2, 64), rand(3, 300, 2, 64)
    check("strided", q, big_k[:, :250], big_v[:, :250], k, v, cache_seqlens, causal=True)


# Pages of 64 and 128 rows are read in place (the d = 64 kernels' key block is 64); 16 is gathered.
@BOTH_SCHEDULES
@pytest.mark.parametrize("page", [16, 64, 128])
@pytest.mark.parametrize("Sq,splits", [(2, 1), (1, 0), (1, 3)], ids=["causal-unsplit", "gqa-auto", "gqa-3"])
def test_paged_equals_contiguous(page, Sq, splits):
    B, S, Hk = 3, 256, 2
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(torch.bfloat16, B=B, S=S, Hk=Hk, Sq=Sq, Sn=Sq)
    blocks_per_seq = S // page
    num_blocks = B * blocks_per_seq + 3
    block_table = torch.randperm(num_blocks)[:B * blocks_per_seq].view(B, blocks_per_seq).to(torch.int32).to(ct.DEV)
    k_paged, v_paged = rand(num_blocks, page, Hk, 64), rand(num_blocks, page, Hk, 64)
    for b in range(B):
        for j in range(blocks_per_seq):
            k_paged[block_table[b, j]] = k_cache[b, j * page:(j + 1) * page]
            v_paged[block_table[b, j]] = v_cache[b, j * page:(j + 1) * page]
    with poison_outputs():
        ref = flashattn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True,
                                                    num_splits=splits)
        out = flashattn_ext.flash_attn_with_kvcache(q, k_paged, v_paged, k, v, cache_seqlens=cache_seqlens,
                                                    block_table=block_table, causal=True, num_splits=splits)
    for b in range(B):
        for j in range(blocks_per_seq):
            assert torch.equal(k_paged[block_table[b, j]], k_cache[b, j * page:(j + 1) * page])
            assert torch.equal(v_paged[block_table[b, j]], v_cache[b, j * page:(j + 1) * page])
    assert torch.equal(out, ref)  # the same rows, tiles and order once gathered


@BOTH_SCHEDULES
@pytest.mark.parametrize("splits", [1, 3])
def test_empty_cache_gives_zero_and_minus_inf(splits):
    q, k_cache, v_cache, _, _, _ = make_case(torch.bfloat16, Sn=0)
    seqlens = torch.tensor([0, 5, 0], dtype=torch.int32, device=ct.DEV)
    out = check("empty", q, k_cache, v_cache, None, None, seqlens, num_splits=splits)
    assert (out[0] == 0).all() and (out[2] == 0).all()


# Split-KV: every count (1, a few, more than the key blocks, the plan's 0) matches the reference
# and the unsplit result within rounding; with a window some splits see no key of a row (their
# lse is -inf and must weigh nothing). S = 520: 9 key blocks of 64 (d = 64), the last one partial.
SPLIT_CASES = {"gqa-decode": dict(Hq=8, Hk=2, Sq=1, Sn=1, options=dict(causal=True)),
               "mqa-softcap": dict(Hq=4, Hk=1, Sq=1, Sn=0, options=dict(softcap=5.0)),
               "mha-causal-4": dict(Hq=2, Hk=2, Sq=4, Sn=2, options=dict(causal=True)),
               "gqa-window": dict(Hq=4, Hk=2, Sq=3, Sn=3, options=dict(causal=True, window_size=(100, 0)))}


@BOTH_SCHEDULES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_splits_agree(dtype, case):
    case = dict(case)
    options = case.pop("options")
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(dtype, B=2, S=520, **case)
    cache_seqlens[1] = 130  # a short sequence: fewer key blocks than splits
    outs = {n: check(f"splits={n}", q, k_cache, v_cache, k, v, cache_seqlens, num_splits=n, **options)
            for n in (1, 2, 5, 0, 200)}
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for n, out in outs.items():
        assert (out.double() - outs[1].double()).abs().max() <= tol, f"num_splits={n} vs 1"


@BOTH_SCHEDULES
@pytest.mark.parametrize("head_dim", [32, 128])
def test_splits_head_dims(head_dim):
    """Other key blocks (128 at d = 32, 64 at d = 128) and a paged cache read in place with splits."""
    B, S, Hk, page = 2, 512, 2, 128
    q, k_cache, v_cache, k, v, cache_seqlens = make_case(torch.bfloat16, B=B, S=S, Hq=8, Hk=Hk, D=head_dim)
    check(f"d{head_dim} splits=3", q, k_cache, v_cache, k, v, cache_seqlens, num_splits=3, causal=True)
    block_table = torch.randperm(B * S // page).view(B, S // page).to(torch.int32).to(ct.DEV)
    k_paged = k_cache.view(B, S // page, page, Hk, head_dim).flatten(0, 1)[torch.argsort(block_table.flatten().cpu())]
    v_paged = v_cache.view(B, S // page, page, Hk, head_dim).flatten(0, 1)[torch.argsort(block_table.flatten().cpu())]
    with poison_outputs():
        ref = flashattn_ext.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v,
                                                    cache_seqlens=cache_seqlens, num_splits=3, causal=True)
        out = flashattn_ext.flash_attn_with_kvcache(q, k_paged, v_paged, k, v, cache_seqlens=cache_seqlens,
                                                    block_table=block_table, num_splits=3, causal=True)
    assert torch.equal(out, ref)
