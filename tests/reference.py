"""Float64 reference attention, written out with explicit matmuls (not torch's SDPA), covering every
feature of the extension. Gradients come from autograd through it."""

import math

import torch


def band_mask(L, S, window_left=-1, window_right=-1, bottom_right=False, device="cpu"):
    """True where query i may see key j: i + diag - left <= j <= i + diag + right (-1 = unbounded)."""
    diag = S - L if bottom_right else 0
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= j >= i + diag - window_left
    if window_right >= 0:
        ok &= j <= i + diag + window_right
    return ok


def reference_attention(q, k, v, attn_mask=None, *, scale=None, causal=False, bottom_right=False,
                        window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_keep=None, dropout_p=0.0,
                        block_mask=None, block_size=(128, 128), dtype=torch.float64):
    """q (..., Hq, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev) -> (out, lse), in float64 by default.

    dtype (the upcast switch): the same math run in a lower precision, as torch's math SDPA does on
    a GPU and flash-attn's reference with upcast=False: inputs and the two matmuls in `dtype`, the
    softmax in float32, P rounded to `dtype` before P V. That is the baseline of the "at most 2x
    torch's own low-precision error" rule. Fully masked rows give out = 0 and lse = -inf (their
    gradients are 0). lse comes back in float32 unless dtype is float64."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    if q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    s = (q @ k.transpose(-1, -2)).to(acc) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        dist = (i + S - L - j).abs().to(acc)
        s = s - alibi_slopes.to(acc)[..., None, None] * dist
    visible = torch.ones(s.shape, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            s = s + attn_mask.to(acc)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    visible = visible & band_mask(L, S, left, right, bottom_right, q.device)
    if block_mask is not None:
        bm, bn = block_size
        expanded = block_mask.bool().repeat_interleave(bm, dim=-2)[..., :L, :].repeat_interleave(bn, dim=-1)[..., :S]
        visible = visible & expanded
    s = s.masked_fill(~visible, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    shifted = torch.where(empty, torch.zeros_like(s), s - torch.where(empty, torch.zeros_like(row_max), row_max))
    e = torch.exp(shifted).masked_fill(~torch.isfinite(s), 0.0)
    denom = e.sum(dim=-1, keepdim=True)
    p = torch.where(denom > 0, e / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(e))
    lse = torch.where(empty.squeeze(-1), torch.full_like(row_max.squeeze(-1), float("-inf")),
                      row_max.squeeze(-1) + torch.log(torch.where(denom > 0, denom, torch.ones_like(denom)).squeeze(-1)))
    if dropout_keep is not None:
        p = p * dropout_keep.to(acc) / (1.0 - dropout_p) if dropout_p < 1 else torch.zeros_like(p)
    out = p.to(dtype) @ v
    return out, (lse if dtype == torch.float64 else lse.float())


def reference_varlen(q, k, v, lens_q, lens_k, keeps=None, dropout_p=0.0, alibi=None, dtype=torch.float64, **kw):
    """Packed (total, H, D) q/k/v of sequences with lengths lens_q / lens_k -> (out (total_q, H, Dv),
    lse (H, total_q)): reference_attention per sequence, bottom-right aligned. keeps[b]: sequence
    b's dropout keep mask; alibi: (H,) or (batch, H) slopes. A sequence without keys: out 0, lse -inf."""
    outs, lses = [], []
    sq = sk = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qs, ks, vs = (x[s:s + n].transpose(0, 1) for x, s, n in ((q, sq, lq), (k, sk, lk), (v, sk, lk)))
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        if lk == 0:
            o = qs.new_zeros(qs.shape[0], lq, v.shape[-1]).to(dtype)
            lse = torch.full((qs.shape[0], lq), float("-inf"), dtype=torch.float64 if dtype == torch.float64
                             else torch.float32, device=q.device)
        else:
            o, lse = reference_attention(qs, ks, vs, bottom_right=True, alibi_slopes=slopes,
                                         dropout_keep=None if keeps is None else keeps[b], dropout_p=dropout_p,
                                         dtype=dtype, **kw)
        outs.append(o.transpose(0, 1))
        lses.append(lse)
        sq, sk = sq + lq, sk + lk
    if not outs:  # no sequences
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return (q.new_zeros(0, q.shape[1], v.shape[-1]).to(dtype),
                torch.zeros(q.shape[1], 0, dtype=lse_dtype, device=q.device))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def rotary_reference(x, cos, sin, positions, interleaved):
    """x (B, S, H, D) rotated at positions (B, S); float64."""
    x = x.double()
    half = cos.shape[1]
    c = cos.double()[positions][:, :, None, :]
    s = sin.double()[positions][:, :, None, :]
    xr, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([rot, rest], -1)


def reference_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, *, cache_batch_idx=None, leftpad=None,
                      rotary=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None,
                      dtype=torch.float64):
    """The expected cache after the append (in the cache dtype) and (out, lse) from per-batch dense
    attention on the gathered cache: reference_attention in `dtype` (float64: the reference)."""
    B, Sq = q.shape[:2]
    Sn = 0 if k is None else k.shape[1]
    kc, vc = k_cache.clone(), v_cache.clone()
    qd = q.double()
    if rotary is not None:
        cos, sin, interleaved = rotary
        pos_k = cache_seqlens.long()[:, None] + torch.arange(Sn, device=q.device)[None]
        k = rotary_reference(k, cos, sin, pos_k, interleaved).to(k.dtype)
        local = causal or window != (-1, -1)
        pos_q = cache_seqlens.long()[:, None] + (torch.arange(Sq, device=q.device)[None] if local
                                                  else torch.zeros(1, Sq, dtype=torch.long, device=q.device))
        qd = rotary_reference(q, cos, sin, pos_q, interleaved).to(q.dtype).double()
    outs, lses = [], []
    for b in range(B):
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        end = int(cache_seqlens[b])
        if k is not None:
            kc[row, end:end + Sn] = k[b]
            vc[row, end:end + Sn] = v[b]
        start = 0 if leftpad is None else int(leftpad[b])
        kb = kc[row, start:end + Sn].double().transpose(0, 1)
        vb = vc[row, start:end + Sn].double().transpose(0, 1)
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        if kb.shape[-2] == 0:  # no key: out 0, lse -inf
            o = torch.zeros(q.shape[2], Sq, v_cache.shape[-1], dtype=dtype, device=q.device)
            lse = torch.full((q.shape[2], Sq), float("-inf"), dtype=torch.float64 if dtype == torch.float64
                             else torch.float32, device=q.device)
        else:
            o, lse = reference_attention(qd[b].transpose(0, 1), kb, vb, scale=scale, causal=causal,
                                         bottom_right=True, window=window, softcap=softcap, alibi_slopes=slopes,
                                         dtype=dtype)
        outs.append(o.transpose(0, 1))
        lses.append(lse)
    return kc, vc, torch.stack(outs), torch.stack(lses)
