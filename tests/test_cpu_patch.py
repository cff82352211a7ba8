"""patch_sdpa routes torch's SDPA through the extension for unmodified modules."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import flashattn_ext
from conftest import assert_close, rand

ORIGINAL = F.scaled_dot_product_attention


def ops_that_ran(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def grads_of(module, x):
    module.zero_grad()
    out = module(x)
    out.backward(torch.ones_like(out))
    return out.detach(), [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer(norm_first):
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0,
                                             batch_first=True, norm_first=norm_first).train()
    x = rand(3, 37, 64)
    out_ref, grads_ref = grads_of(layer, x)
    with flashattn_ext.patch_sdpa() as patch:
        out, grads = grads_of(layer, x)
        ran = ops_that_ran(lambda: layer(x).sum().backward())
    assert patch.calls >= 2 and not patch.fallbacks
    assert "flashattn_ext::fwd" in ran and "flashattn_ext::bwd" in ran
    assert F.scaled_dot_product_attention is ORIGINAL
    assert_close(out, out_ref.double(), torch.float32, "output")
    for a, b in zip(grads, grads_ref):
        assert_close(a, b.double(), torch.float32, "parameter grad")


def test_multihead_attention_with_masks():
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).train()
    x = rand(2, 10, 32)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 7:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10)
    run = lambda: mha(x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=False)[0]  # noqa: E731
    ref = run()
    with flashattn_ext.patch_sdpa() as patch:
        out = run()
    assert patch.calls == 1
    assert_close(out, ref.double(), torch.float32)


def test_plain_call_and_undo():
    handle = flashattn_ext.patch_sdpa()
    try:
        assert F.scaled_dot_product_attention is not ORIGINAL and handle.active
        q, k, v = rand(1, 2, 5, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
        F.scaled_dot_product_attention(q, k, v)
        assert handle.calls == 1
    finally:
        handle.undo()
    assert F.scaled_dot_product_attention is ORIGINAL and not handle.active
    handle.undo()  # idempotent
    assert F.scaled_dot_product_attention is ORIGINAL


def test_unsupported_input_falls_back_with_one_warning():
    q = torch.nested.nested_tensor([rand(2, 5, 8), rand(2, 7, 8)], layout=torch.jagged)
    with flashattn_ext.patch_sdpa() as patch:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                F.scaled_dot_product_attention(q, q, q)
            except RuntimeError:
                pass  # torch's own SDPA may refuse nested input on CPU; what matters is the routing
            try:
                F.scaled_dot_product_attention(q, q, q)
            except RuntimeError:
                pass
        messages = [str(w.message) for w in caught if "flashattn_ext.patch_sdpa" in str(w.message)]
    assert patch.fallbacks == {"nested (jagged) tensors": 2}
    assert len(messages) <= 1 and patch.calls == 0
    if messages:
        assert "nested" in messages[0]


def test_meta_device_falls_back():
    q = torch.empty(1, 2, 5, 8, device="meta")
    with flashattn_ext.patch_sdpa() as patch:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == (1, 2, 5, 8) and patch.fallbacks == {"device meta": 1}


def test_patched_module_compiles():
    torch._dynamo.reset()
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, dropout=0.0,
                                             batch_first=True).train()
    x = rand(2, 16, 32)
    ref = layer(x)
    with flashattn_ext.patch_sdpa() as patch:
        out = torch.compile(layer, fullgraph=True)(x)
        out.sum().backward()
    assert patch.calls >= 1 and not patch.fallbacks
    assert_close(out, ref.double(), torch.float32)
