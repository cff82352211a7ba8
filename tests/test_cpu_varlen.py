"""flash_attn_varlen_func and the packed variants against a float64 reference built from
per-sequence dense attention: forward, lse, backward; causal/window bottom-right per sequence,
GQA/MQA, softcap, ALiBi, dropout, empty sequences, bad inputs."""

import pytest
import torch

import flashattn_ext
from conftest import TOL, assert_close, rand
from reference import reference_varlen


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


CASES = [
    dict(),
    dict(causal=True),
    dict(window_size=(5, 2)),
    dict(causal=True, window_size=(7, -1)),
    dict(softcap=2.5),
    dict(alibi=True, causal=True),
    dict(softmax_scale=0.3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("options", CASES)
def test_varlen_matches_per_sequence_reference(dtype, heads, options):
    H, Hk = heads
    D, Dv = 24, 16
    lens_q = [5, 0, 37, 1, 64, 9]
    lens_k = [8, 6, 37, 0, 130, 3]
    q = rand(sum(lens_q), H, D, dtype=dtype, requires_grad=True)
    k = rand(sum(lens_k), Hk, D, dtype=dtype, requires_grad=True)
    v = rand(sum(lens_k), Hk, Dv, dtype=dtype, requires_grad=True)
    options = dict(options)
    alibi = torch.rand(len(lens_q), H) * 0.5 if options.pop("alibi", False) else None
    out, lse, probs = flashattn_ext.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                                           alibi_slopes=alibi, return_attn_probs=True, **options)
    assert out.shape == (sum(lens_q), H, Dv) and lse.shape == (H, sum(lens_q)) and probs is None
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference_varlen(qd, kd, vd, lens_q, lens_k, alibi=alibi, scale=options.get("softmax_scale"),
                                    causal=options.get("causal", False),
                                    window=options.get("window_size", (-1, -1)), softcap=options.get("softcap", 0.0))
    assert_close(out, ref, dtype, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 50 * TOL[dtype]
    g = rand(*out.shape, dtype=dtype)
    ours = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (qd, kd, vd), g.double(), allow_unused=True)
    for name, a, b in zip(("dq", "dk", "dv"), ours, refs):
        assert_close(a, b, dtype, name)


def test_varlen_equals_dense_for_equal_lengths():
    B, L, H, D = 3, 50, 4, 32
    q, k, v = (rand(B, L, H, D) for _ in range(3))
    dense = flashattn_ext.flash_attn_func(q, k, v, causal=True)
    lens = [L] * B
    packed = flashattn_ext.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu(lens),
                                                  cu(lens), L, L, causal=True)
    assert torch.equal(packed.view(B, L, H, D), dense)


def test_packed_variants():
    lens = [7, 20, 0, 13]
    T, H, D = sum(lens), 4, 16
    qkv = rand(T, 3, H, D, requires_grad=True)
    out = flashattn_ext.flash_attn_varlen_qkvpacked_func(qkv, cu(lens), max(lens), causal=True)
    q, k, v = qkv.unbind(1)
    ref = flashattn_ext.flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=True)
    assert torch.equal(out, ref)
    (dqkv,) = torch.autograd.grad(out.sum(), qkv)
    assert dqkv.shape == qkv.shape and not dqkv.isnan().any()

    q2 = rand(T, 4, D)
    kv = rand(T, 2, 2, D)
    out = flashattn_ext.flash_attn_varlen_kvpacked_func(q2, kv, cu(lens), cu(lens), max(lens), max(lens))
    assert torch.equal(out, flashattn_ext.flash_attn_varlen_func(q2, kv[:, 0], kv[:, 1], cu(lens), cu(lens),
                                                                 max(lens), max(lens)))

    qkv_d = rand(2, 30, 3, H, D, requires_grad=True)
    out, lse, none = flashattn_ext.flash_attn_qkvpacked_func(qkv_d, causal=True, return_attn_probs=True)
    assert none is None and lse.shape == (2, H, 30)
    assert torch.equal(out, flashattn_ext.flash_attn_func(*qkv_d.unbind(2), causal=True))
    q3, kv3 = rand(2, 11, 4, D), rand(2, 30, 2, 2, D)
    assert torch.equal(flashattn_ext.flash_attn_kvpacked_func(q3, kv3, causal=True),
                       flashattn_ext.flash_attn_func(q3, kv3[:, :, 0], kv3[:, :, 1], causal=True))


def test_varlen_dropout_matches_reference_with_its_mask():
    lens_q, lens_k = [9, 30, 4], [12, 30, 0]
    H, D, p = 2, 16, 0.3
    q = rand(sum(lens_q), H, D, requires_grad=True)
    k = rand(sum(lens_k), H, D, requires_grad=True)
    v = rand(sum(lens_k), H, D, requires_grad=True)
    out, lse, rng = torch.ops.flashattn_ext.varlen_fwd(q, k, v, cu(lens_q), cu(lens_k), 30, 30, dropout_p=p,
                                                       bottom_right=True)
    keeps = []
    sq = sk = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        seq_rng = rng.clone()
        seq_rng[1] += b  # sequence b draws from (seed, offset + b)
        keeps.append(flashattn_ext.testing.dropout_mask(q[sq:sq + lq].transpose(0, 1), k[sk:sk + lk].transpose(0, 1),
                                                        seq_rng, p))
        sq, sk = sq + lq, sk + lk
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_varlen(qd, kd, vd, lens_q, lens_k, keeps=keeps, dropout_p=p)
    assert_close(out, ref, torch.float32, "out")
    g = rand(*out.shape)
    ours = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (qd, kd, vd), g.double())
    for name, a, b in zip(("dq", "dk", "dv"), ours, refs):
        assert_close(a, b, torch.float32, name)


def test_varlen_deterministic_bitwise():
    lens = [100, 3, 250]
    q, k, v = (rand(sum(lens), 4, 32, requires_grad=True) for _ in range(3))
    runs = []
    for _ in range(2):
        out = flashattn_ext.flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), 250, 250, causal=True,
                                                   deterministic=True)
        runs.append(torch.autograd.grad(out.sum(), (q, k, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_varlen_fake_kernel_under_compile():
    lens = [5, 17]
    q, k, v = (rand(sum(lens), 2, 16) for _ in range(3))
    cq = cu(lens)

    def f(q, k, v):
        return flashattn_ext.flash_attn_varlen_func(q, k, v, cq, cq, 17, 17, causal=True)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), f(q, k, v))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out, lse, rng = torch.ops.flashattn_ext.varlen_fwd(fq, fk, fv, mode.from_tensor(cq), mode.from_tensor(cq),
                                                           17, 17)
        assert out.shape == (22, 2, 16) and lse.shape == (2, 22) and lse.dtype == torch.float32


@pytest.mark.parametrize("change,match", [
    (dict(cu_q=torch.tensor([0, 5, 22], dtype=torch.int64)), "cu_seqlens_q must be int32"),
    (dict(cu_q=torch.tensor([0, 15, 10, 22], dtype=torch.int32)), "cu_seqlens_q must be non-decreasing"),
    (dict(cu_q=torch.tensor([0, 5, 21], dtype=torch.int32)), "last entry of cu_seqlens_q"),
    (dict(cu_k=torch.tensor([1, 5, 22], dtype=torch.int32)), "cu_seqlens_k must start at 0"),
    (dict(cu_k=torch.tensor([0, 10, 12, 22], dtype=torch.int32)), "same length"),
    (dict(cu_q=torch.tensor([[0, 5, 22]], dtype=torch.int32)), "cu_seqlens_q must be a 1-D"),
    (dict(max_q=10), "max_seqlen_q \\(10\\) is smaller than sequence 1"),
    (dict(max_k=4), "max_seqlen_k \\(4\\) is smaller than sequence 0"),
    (dict(q=rand(2, 11, 2, 16)), "total_tokens, heads, headdim"),
    (dict(k=rand(22, 3, 16), v=rand(22, 3, 16)), "multiple of the number of key/value heads"),
    (dict(alibi=torch.rand(3, 2)), "alibi_slopes must have shape"),
    (dict(q=rand(22, 2, 8)), "same head dim"),
])
def test_varlen_bad_inputs_name_the_argument(change, match):
    a = dict(q=rand(22, 2, 16), k=rand(22, 2, 16), v=rand(22, 2, 16), cu_q=cu([5, 17]), cu_k=cu([5, 17]), max_q=17,
             max_k=17, alibi=None)
    a.update(change)
    with pytest.raises((ValueError, TypeError), match=match):  # TypeError for a wrong dtype
        flashattn_ext.flash_attn_varlen_func(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], a["max_q"], a["max_k"],
                                             alibi_slopes=a["alibi"])


def paged(x, lens, page, extra_blocks=3, seed=0):
    """x (total, H, D) packed per cu(lens) -> a paged cache (num_blocks, page, H, D) with pages in
    random order and a block_table (batch, max_pages); unused rows hold other random values."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [max(1, -(-n // page)) for n in lens]
    width = max(pages_per_seq)
    num_blocks = sum(pages_per_seq) + extra_blocks
    order = torch.randperm(num_blocks, generator=g)
    cache = torch.randn(num_blocks, page, *x.shape[1:], generator=g).to(x.dtype)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    start, used = 0, 0
    for b, n in enumerate(lens):
        for j in range(pages_per_seq[b]):
            blk = int(order[used])
            used += 1
            table[b, j] = blk
            rows = x[start + j * page:start + min(n, (j + 1) * page)]
            cache[blk, :rows.shape[0]] = rows.detach()
        start += n
    return cache, table


@pytest.mark.parametrize("page", [1, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_block_table_equals_packed(page, dtype):
    """flash_attn_varlen_func with k, v paged through block_table: the same out as the packed
    rows, and the gradients land in the pages the sequences use (zero elsewhere)."""
    lens_q, lens_k = [3, 0, 17, 1], [40, 5, 17, 0]
    H, Hk, D = 4, 2, 16
    q = rand(sum(lens_q), H, D, dtype=dtype, requires_grad=True)
    k, v = rand(sum(lens_k), Hk, D, dtype=dtype), rand(sum(lens_k), Hk, D, dtype=dtype)
    k_cache, table = paged(k, lens_k, page)
    v_cache, _ = paged(v, lens_k, page)
    k_cache.requires_grad_(), v_cache.requires_grad_()
    args = (cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    out = flashattn_ext.flash_attn_varlen_func(q, k_cache, v_cache, *args, causal=True, block_table=table)
    kp, vp = k.clone().requires_grad_(), v.clone().requires_grad_()
    ref = flashattn_ext.flash_attn_varlen_func(q, kp, vp, *args, causal=True)
    assert torch.equal(out, ref)
    g = rand(*out.shape, dtype=dtype)
    dk_cache, dv_cache = torch.autograd.grad(out, (k_cache, v_cache), g)
    dk, dv = torch.autograd.grad(ref, (kp, vp), g)
    dk_back, _ = paged(dk, lens_k, page)
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    start = 0
    for b, n in enumerate(lens_k):
        for pos in range(n):
            blk, row = int(table[b, pos // page]), pos % page
            used[blk, row] = True
            assert torch.equal(dk_cache[blk, row], dk[start + pos]) and torch.equal(dv_cache[blk, row], dv[start + pos])
        start += n
    assert (dk_cache[~used] == 0).all() and (dv_cache[~used] == 0).all()


@pytest.mark.parametrize("change,match", [
    (dict(table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)), "block_table entries must index k's"),
    (dict(table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int64)), "block_table must be int32"),
    (dict(table=torch.tensor([[0, 1]], dtype=torch.int32)), "block_table must have shape"),
    (dict(table=torch.tensor([[0], [2]], dtype=torch.int32)), "more than block_table's 1 pages"),
    (dict(k=rand(64, 2, 16)), "k must be a paged cache"),
])
def test_varlen_block_table_bad_inputs(change, match):
    a = dict(q=rand(8, 2, 16), k=rand(5, 16, 2, 16), table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    a.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        flashattn_ext.flash_attn_varlen_func(a["q"], a["k"], rand(5, 16, 2, 16), cu([4, 4]), cu([20, 30]), 4, 30,
                                             block_table=a["table"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_short_sequences_one_per_worker(dtype):
    # batch >= 4 x threads: sequences run one per worker (csrc/ops_varlen.cpp for_each_sequence).
    g = torch.Generator().manual_seed(0)
    lens_q = torch.randint(0, 40, (23,), generator=g).tolist()
    lens_k = [n + int(x) for n, x in zip(lens_q, torch.randint(0, 9, (23,), generator=g))]
    H, Hk, D = 4, 2, 16
    q = rand(sum(lens_q), H, D, dtype=dtype, requires_grad=True)
    k = rand(sum(lens_k), Hk, D, dtype=dtype, requires_grad=True)
    v = rand(sum(lens_k), Hk, D, dtype=dtype, requires_grad=True)
    out = flashattn_ext.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=True)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_varlen(qd, kd, vd, lens_q, lens_k, causal=True)
    assert_close(out, ref, dtype, "out")
    g_out = rand(*out.shape, dtype=dtype)
    ours = torch.autograd.grad(out, (q, k, v), g_out)
    refs = torch.autograd.grad(ref, (qd, kd, vd), g_out.double())
    for name, a, b in zip(("dq", "dk", "dv"), ours, refs):
        assert_close(a, b, dtype, name)


def test_autocast_casts_like_sdpa():
    """Under torch.autocast a varlen call casts floating q/k/v to the autocast dtype (as SDPA and
    the dense op do): fp32 q/k with a bf16 v run, and give bf16."""
    lens = [5, 0, 9]
    q, k = rand(sum(lens), 4, 16), rand(sum(lens), 2, 16)
    v = rand(sum(lens), 2, 16).to(torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        out = flashattn_ext.flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=True)
    assert out.dtype == torch.bfloat16
    same = flashattn_ext.flash_attn_varlen_func(q.bfloat16(), k.bfloat16(), v, cu(lens), cu(lens), max(lens),
                                                max(lens), causal=True)
    assert torch.equal(out, same)
