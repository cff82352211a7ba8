"""Fake (meta) kernels: shapes, dtypes and strides of the ops' outputs, so torch.compile traces
calls without graph breaks. They mirror the allocation rules of csrc/ops.cpp exactly."""

import torch


def _check_devices(q, k, v, **optional):
    # The dispatcher sends a call with any meta tensor here, so the device check of csrc/ops.cpp is
    # repeated: a mix of meta and real tensors must fail as it does in C++.
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"flashattn_ext: query, key and value must be on the same device, got query on "
                         f"{q.device}, key on {k.device}, value on {v.device}")
    for name, t in optional.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"flashattn_ext: {name} must be on the query's device ({q.device}), got {t.device}")


def _out_like_query(q, headdim_v):
    # csrc/ops.cpp allocate_out: O follows a (B, S, H, D)-laid query seen as (B, H, S, D).
    if q.dim() == 4 and q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2):
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1], headdim_v)).transpose(1, 2)
    return q.new_empty((*q.shape[:-1], headdim_v))


def _grad_like(x):
    # csrc/ops.cpp allocate_grad
    g = torch.empty_like(x)
    if g.shape[-1] > 1 and g.stride(-1) != 1:
        g = x.new_empty(x.shape)
    return g


def _bind(op, args, kwargs):
    """A call's arguments by name with the schema's defaults: the option list is declared once, in
    csrc/op_options.h, and read here from the registered schema."""
    bound = {}
    for i, arg in enumerate(op.default._schema.arguments):
        bound[arg.name] = args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
    return bound


def _tensor_options(a):
    return {name: a[name] for name in ("attn_mask", "alibi_slopes", "block_mask", "block_elem_masks")}


@torch.library.register_fake("flashattn_ext::fwd")
def _fwd_fake(*args, **kwargs):
    a = _bind(torch.ops.flashattn_ext.fwd, args, kwargs)
    q, k, v = a["q"], a["k"], a["v"]
    _check_devices(q, k, v, **_tensor_options(a))
    out = _out_like_query(q, v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    rng_state = q.new_empty((2,), dtype=torch.int64)
    return out, lse, rng_state


@torch.library.register_fake("flashattn_ext::bwd")
def _bwd_fake(*args, **kwargs):
    a = _bind(torch.ops.flashattn_ext.bwd, args, kwargs)
    q, k, v, attn_mask = a["q"], a["k"], a["v"], a["attn_mask"]
    _check_devices(q, k, v, **_tensor_options(a))
    dmask = attn_mask.new_empty(attn_mask.shape) if a["mask_grad"] else q.new_empty((0,))
    return _grad_like(q), _grad_like(k), _grad_like(v), dmask


@torch.library.register_fake("flashattn_ext::dropout_mask")
def _dropout_mask_fake(q, k, rng_state, dropout_p):
    return q.new_empty((*q.shape[:-1], k.shape[-2]), dtype=torch.bool)


@torch.library.register_fake("flashattn_ext::varlen_fwd")
def _varlen_fwd_fake(*args, **kwargs):
    a = _bind(torch.ops.flashattn_ext.varlen_fwd, args, kwargs)
    q, k, v = a["q"], a["k"], a["v"]
    _check_devices(q, k, v, cu_seqlens_q=a["cu_seqlens_q"], cu_seqlens_k=a["cu_seqlens_k"], **_tensor_options(a))
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse, q.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("flashattn_ext::varlen_bwd")
def _varlen_bwd_fake(*args, **kwargs):
    a = _bind(torch.ops.flashattn_ext.varlen_bwd, args, kwargs)
    q, k, v = a["q"], a["k"], a["v"]
    _check_devices(q, k, v, **_tensor_options(a))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("flashattn_ext::fwd_kvcache")
def _fwd_kvcache_fake(q, k_cache, v_cache, *args, **kwargs):
    _check_devices(q, k_cache, v_cache)
    out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]),
                      dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse
