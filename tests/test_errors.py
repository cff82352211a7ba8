"""Bad input gets a Python exception that names the argument and the problem, on every device
(the `device` fixture: CPU, emulated CUDA, CUDA)."""

import pytest
import torch

import flashattn_ext
from conftest import rand

sdpa = flashattn_ext.scaled_dot_product_attention
fwd = torch.ops.flashattn_ext.fwd


def qkv(B=2, H=4, Hk=4, L=5, S=7, E=8, Ev=8, dtype=torch.float32, device="cpu"):
    return (rand(B, H, L, E, dtype=dtype, device=device), rand(B, Hk, S, E, dtype=dtype, device=device),
            rand(B, Hk, S, Ev, dtype=dtype, device=device))


CASES = [
    ("dtype mismatch", lambda q, k, v: sdpa(q, k.double(), v), TypeError, "same dtype"),
    ("integer dtype", lambda q, k, v: sdpa(q.long(), k.long(), v.long()), TypeError, "query must be float16"),
    ("device mismatch", lambda q, k, v: fwd(q, k.to("meta"), v), ValueError, "same device"),
    ("mask device", lambda q, k, v: fwd(q, k, v, torch.ones(5, 7, dtype=torch.bool, device="meta")), ValueError,
     "attn_mask must be on"),
    ("rank 1", lambda q, k, v: sdpa(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), ValueError, "at least 2 dims"),
    ("op ranks differ", lambda q, k, v: fwd(q, k[0], v[0]), ValueError, "same number of dims"),
    ("batch mismatch", lambda q, k, v: sdpa(q, k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)),
     RuntimeError, "do not broadcast"),
    ("op batch mismatch", lambda q, k, v: fwd(q, k[:1], v[:1]), ValueError, "same batch dims"),
    ("heads mismatch no gqa", lambda q, k, v: sdpa(q, k[:, :2], v[:, :2]), RuntimeError, "enable_gqa=True"),
    ("heads not divisible", lambda q, k, v: sdpa(q, k[:, :3], v[:, :3], enable_gqa=True), ValueError,
     "multiple of the number of key/value heads"),
    ("kv heads differ", lambda q, k, v: sdpa(q, k[:, :2], v, enable_gqa=True), ValueError,
     "key and value must have the same number of heads"),
    ("head dim mismatch", lambda q, k, v: sdpa(q, k[..., :4], v), ValueError, "same head dim"),
    ("kv length mismatch", lambda q, k, v: sdpa(q, k, v[:, :, :5]), ValueError, "same sequence length"),
    ("mask does not broadcast", lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(3, 7, dtype=torch.bool, device=q.device)),
     ValueError, "does not broadcast"),
    ("mask too many dims", lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(3, 2, 4, 5, 7, dtype=torch.bool, device=q.device)),
     ValueError, "does not broadcast"),
    ("mask int dtype", lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int32, device=q.device)), TypeError,
     "attn_mask must be bool"),
    ("mask float64 with float32 query", lambda q, k, v: sdpa(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.float64, device=q.device)),
     TypeError, "attn_mask must be bool"),
    ("dropout above 1", lambda q, k, v: sdpa(q, k, v, dropout_p=1.5), ValueError, "dropout_p must be between 0 and 1"),
    ("dropout negative", lambda q, k, v: sdpa(q, k, v, dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout nan", lambda q, k, v: sdpa(q, k, v, dropout_p=float("nan")), ValueError, "dropout_p"),
    ("mask with is_causal", lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device=q.device), is_causal=True),
     RuntimeError, "Explicit attn_mask should not be set when is_causal=True"),
    ("softcap negative", lambda q, k, v: sdpa(q, k, v, softcap=-1.0), ValueError, "softcap"),
    ("window below -1", lambda q, k, v: sdpa(q, k, v, window_size=(-2, 0)), ValueError, "window sizes"),
    ("alibi shape", lambda q, k, v: sdpa(q, k, v, alibi_slopes=torch.ones(3, device=q.device)), ValueError, "alibi_slopes must have shape"),
    ("alibi dtype", lambda q, k, v: sdpa(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.float64, device=q.device)), TypeError,
     "alibi_slopes must be float32"),
    ("scale inf", lambda q, k, v: sdpa(q, k, v, scale=float("inf")), ValueError, "scale must be finite"),
    ("flash layout rank", lambda q, k, v: flashattn_ext.flash_attn_func(q[0], k[0], v[0]), ValueError,
     "4-D (batch, seqlen, heads, headdim)"),
    ("block mask shape", lambda q, k, v: fwd(q, k, v, block_mask=torch.ones(2, 4, 3, 3, dtype=torch.bool, device=q.device)),
     ValueError, "block_mask of shape"),
    ("bwd grad shape", lambda q, k, v: torch.ops.flashattn_ext.bwd(q, q, k, v, q, q[..., 0], torch.zeros(2, dtype=torch.long, device=q.device)),
     None, None),
]


@pytest.mark.parametrize("name,call,exc,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(name, call, exc, text, device):
    q, k, v = qkv(device=device)
    if exc is None:  # a well-formed backward call: must work, not raise
        call(q, k, v)
        return
    with pytest.raises(exc) as info:
        call(q, k, v)
    assert text in str(info.value), str(info.value)
    assert "flashattn_ext" in str(info.value)


def test_bwd_validates_its_inputs(device):
    q, k, v = qkv(device=device)
    out, lse, rng = fwd(q, k, v)
    with pytest.raises(ValueError, match="grad_out and out must have shape"):
        torch.ops.flashattn_ext.bwd(out[..., :3], q, k, v, out, lse, rng)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.flashattn_ext.bwd(out, q, k, v, out, lse.double(), rng)
    with pytest.raises(ValueError, match="rng_state"):
        torch.ops.flashattn_ext.bwd(out, q, k, v, out, lse, rng[:1])
