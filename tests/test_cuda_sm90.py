"""The Hopper forward (csrc/cuda/fwd_sm90.cuh: TMA loads on mbarriers, wgmma, a producer
warpgroup and two consumer warpgroups) against the float64 reference, on an sm90 GPU with a 9.0a
build and under the host emulator with its Hopper instructions (emulated_cuda(hopper=True)).

The tolerance rule is test_cuda.py's: at most twice the error of the same math in the inputs'
dtype, plus 1e-4. Outputs are poisoned before each run. Each emulated case also checks that the
Hopper kernel ran (its blocks have 384 threads; the FA2 kernels' 128 or 256) or, for calls it does
not take, that it did not. Packed sequences (varlen) run on it too; a KV cache does not. An emulator pass is not a GPU pass.
"""

import pytest
import torch

import cuda_testing as ct
import flashattn_ext
from cuda_testing import assert_close, rand, reference
from flashattn_ext.testing import emulator_stats, emulator_unavailable_reason, poison_outputs
from reference import reference_varlen

LOW = [torch.float16, torch.bfloat16]
HOPPER_THREADS = 384


def _params():
    params = []
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        params.append(pytest.param(("cuda", None), marks=pytest.mark.cuda, id="gpu"))
    why = emulator_unavailable_reason()
    for s in ct.EMULATED_SCHEDULES:
        marks = [pytest.mark.cuda_emulated]
        if why:
            marks.append(pytest.mark.skip(reason=f"CUDA emulator unavailable: {why}"))
        params.append(pytest.param(("emulated", s), marks=marks, id=f"emu-{s}"))
    return params


@pytest.fixture(params=_params())
def hopper(request):
    with ct.activate(request.param, hopper=True):
        yield ct.DEV


def run(fn, expect_hopper=True):
    """fn() with poisoned outputs; under the emulator, checks which forward kernel ran."""
    before = emulator_stats() if ct.EMULATED else None
    with poison_outputs():
        out = fn()
    if ct.EMULATED:
        after = emulator_stats()
        blocks, threads = after["blocks"] - before["blocks"], after["threads"] - before["threads"]
        assert blocks > 0
        ran_hopper = threads == HOPPER_THREADS * blocks
        assert ran_hopper == expect_hopper, f"Hopper kernel ran: {ran_hopper}, expected {expect_hopper}"
    return out


def check(q, k, v, name, expect_hopper=True, **kw):
    """flash_attn_func layout (B, L, H, D): out and lse against the fp64 reference."""
    out, lse = run(lambda: flashattn_ext.flash_attn_func(q, k, v, return_lse=True, **kw), expect_hopper)
    tr = [t.transpose(1, 2) for t in (q, k, v)]
    ref_kw = dict(causal=kw.get("causal", False), bottom_right=True, window=kw.get("window_size", (-1, -1)))
    ref_out, ref_lse = reference(*[t.double() for t in tr], **ref_kw)
    base_out = reference(*tr, dtype=q.dtype, **ref_kw)[0]
    assert_close(f"{name} out", out.transpose(1, 2), ref_out, base_out)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse -inf pattern differs"
    assert torch.allclose(lse[finite], ref_lse[finite].float(), atol=2e-2, rtol=0), f"{name}: lse"


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_buckets(hopper, dtype, head_dim, causal):
    # L and S not multiples of the tiles (128 x 128, 128 x 64 for d = 256): partial boxes zero-fill.
    q, k, v = rand(1, 150, 2, head_dim, dtype=dtype), rand(1, 200, 2, head_dim, dtype=dtype), rand(1, 200, 2, head_dim, dtype=dtype)
    check(q, k, v, f"d={head_dim} causal={causal}", causal=causal)


@pytest.mark.parametrize("E,Ev", [(40, 40), (96, 96), (200, 200), (64, 128), (128, 72)])
def test_head_dims_inside_a_bucket(hopper, E, Ev):
    """Head dims below the bucket: the tensor maps zero-fill the columns past E / Ev. (Rows must
    be a multiple of 16 bytes for TMA, so E % 8 == 0 here; other head dims take the FA2 kernel.)"""
    q, k, v = rand(1, 70, 2, E), rand(1, 90, 2, E), rand(1, 90, 2, Ev)
    check(q, k, v, f"E={E} Ev={Ev}")


@pytest.mark.parametrize("L,S", [(1, 1), (1, 300), (300, 1), (129, 128), (100, 260)])
def test_lengths(hopper, L, S):
    q, k, v = rand(2, L, 2, 64), rand(2, S, 2, 64), rand(2, S, 2, 64)
    check(q, k, v, f"L={L} S={S} causal", causal=True)  # bottom-right: L > S leaves rows without keys


@pytest.mark.parametrize("heads_k", [1, 2])
def test_gqa(hopper, heads_k):
    q, k, v = rand(1, 100, 4, 128), rand(1, 140, heads_k, 128), rand(1, 140, heads_k, 128)
    check(q, k, v, f"GQA 4/{heads_k}", causal=True)


@pytest.mark.parametrize("window", [(32, 0), (20, 20), (-1, 8)])
def test_sliding_window(hopper, window):
    q, k, v = rand(1, 200, 2, 64), rand(1, 260, 2, 64), rand(1, 260, 2, 64)
    check(q, k, v, f"window={window}", window_size=window)


def test_sdpa_layout_and_scale(hopper):
    """(B, H, L, D) through scaled_dot_product_attention: other strides for the tensor maps."""
    q, k, v = rand(2, 2, 90, 64), rand(2, 2, 130, 64), rand(2, 2, 130, 64)
    out = run(lambda: flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))
    ref = reference(q.double(), k.double(), v.double(), causal=True, scale=0.3)[0]
    base = reference(q, k, v, dtype=q.dtype, causal=True, scale=0.3)[0]
    assert_close("sdpa layout", out, ref, base)


def test_calls_it_does_not_take_run_the_fa2_kernel(hopper):
    """An attn_mask (an extra) and a misaligned view go to the FA2 kernel, still exact."""
    q, k, v = rand(1, 2, 70, 64), rand(1, 2, 90, 64), rand(1, 2, 90, 64)
    mask = torch.rand(70, 90, device=q.device) > 0.3
    out = run(lambda: flashattn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask), expect_hopper=False)
    ref = reference(q.double(), k.double(), v.double(), attn_mask=mask)[0]
    assert_close("masked", out, ref, reference(q, k, v, dtype=q.dtype, attn_mask=mask)[0])
    q100, k100, v100 = rand(1, 2, 70, 100), rand(1, 2, 90, 100), rand(1, 2, 90, 100)  # 200-byte rows
    out = run(lambda: flashattn_ext.scaled_dot_product_attention(q100, k100, v100), expect_hopper=False)
    ref = reference(q100.double(), k100.double(), v100.double())[0]
    assert_close("d=100", out, ref, reference(q100, k100, v100, dtype=q.dtype)[0])
    wide = rand(1, 2, 70, 72)
    qs = wide[..., 1:65]  # rows of 144 bytes starting 2 bytes in: no 16-byte alignment for TMA
    out = run(lambda: flashattn_ext.scaled_dot_product_attention(qs, k, v), expect_hopper=False)
    ref = reference(qs.double(), k.double(), v.double())[0]
    assert_close("misaligned", out, ref, reference(qs, k, v, dtype=q.dtype)[0])


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=ct.DEV)


def check_varlen(lens_q, lens_k, heads=2, heads_k=2, d=64, name="varlen", expect_hopper=True, **kw):
    """Packed sequences through flash_attn_varlen_func: out and lse against the per-sequence fp64 reference."""
    q, k, v = rand(sum(lens_q), heads, d), rand(sum(lens_k), heads_k, d), rand(sum(lens_k), heads_k, d)
    out, lse, _ = run(lambda: flashattn_ext.flash_attn_varlen_func(
        q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), return_attn_probs=True, **kw), expect_hopper)
    ref_kw = dict(causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)))
    ref_out, ref_lse = reference_varlen(q.double(), k.double(), v.double(), lens_q, lens_k, **ref_kw)
    base = reference_varlen(q, k, v, lens_q, lens_k, dtype=q.dtype, **ref_kw)[0]
    assert_close(f"{name} out", out, ref_out, base)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse -inf pattern differs"
    assert torch.allclose(lse[finite], ref_lse[finite].float(), atol=2e-2, rtol=0), f"{name}: lse"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(hopper, causal):
    """Packed sequences on the Hopper kernel: boxes start at each sequence's first row and run into
    the next sequence (masked like a sequence end); empty sequences (no queries, no keys) and L != S
    per sequence, bottom-right aligned; the lengths not multiples of the 128-row tiles."""
    check_varlen([5, 170, 0, 33, 129], [9, 140, 4, 0, 260], name=f"varlen causal={causal}", causal=causal)


@pytest.mark.parametrize("d,heads,heads_k", [(128, 4, 1), (256, 2, 2)])
def test_varlen_head_dims_and_gqa(hopper, d, heads, heads_k):
    check_varlen([70, 1, 200], [90, 300, 64], heads=heads, heads_k=heads_k, d=d, name=f"varlen d={d} GQA {heads}/{heads_k}",
                 causal=True)


def test_varlen_window_and_persistent_ctas(hopper, monkeypatch):
    """A sliding window per sequence, with fewer CTAs than work tiles (tiles past a sequence's end
    are skipped without breaking the mbarrier phases or the ping-pong turns)."""
    monkeypatch.setenv("FLASHATTN_CUDA_SM90_GRID", "3")
    check_varlen([300, 20, 140, 0, 260], [300, 150, 140, 7, 200], name="varlen window, 3 CTAs", window_size=(40, 8))


def test_kvcache_runs_the_fa2_varlen_kernel(hopper):
    """A KV cache (seqused_k, split-KV) stays on the FA2 varlen kernels, still exact."""
    B, S, H, D = 2, 150, 2, 64
    q, kc, vc = rand(B, 3, H, D), rand(B, S, H, D), rand(B, S, H, D)
    lens = torch.tensor([150, 77], dtype=torch.int32, device=ct.DEV)
    out = run(lambda: flashattn_ext.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True),
              expect_hopper=False)
    ref = reference_varlen(q.flatten(0, 1).double(), torch.cat([kc[0], kc[1, :77]]).double(),
                           torch.cat([vc[0], vc[1, :77]]).double(), [3, 3], [150, 77], causal=True)[0]
    base = reference_varlen(q.flatten(0, 1), torch.cat([kc[0], kc[1, :77]]), torch.cat([vc[0], vc[1, :77]]),
                            [3, 3], [150, 77], causal=True, dtype=q.dtype)[0]
    assert_close("kvcache", out.flatten(0, 1), ref, base)


@pytest.mark.cuda_emulated
@pytest.mark.skipif(emulator_unavailable_reason() is not None, reason="CUDA emulator unavailable")
@pytest.mark.parametrize("schedule,at_issue", [("warp-reverse", False), ("random", False), ("lockstep", True)])
def test_other_schedules(schedule, at_issue):
    """The schedules CI runs on one case per kernel elsewhere: warps in reverse, random switches, and
    TMA data landing at issue instead of at the consumer's wait."""
    from flashattn_ext.testing import emulated_cuda
    ct.DEV, ct.EMULATED = "cpu", True
    try:
        with emulated_cuda(schedule, seed=3, copies_land_at_issue=at_issue, hopper=True):
            q, k, v = rand(1, 140, 2, 128), rand(1, 150, 2, 128), rand(1, 150, 2, 128)
            check(q, k, v, f"{schedule} at_issue={at_issue}", causal=True)
    finally:
        ct.DEV, ct.EMULATED = "cuda", False


@pytest.mark.parametrize("ctas", [1, 5])
def test_persistent_ctas_loop_over_work_tiles(hopper, ctas, monkeypatch):
    """Fewer CTAs than work tiles (18 here): each CTA runs several, carrying its mbarrier phases,
    the Q buffer hand-over and the ping-pong turns from one tile to the next; causal tiles of
    different weights, GQA and a partial last query block among them."""
    monkeypatch.setenv("FLASHATTN_CUDA_SM90_GRID", str(ctas))
    q, k, v = rand(2, 300, 3, 64), rand(2, 330, 1, 64), rand(2, 330, 1, 64)
    check(q, k, v, f"{ctas} CTAs", causal=True)
    q, k, v = rand(1, 260, 2, 128), rand(1, 100, 2, 128), rand(1, 100, 2, 128)
    check(q, k, v, f"{ctas} CTAs, tiles without keys", causal=True)  # bottom-right: early rows see none
