"""SDPA semantics on every device (the `device` fixture: CPU, emulated CUDA, CUDA) where they are
device-agnostic, and on the CPU the memory properties: fully masked rows, strides without copies, broadcasting without
materializing, leading batch dims, empty tensors, GQA without copies."""

import pytest
import torch
import torch.nn.functional as F

import flashattn_ext
from conftest import assert_close, rand
from reference import reference_attention

sdpa = flashattn_ext.scaled_dot_product_attention


def copies_made(fn):
    """Names of the copying aten ops run (at any depth, the op's internals included) by fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    return names & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::repeat_interleave", "aten::repeat",
                    "aten::_to_copy"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_fully_masked_rows_are_zero_with_zero_grad(dtype, mask_kind, device):
    B, H, L, S, E = 2, 2, 9, 13, 16
    q, k, v = (rand(B, H, n, E, dtype=dtype, requires_grad=True, device=device) for n in (L, S, S))
    keep = torch.rand(B, H, L, S, device=device) > 0.3
    keep[0, 1, 4] = False
    keep[1, :, 0] = False
    mask = keep if mask_kind == "bool" else torch.zeros(B, H, L, S, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
    out, lse, _ = torch.ops.flashattn_ext.fwd(q, k, v, mask)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[0, 1, 4] == 0).all() and (out[1, :, 0] == 0).all()
    assert torch.isneginf(lse[0, 1, 4]) and torch.isneginf(lse[1, :, 0]).all()
    out = sdpa(q, k, v, attn_mask=mask)
    grad_out = rand(*out.shape, dtype=dtype, device=device)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    for g in (dq, dk, dv):
        assert not g.isnan().any()
    assert (dq[0, 1, 4] == 0).all() and (dq[1, :, 0] == 0).all()
    ref, _ = reference_attention(q, k, v, mask)
    assert_close(out, ref, dtype, "out")


def test_window_with_no_visible_key_gives_zero(device):
    q, k, v = rand(1, 1, 8, 4, device=device), rand(1, 1, 8, 4, device=device), rand(1, 1, 8, 4, device=device)
    out, lse, _ = torch.ops.flashattn_ext.fwd(q, k, v, window_left=0, window_right=-1, bottom_right=True)
    # bottom-right with L == S: row i sees keys i.. (right unbounded): all rows see something
    assert torch.isfinite(lse).all()
    q = rand(1, 1, 8, 4, device=device)
    k, v = rand(1, 1, 3, 4, device=device), rand(1, 1, 3, 4, device=device)
    out, lse, _ = torch.ops.flashattn_ext.fwd(q, k, v, window_left=-1, window_right=0, bottom_right=True)
    # bottom-right causal with L > S: the first L - S rows see no key
    assert (out[0, 0, :5] == 0).all() and torch.isneginf(lse[0, 0, :5]).all()
    ref, _ = reference_attention(q, k, v, causal=True, bottom_right=True)
    assert_close(out, ref, torch.float32)


def test_causal_is_top_left_like_sdpa(device):
    for L, S in ((5, 9), (9, 5), (7, 7)):
        q, k, v = rand(2, 3, L, 8, device=device), rand(2, 3, S, 8, device=device), rand(2, 3, S, 8, device=device)
        ours = sdpa(q, k, v, is_causal=True)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_close(ours, theirs.double(), torch.float32, f"L={L} S={S}")


def test_bshd_transposed_views_run_without_copy():
    B, L, S, H, E = 2, 64, 80, 4, 32
    q = rand(B, L, H, E).transpose(1, 2)
    k = rand(B, S, H, E).transpose(1, 2)
    v = rand(B, S, H, E).transpose(1, 2)
    assert not q.is_contiguous()
    made = copies_made(lambda: sdpa(q, k, v, is_causal=True))
    assert not made, f"copies: {made}"
    out = sdpa(q, k, v, is_causal=True)
    # the output follows the query's (B, S, H, D) memory layout
    assert out.transpose(1, 2).is_contiguous()
    assert_close(out, reference_attention(q, k, v, causal=True)[0], torch.float32)


def test_arbitrary_strides(device):
    base = rand(3, 50, 7, 40, device=device)
    q = base[::2, 3:40:2, 1:5, :24]  # sliced along every dim, last dim contiguous
    k = rand(2, 4, 60, 48, device=device)[..., 8:32]
    v = rand(2, 60, 4, 24, device=device).transpose(1, 2)
    q = q.transpose(1, 2)
    assert q.shape == (2, 4, 19, 24)
    out = sdpa(q, k, v)
    assert_close(out, reference_attention(q, k, v)[0], torch.float32)
    # a non-unit stride in the last dim is copied once, and still right
    q2 = rand(2, 4, 19, 48, device=device)[..., ::2]
    assert_close(sdpa(q2, k, v), reference_attention(q2, k, v)[0], torch.float32)


def test_mask_broadcast_is_not_materialized():
    B, H, L, S, E = 2, 4, 100, 120, 16
    q, k, v = rand(B, H, L, E), rand(B, H, S, E), rand(B, H, S, E)
    for mask in (torch.rand(L, S) > 0.5, rand(1, H, 1, S), torch.rand(B, 1, L, 1) > 0.1, rand(S)):
        made = copies_made(lambda: sdpa(q, k, v, attn_mask=mask))
        assert not made, f"mask {tuple(mask.shape)}: copies {made}"
        assert_close(sdpa(q, k, v, attn_mask=mask), reference_attention(q, k, v, mask)[0], torch.float32)


def test_gqa_does_not_copy_kv():
    q, k, v = rand(2, 8, 33, 16), rand(2, 2, 40, 16), rand(2, 2, 40, 16)
    made = copies_made(lambda: sdpa(q, k, v, enable_gqa=True))
    assert not made, f"copies: {made}"
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert_close(sdpa(q, k, v, enable_gqa=True), ref.double(), torch.float32)


@pytest.mark.parametrize("shapes", [
    ((5, 8), (7, 8), (7, 3)),                                   # rank 2
    ((4, 5, 8), (4, 7, 8), (4, 7, 3)),                          # rank 3
    ((2, 3, 4, 5, 8), (2, 3, 4, 7, 8), (2, 3, 4, 7, 3)),        # rank 5
    ((2, 1, 3, 2, 5, 8), (1, 2, 3, 2, 7, 8), (1, 2, 3, 2, 7, 3)),  # rank 6, broadcast batch dims
    ((2, 4, 5, 8), (1, 4, 7, 8), (1, 4, 7, 8)),                 # key/value broadcast over batch
    ((2, 4, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8)),                 # one kv head broadcast (no enable_gqa)
])
def test_leading_dims_and_broadcasting_match_sdpa(shapes, device):
    q, k, v = (rand(*s, requires_grad=True, device=device) for s in shapes)
    ours = sdpa(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert ours.shape == theirs.shape
    assert_close(ours, theirs.double(), torch.float32)
    grad = rand(*ours.shape, device=device)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(theirs, (q, k, v), grad)):
        assert a.shape == b.shape
        assert_close(a, b.double(), torch.float32)


def test_mask_with_unfoldable_batch_dims(device):
    # mask (2, 1, 3, H, L, S) against batch (2, 5, 3): batch strides cannot be folded into two levels
    q, k, v = rand(2, 5, 3, 2, 6, 8, requires_grad=True, device=device), rand(2, 5, 3, 2, 7, 8, device=device), rand(2, 5, 3, 2, 7, 8, device=device)
    mask = rand(2, 1, 3, 2, 6, 7, requires_grad=True, device=device)
    ours = sdpa(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(ours, theirs.double(), torch.float32)
    g = rand(*ours.shape, device=device)
    a = torch.autograd.grad(ours, (q, mask), g)
    b = torch.autograd.grad(theirs, (q, mask), g)
    for x, y in zip(a, b):
        assert_close(x, y.double(), torch.float32)


@pytest.mark.parametrize("dims", [(0, 4, 5, 7), (2, 4, 0, 7), (2, 4, 5, 0), (2, 0, 5, 7)])
def test_empty_tensors(dims, device):
    B, H, L, S = dims
    q, k, v = rand(B, H, L, 8, requires_grad=True, device=device), rand(B, H, S, 8, requires_grad=True, device=device), rand(B, H, S, 6,
                                                                                              requires_grad=True, device=device)
    out = sdpa(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape == (B, H, L, 6)
    assert torch.equal(out, ref)  # zeros when S == 0, empty otherwise
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for g in (dq, dk, dv):
        assert (g == 0).all()


def test_float_mask_gradient_reduced_over_broadcast_dims(device):
    B, H, L, S, E = 2, 3, 20, 30, 8
    q, k, v = (rand(B, H, n, E, requires_grad=True, device=device) for n in (L, S, S))
    for shape in ((B, H, L, S), (1, H, L, S), (L, S), (B, 1, 1, S), (B, 1, L, 1), (S,)):
        mask = rand(*shape, requires_grad=True, device=device)
        g = rand(B, H, L, E, device=device)
        ours = torch.autograd.grad(sdpa(q, k, v, attn_mask=mask), (q, k, v, mask), g)
        ref = torch.autograd.grad(reference_attention(q, k, v, mask)[0], (q, k, v, mask), g.double())
        for name, a, b in zip(("dq", "dk", "dv", "dmask"), ours, ref):
            assert a.shape == b.shape, name
            assert_close(a, b, torch.float32, f"{name} for mask {shape}")


def test_bf16_mask_gradient_has_mask_dtype(device):
    q, k, v = (rand(1, 2, 10, 8, dtype=torch.bfloat16, requires_grad=True, device=device) for _ in range(3))
    mask = rand(1, 2, 10, 10, dtype=torch.bfloat16, requires_grad=True, device=device)
    (dmask,) = torch.autograd.grad(sdpa(q, k, v, attn_mask=mask).sum(), (mask,))
    assert dmask.dtype == torch.bfloat16 and dmask.shape == mask.shape


def test_no_score_matrix_in_memory():
    """L = S = 16384 fp32: a score matrix would be 1 GiB; the extension's peak stays far below."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import torch, flashattn_ext
        def kib(field):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
        small = [torch.randn(1, 1, 16, 8, requires_grad=True) for _ in range(3)]
        flashattn_ext.scaled_dot_product_attention(*small).sum().backward()  # load libraries, start threads
        q, k, v = (torch.randn(1, 1, 16384, 8, requires_grad=True) for _ in range(3))
        grad = torch.ones(1, 1, 16384, 8)
        before = kib("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
        out = flashattn_ext.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)
        print(kib("VmHWM") - before)
    """)
    grew_kib = int(subprocess.check_output([sys.executable, "-c", code], text=True).strip())
    assert grew_kib < 128 * 1024, f"peak RSS grew by {grew_kib} KiB (a score matrix would be 1 GiB)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_inputs_propagate_like_sdpa(dtype, device):
    """A NaN in a query row makes that row NaN (as in SDPA), never a silent number."""
    q, k, v = rand(1, 2, 40, 16, dtype=dtype, device=device), rand(1, 2, 300, 16, dtype=dtype, device=device), rand(1, 2, 300, 16, dtype=dtype, device=device)
    q[0, 1, 7, 3] = float("nan")
    out = sdpa(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 1, 7].isnan().all() and not out[0, 0].isnan().any()
