"""gradcheck in fp64, torch.library.opcheck on the ops, torch.compile(fullgraph=True) forward and
backward."""

import pytest
import torch

import flashattn_ext
from conftest import assert_close, rand

sdpa = flashattn_ext.scaled_dot_product_attention
ops = torch.ops.flashattn_ext


def d(*shape, requires_grad=True):
    return rand(*shape, dtype=torch.float64, requires_grad=requires_grad)


GRADCHECK_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool_mask": dict(attn_mask=torch.rand(2, 1, 6, 9) > 0.3),
    "softcap_window": dict(softcap=2.0, window_size=(3, 1)),
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "scale": dict(scale=0.7),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_fp64(case):
    q, k, v = d(2, 4, 6, 5), d(2, 2, 9, 5), d(2, 2, 9, 3)
    kwargs = GRADCHECK_CASES[case]
    assert torch.autograd.gradcheck(lambda q, k, v: sdpa(q, k, v, enable_gqa=True, **kwargs), (q, k, v))


def test_gradcheck_float_mask():
    q, k, v, mask = d(2, 3, 6, 5), d(2, 3, 9, 5), d(2, 3, 9, 4), d(1, 3, 6, 9)
    assert torch.autograd.gradcheck(lambda q, k, v, m: sdpa(q, k, v, attn_mask=m), (q, k, v, mask))


def test_gradcheck_flash_api_bottom_right():
    q, k, v = d(1, 7, 4, 5), d(1, 4, 2, 5), d(1, 4, 2, 5)
    assert torch.autograd.gradcheck(lambda q, k, v: flashattn_ext.flash_attn_func(q, k, v, causal=True), (q, k, v))


OPCHECK_ARGS = [
    ((rand(2, 4, 16, 8), rand(2, 2, 20, 8), rand(2, 2, 20, 6)), {}),
    ((rand(2, 4, 16, 8, requires_grad=True), rand(2, 4, 20, 8, requires_grad=True),
      rand(2, 4, 20, 8, requires_grad=True)), dict(attn_mask=torch.rand(16, 20) > 0.2, window_right=0)),
    ((rand(1, 16, 2, 8).transpose(1, 2), rand(1, 20, 2, 8).transpose(1, 2), rand(1, 20, 2, 8).transpose(1, 2)),
     dict(softcap=5.0, bottom_right=True, window_left=4)),
    ((rand(3, 2, 5, 8, dtype=torch.bfloat16), rand(3, 2, 7, 8, dtype=torch.bfloat16),
      rand(3, 2, 7, 8, dtype=torch.bfloat16)), dict(attn_mask=rand(3, 1, 1, 7, dtype=torch.bfloat16))),
    ((rand(2, 4, 16, 8, dtype=torch.float64), rand(2, 4, 20, 8, dtype=torch.float64),
      rand(2, 4, 20, 8, dtype=torch.float64)), dict(scale=0.3)),
]


@pytest.mark.parametrize("args,kwargs", OPCHECK_ARGS)
def test_opcheck_fwd(args, kwargs):
    torch.library.opcheck(ops.fwd.default, args, kwargs)


def test_opcheck_bwd_and_dropout_mask():
    q, k, v = rand(2, 4, 16, 8), rand(2, 2, 20, 8), rand(2, 2, 20, 8)
    mask = rand(1, 4, 16, 20)
    out, lse, rng = ops.fwd(q, k, v, mask)
    grad = rand(*out.shape)
    torch.library.opcheck(ops.bwd.default, (grad, q, k, v, out, lse, rng), dict(attn_mask=mask, mask_grad=True))
    torch.library.opcheck(ops.bwd.default, (grad, q, k, v, out, lse, rng), dict(attn_mask=mask))
    _, _, rng = ops.fwd(q, k, v, dropout_p=0.5)
    torch.library.opcheck(ops.dropout_mask.default, (q, k, rng, 0.5))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_forward_backward(dynamic):
    torch._dynamo.reset()

    def block(q, k, v, mask):
        x = sdpa(q, k, v, attn_mask=mask) * 2.0
        y = flashattn_ext.flash_attn_func(x.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return y.sum(dim=-1)

    compiled = torch.compile(block, fullgraph=True, dynamic=dynamic)
    for L in (32, 48):
        q, k, v = (rand(2, 4, L, 16, requires_grad=True) for _ in range(3))
        mask = rand(1, 4, L, L, requires_grad=True)
        eager = block(q, k, v, mask)
        comp = compiled(q, k, v, mask)
        assert_close(comp, eager.double(), torch.float32, "compiled forward")
        g = rand(*eager.shape)
        for a, b in zip(torch.autograd.grad(comp, (q, k, v, mask), g), torch.autograd.grad(eager, (q, k, v, mask), g)):
            assert_close(a, b.double(), torch.float32, "compiled backward")


def test_compile_sees_no_graph_break():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    q, k, v = (rand(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    f = torch.compile(lambda q, k, v: sdpa(q, k, v, is_causal=True).relu().sum(), backend=counter, fullgraph=True)
    f(q, k, v).backward()
    assert counter.frame_count == 1
    assert counter.op_count >= 1


def test_double_backward_is_refused_clearly():
    q, k, v = (d(1, 1, 4, 4) for _ in range(3))
    out = sdpa(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    assert torch.isfinite(gq).all()  # first-order gradients with create_graph=True still work
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


def test_no_graph_without_grad_but_graph_for_any_input_that_needs_it():
    """The autograd kernel skips the autograd function when nothing needs a gradient (no_grad, or
    no input requiring grad) and builds it whenever any input does, the float mask included."""
    torch.manual_seed(0)
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 7, 8), rand(2, 3, 7, 8)
    mask = torch.randn(5, 7)
    ref = flashattn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ref.grad_fn is None and not ref.requires_grad
    for needs in ("q", "k", "v", "mask"):
        xs = {"q": q.clone(), "k": k.clone(), "v": v.clone(), "mask": mask.clone()}
        xs[needs].requires_grad_(True)
        with torch.no_grad():
            out = flashattn_ext.scaled_dot_product_attention(xs["q"], xs["k"], xs["v"], attn_mask=xs["mask"])
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, ref)
        out = flashattn_ext.scaled_dot_product_attention(xs["q"], xs["k"], xs["v"], attn_mask=xs["mask"])
        assert out.requires_grad and out.grad_fn is not None, needs
        assert torch.equal(out.detach(), ref)
        out.square().sum().backward()
        assert xs[needs].grad is not None and xs[needs].grad.abs().sum() > 0, needs
    # lse and rng_state are never differentiable, whichever path made them.
    _, lse, rng = torch.ops.flashattn_ext.fwd(q.requires_grad_(), k, v)
    assert not lse.requires_grad and not rng.requires_grad


def test_forward_mode_ad_is_refused_clearly():
    """Dual (forward-mode AD) inputs take the autograd function's path, which refuses them, even
    under no_grad: never a silently missing tangent."""
    import torch.autograd.forward_ad as fwAD
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8)
    with fwAD.dual_level():
        dq = fwAD.make_dual(q, torch.randn_like(q))
        for ctx in (torch.enable_grad(), torch.no_grad()):
            with ctx, pytest.raises(RuntimeError, match="(?i)jvp|forward"):
                flashattn_ext.scaled_dot_product_attention(dq, k, v)
