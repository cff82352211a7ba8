"""Dropout under CUDA graph capture: the Philox seed and offset come from torch's CUDA generator
through device pointers, so each replay draws a fresh mask and records it in rng_state, and the
backward regenerates exactly that mask. Skipped without a GPU."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    from flashattn_ext.testing import dropout_mask
    from cuda_testing import assert_close, rand, reference

P = 0.2


def capture(fn):
    """Warm fn up on a side stream, capture it in a graph, return (graph, static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def test_forward_replays_draw_fresh_masks_and_record_them():
    q, k, v = rand(2, 4, 200, 64), rand(2, 4, 230, 64), rand(2, 4, 230, 64)
    graph, (out, lse, rng_state) = capture(lambda: torch.ops.flashattn_ext.fwd(q, k, v, dropout_p=P))
    results = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        results.append((out.clone(), rng_state.clone()))
    (o1, r1), (o2, r2) = results
    assert not torch.equal(r1, r2), "the offset must advance between replays"
    assert not torch.equal(o1, o2)
    for o, r in results:
        keep = dropout_mask(q, k, r, P)
        ref = reference(q.double(), k.double(), v.double(), keep=keep, dropout_p=P)[0]
        base = reference(q, k, v, dtype=q.dtype, keep=keep, dropout_p=P)[0]
        assert_close("replayed forward", o, ref, base)


def test_backward_in_the_same_graph_uses_the_forwards_mask():
    q, k, v = (rand(1, 2, 128, 64) for _ in range(3))
    dout = rand(1, 2, 128, 64)

    def step():
        out, lse, rng_state = torch.ops.flashattn_ext.fwd(q, k, v, dropout_p=P)
        dq, dk, dv, _ = torch.ops.flashattn_ext.bwd(dout, q, k, v, out, lse, rng_state, dropout_p=P)
        return out, rng_state, dq, dk, dv

    graph, (out, rng_state, dq, dk, dv) = capture(step)
    graph.replay()
    torch.cuda.synchronize()
    keep = dropout_mask(q, k, rng_state, P)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference(*leaves, keep=keep, dropout_p=P)[0]
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    low = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    base = reference(*low, dtype=q.dtype, keep=keep, dropout_p=P)[0]
    base_grads = torch.autograd.grad(base, low, dout)
    assert_close("out", out, ref, base)
    for name, a, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, base_grads):
        assert_close(name, a, r, b)


def test_varlen_is_captured_without_host_reads():
    """Under capture the op layer cannot read cu_seqlens on the host: it trusts them (flash-attn's
    contract) and sizes the grid from max_seqlen_*. Replays with new packed inputs and new
    lengths (same total, same count) match eager calls."""
    lens_a, lens_b = [30, 0, 70, 28], [64, 20, 10, 34]
    H, D = 2, 64

    def cu(lens):
        return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")

    q, k, v = (rand(128, H, D) for _ in range(3))
    dout = rand(128, H, D)
    cu_q, cu_k = cu(lens_a), cu(lens_a)

    def step():
        out, lse, rng = torch.ops.flashattn_ext.varlen_fwd(q, k, v, cu_q, cu_k, 70, 70, bottom_right=True)
        dq, dk, dv = torch.ops.flashattn_ext.varlen_bwd(dout, q, k, v, out, lse, rng, cu_q, cu_k, 70, 70,
                                                        bottom_right=True)
        return out, dq, dk, dv

    graph, static = capture(step)
    for lens in (lens_a, lens_b):
        for t in (q, k, v, dout):
            t.copy_(torch.randn_like(t))
        cu_q.copy_(cu(lens))
        cu_k.copy_(cu(lens))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for name, a, b in zip(("out", "dq", "dk", "dv"), static, eager):
            assert torch.allclose(a, b, atol=2e-2, rtol=0), f"replayed varlen {name} differs from eager"
