"""Block-sparse FlashAttention (Dao et al. 2022, Algorithm 5): attention visits only the
(query block, key block) tiles a block mask keeps, so I/O and FLOPs scale with the fraction s of
kept blocks. Kept blocks are "full" (every element takes part: no element masking) or "partial"
(an element mask, stored once per distinct pattern, says which elements take part).

    mask = flashattn_ext.sparse.sliding_window_block_mask(L, S, window=(1024, 0))
    out = flashattn_ext.block_sparse_attention(q, k, v, mask)

Builders: causal_block_mask, sliding_window_block_mask, strided_block_mask, butterfly_block_mask,
from_mask_mod (like FlexAttention's create_block_mask), from_flex_block_mask (a FlexAttention
BlockMask), BlockSparseMask.from_blocks (a plain bool block tensor).
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ._errors import AttentionTypeError, AttentionValueError

DEFAULT_BLOCK_SIZE = (128, 128)
EMPTY, FULL = -1, -2


@dataclass(frozen=True)
class BlockSparseMask:
    """blocks: int32 (B | 1, H | 1, ceil(L / block_m), ceil(S / block_n)); -1 = empty (never
    loaded or computed), -2 = full, e >= 0 = partial with element mask element_masks[e].
    element_masks: bool (P, block_m, block_n) or None."""

    blocks: torch.Tensor
    element_masks: Optional[torch.Tensor]
    block_size: Tuple[int, int]
    seqlen_q: int
    seqlen_k: int

    def __post_init__(self):
        # The range check of the blocks' values happens here, once: the op layer finds this
        # tensor's range remembered (flashattn_ext._C.block_mask_range) instead of reading the
        # values at every call, which on CUDA is a host sync and illegal under graph capture.
        if not isinstance(self.blocks, torch.Tensor) or self.blocks.dtype != torch.int32:
            raise AttentionTypeError(f"BlockSparseMask: blocks must be an int32 tensor, got "
                                     f"{getattr(self.blocks, 'dtype', type(self.blocks).__name__)}")
        num_masks = 0 if self.element_masks is None else self.element_masks.shape[0]
        if self.blocks.numel():
            from . import _C
            lo, hi = _C.block_mask_range(self.blocks)
            if lo < EMPTY - 1 or hi >= num_masks:
                raise AttentionValueError(f"BlockSparseMask: blocks must be -1 (empty), -2 (full) or an index into "
                                          f"element_masks ({num_masks} masks), got values in [{lo}, {hi}]")

    @classmethod
    def from_blocks(cls, kept, seqlen_q, seqlen_k, block_size=DEFAULT_BLOCK_SIZE):
        """A bool block tensor (True = visit); every kept block is full."""
        blocks = torch.where(kept.bool(), FULL, EMPTY).to(torch.int32)
        return cls(blocks, None, tuple(block_size), seqlen_q, seqlen_k)

    @property
    def kept(self):
        return self.blocks != EMPTY

    @property
    def density(self):
        """Fraction of (query block, key block) pairs visited."""
        return self.kept.float().mean().item()

    def to(self, device):
        em = None if self.element_masks is None else self.element_masks.to(device)
        return BlockSparseMask(self.blocks.to(device), em, self.block_size, self.seqlen_q, self.seqlen_k)

    def to_dense(self):
        """The element mask it stands for, bool (B | 1, H | 1, L, S) — for tests and references."""
        bm, bn = self.block_size
        L, S = self.seqlen_q, self.seqlen_k
        dense = self.kept.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)
        if self.element_masks is not None:
            partial = self.blocks >= 0
            idx = self.blocks.clamp(min=0).long()
            elem = self.element_masks.bool()[idx]  # (..., nbm, nbn, bm, bn)
            elem = torch.where(partial[..., None, None], elem, torch.ones_like(elem))
            elem = elem.permute(*range(elem.dim() - 4), -4, -2, -3, -1)
            elem = elem.reshape(*elem.shape[:-4], elem.shape[-4] * bm, elem.shape[-2] * bn)
            dense = dense & elem
        return dense[..., :L, :S]

    def op_args(self):
        """(block_mask, block_elem_masks, block_m, block_n) for torch.ops.flashattn_ext.fwd."""
        return self.blocks, self.element_masks, self.block_size[0], self.block_size[1]


# ---------------------------------------------------------------------------------------------
# Building from an element predicate, evaluated only where it must be.

def _block_grid(seqlen_q, seqlen_k, block_size, device):
    bm, bn = block_size
    nbm, nbn = math.ceil(seqlen_q / bm), math.ceil(seqlen_k / bn)
    return bm, bn, nbm, nbn


def _finish(kept, full, elem_of, seqlen_q, seqlen_k, block_size, device):
    """kept/full: bool (B', H', nbm, nbn). For partial blocks (kept & ~full), elem_of(indices) gives
    their element masks (P, bm, bn); identical masks are stored once."""
    blocks = torch.full(kept.shape, EMPTY, dtype=torch.int32, device=device)
    blocks[kept & full] = FULL
    partial = kept & ~full
    element_masks = None
    if partial.any():
        where = partial.nonzero()  # (P, 4)
        masks = elem_of(where)     # (P, bm, bn) bool
        flat = masks.reshape(masks.shape[0], -1)
        unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
        element_masks = unique.reshape(-1, *masks.shape[1:]).contiguous()
        blocks[partial] = inverse.to(torch.int32)
    return BlockSparseMask(blocks, element_masks, tuple(block_size), seqlen_q, seqlen_k)


def _elem_indices(where, block_size, device):
    bm, bn = block_size
    rows = where[:, 2, None, None] * bm + torch.arange(bm, device=device)[None, :, None]
    cols = where[:, 3, None, None] * bn + torch.arange(bn, device=device)[None, None, :]
    return rows, cols


def from_mask_mod(mask_mod: Callable, B: Optional[int], H: Optional[int], seqlen_q: int, seqlen_k: int,
                  block_size=DEFAULT_BLOCK_SIZE, device="cpu", rows_per_chunk=None):
    """Like FlexAttention's create_block_mask: mask_mod(b, h, q_idx, kv_idx) -> bool, written with
    broadcasting tensor ops (it is called on index tensors of shapes (B,1,1,1), (1,H,1,1),
    (1,1,rows,1), (1,1,1,cols)). B or H None means the mask does not depend on it. Blocks where it
    is all False are empty, all True full, otherwise partial with their element mask stored.
    Evaluates the predicate over the whole grid in chunks of block rows (O(L·S) work, O(chunk) memory)."""
    bm, bn, nbm, nbn = _block_grid(seqlen_q, seqlen_k, block_size, device)
    Bp, Hp = B or 1, H or 1
    b = torch.arange(Bp, device=device).view(-1, 1, 1, 1)
    h = torch.arange(Hp, device=device).view(1, -1, 1, 1)
    kv = torch.arange(nbn * bn, device=device).view(1, 1, 1, -1)
    valid_kv = kv < seqlen_k
    any_ = torch.zeros(Bp, Hp, nbm, nbn, dtype=torch.bool, device=device)
    all_ = torch.zeros_like(any_)
    chunk = rows_per_chunk or max(1, (1 << 24) // max(1, Bp * Hp * nbn * bn * bm))
    for i0 in range(0, nbm, chunk):
        i1 = min(nbm, i0 + chunk)
        q = torch.arange(i0 * bm, i1 * bm, device=device).view(1, 1, -1, 1)
        valid = (q < seqlen_q) & valid_kv
        m = torch.broadcast_to(mask_mod(b, h, q, kv).bool(), (Bp, Hp, q.shape[2], kv.shape[3]))
        on = (m & valid).view(Bp, Hp, i1 - i0, bm, nbn, bn)
        off = (~m & valid).view(Bp, Hp, i1 - i0, bm, nbn, bn)
        any_[:, :, i0:i1] = on.any(dim=5).any(dim=3)
        all_[:, :, i0:i1] = ~off.any(dim=5).any(dim=3)

    def elem_of(where):
        rows, cols = _elem_indices(where, (bm, bn), device)
        return mask_mod(where[:, 0, None, None], where[:, 1, None, None], rows, cols).bool() & \
            (rows < seqlen_q) & (cols < seqlen_k) | (rows >= seqlen_q) | (cols >= seqlen_k)

    return _finish(any_, all_, elem_of, seqlen_q, seqlen_k, (bm, bn), device)


def _band_blocks(seqlen_q, seqlen_k, block_size, left, right, bottom_right, device):
    """Block classification of the band i + diag - left <= j <= i + diag + right, in closed form."""
    bm, bn, nbm, nbn = _block_grid(seqlen_q, seqlen_k, block_size, device)
    diag = seqlen_k - seqlen_q if bottom_right else 0
    r0 = torch.arange(nbm, device=device).view(-1, 1) * bm
    r1 = torch.clamp(r0 + bm, max=seqlen_q) - 1  # last valid row
    c0 = torch.arange(nbn, device=device).view(1, -1) * bn
    c1 = torch.clamp(c0 + bn, max=seqlen_k) - 1
    inf = 1 << 62
    lo = lambda i: i + diag - left if left >= 0 else torch.full_like(i, -inf)  # noqa: E731
    hi = lambda i: i + diag + right if right >= 0 else torch.full_like(i, inf)  # noqa: E731
    # Rows' visible ranges move right by one per row, so their union over the block's rows is one
    # interval [lo(r0), hi(r1)]: the block meets the band iff that interval meets [c0, c1]. It is
    # full iff every row's range covers [c0, c1]: the latest start lo(r1) and the earliest end hi(r0).
    kept = (lo(r0) <= c1) & (hi(r1) >= c0)
    full = (lo(r1) <= c0) & (hi(r0) >= c1)
    kept, full = kept.view(1, 1, nbm, nbn), full.view(1, 1, nbm, nbn)

    def elem_of(where):
        rows, cols = _elem_indices(where, (bm, bn), device)
        ok = torch.ones(rows.shape[0], bm, bn, dtype=torch.bool, device=device)
        if left >= 0:
            ok &= cols >= rows + diag - left
        if right >= 0:
            ok &= cols <= rows + diag + right
        return ok | (rows >= seqlen_q) | (cols >= seqlen_k)

    return kept, full, elem_of


def causal_block_mask(seqlen_q, seqlen_k, block_size=DEFAULT_BLOCK_SIZE, bottom_right=False, device="cpu"):
    """Causal mask as blocks: blocks above the diagonal empty, below full, on it partial."""
    kept, full, elem_of = _band_blocks(seqlen_q, seqlen_k, block_size, -1, 0, bottom_right, device)
    return _finish(kept, full, elem_of, seqlen_q, seqlen_k, block_size, device)


def sliding_window_block_mask(seqlen_q, seqlen_k, window=(1024, 0), block_size=DEFAULT_BLOCK_SIZE,
                              bottom_right=False, device="cpu"):
    """Query i sees keys i + diag - left .. i + diag + right (-1 = unbounded; (left, 0) is causal
    sliding-window attention). Only the O(L · (left + right) / block²) blocks meeting the band are kept."""
    left, right = window
    kept, full, elem_of = _band_blocks(seqlen_q, seqlen_k, block_size, left, right, bottom_right, device)
    return _finish(kept, full, elem_of, seqlen_q, seqlen_k, block_size, device)


def strided_block_mask(seqlen_q, seqlen_k, stride, local_blocks=1, block_size=DEFAULT_BLOCK_SIZE, causal=False,
                       device="cpu"):
    """Sparse-Transformer-style fixed pattern (Child et al. 2019), at block granularity: each query
    block sees the `local_blocks` key blocks nearest the diagonal and every `stride`-th key block
    (the "summary" columns (j + 1) % stride == 0). With causal, keys after the query are removed."""
    bm, bn, nbm, nbn = _block_grid(seqlen_q, seqlen_k, block_size, device)
    i = torch.arange(nbm, device=device).view(-1, 1)
    j = torch.arange(nbn, device=device).view(1, -1)
    kept = ((i - j).abs() < local_blocks) | ((j + 1) % stride == 0)
    return _with_causal(kept, causal, seqlen_q, seqlen_k, (bm, bn), device)


def butterfly_block_mask(seqlen_q, seqlen_k, block_size=DEFAULT_BLOCK_SIZE, causal=False, device="cpu"):
    """Flat butterfly pattern (Pixelated Butterfly, Chen et al. 2021; used for block-sparse
    FlashAttention in Dao et al. 2022): block (i, j) is kept iff i == j or i XOR j is a power of
    two — O(log n) blocks per row, every pair of blocks connected within log n hops."""
    bm, bn, nbm, nbn = _block_grid(seqlen_q, seqlen_k, block_size, device)
    x = torch.arange(nbm, device=device).view(-1, 1) ^ torch.arange(nbn, device=device).view(1, -1)
    kept = (x & (x - 1)) == 0  # 0 or a power of two
    return _with_causal(kept, causal, seqlen_q, seqlen_k, (bm, bn), device)


def _with_causal(kept, causal, seqlen_q, seqlen_k, block_size, device):
    kept = kept.view(1, 1, *kept.shape)
    if not causal:
        return BlockSparseMask.from_blocks(kept, seqlen_q, seqlen_k, block_size)
    c_kept, c_full, elem_of = _band_blocks(seqlen_q, seqlen_k, block_size, -1, 0, False, device)
    return _finish(kept & c_kept, c_full, elem_of, seqlen_q, seqlen_k, block_size, device)


def from_flex_block_mask(block_mask):
    """Converts a FlexAttention BlockMask (torch.nn.attention.flex_attention.create_block_mask):
    its full blocks stay full; its partial blocks get element masks from its mask_mod, evaluated on
    those blocks only."""
    L, S = block_mask.seq_lengths
    bm, bn = block_mask.BLOCK_SIZE
    device = block_mask.kv_num_blocks.device
    nbm, nbn = math.ceil(L / bm), math.ceil(S / bn)

    def dense(num, indices):  # (B, H, nbm) counts + (B, H, nbm, max) indices -> bool (B, H, nbm, nbn)
        out = torch.zeros(*num.shape, nbn + 1, dtype=torch.bool, device=device)
        valid = torch.arange(indices.shape[-1], device=device) < num[..., None]
        out.scatter_(-1, torch.where(valid, indices.long(), nbn), True)
        return out[..., :nbm, :nbn]

    partial = dense(block_mask.kv_num_blocks, block_mask.kv_indices)
    if block_mask.full_kv_num_blocks is not None:
        full = dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    else:
        full = torch.zeros_like(partial)
    mask_mod = block_mask.mask_mod

    def elem_of(where):
        rows, cols = _elem_indices(where, (bm, bn), device)
        shape = (where.shape[0], bm, bn)
        b = where[:, 0, None, None].expand(shape).reshape(-1)
        h = where[:, 1, None, None].expand(shape).reshape(-1)
        q = rows.clamp(max=L - 1).expand(shape).reshape(-1)
        kv = cols.clamp(max=S - 1).expand(shape).reshape(-1)
        # FlexAttention mask_mods are written for scalar indices: vmap over every element at once
        out = torch.vmap(mask_mod)(b, h, q, kv).reshape(shape).bool()
        return out | (rows >= L) | (cols >= S)

    return _finish(partial | full, full, elem_of, L, S, (bm, bn), device)


# ---------------------------------------------------------------------------------------------

def block_sparse_attention(q, k, v, block_mask, *, block_size=None, attn_mask=None, dropout_p=0.0, is_causal=False,
                           scale=None, enable_gqa=False, window_size=None, softcap=0.0, alibi_slopes=None,
                           deterministic=None, layout="bhsd"):
    """Attention over the kept blocks of block_mask only, forward and backward (CPU and CUDA).

    q, k, v: SDPA layout (..., H, L, D) with layout="bhsd" (default), or flash-attn layout
    (B, L, H, D) with layout="bshd" (the result then has that layout too).
    block_mask: a BlockSparseMask (builders in flashattn_ext.sparse), or a bool tensor
    (B | 1, H | 1, ceil(L / block_m), ceil(S / block_n)) of kept blocks, with block_size
    (default (128, 128)). Other arguments as in flashattn_ext.scaled_dot_product_attention
    (is_causal / window_size aligned top-left) and combine with the block mask. Query rows that see
    no key give 0 (gradient 0)."""
    from ._api import _attention
    fn = "block_sparse_attention"
    if layout not in ("bhsd", "bshd"):
        raise AttentionValueError(f"flashattn_ext.{fn}: layout must be 'bhsd' or 'bshd', got {layout!r}")
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(block_mask, BlockSparseMask):
        if block_size is not None and tuple(block_size) != block_mask.block_size:
            raise AttentionValueError(f"flashattn_ext.{fn}: block_size {tuple(block_size)} differs from the "
                                      f"BlockSparseMask's {block_mask.block_size}")
        if (block_mask.seqlen_q, block_mask.seqlen_k) != (q.shape[-2], k.shape[-2]):
            raise AttentionValueError(f"flashattn_ext.{fn}: block_mask was built for (L, S) = "
                                      f"{(block_mask.seqlen_q, block_mask.seqlen_k)}, got {(q.shape[-2], k.shape[-2])}")
        blocks, elem, bm, bn = block_mask.op_args()
    else:
        blocks, elem = block_mask, None
        bm, bn = block_size or DEFAULT_BLOCK_SIZE
    out = _attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap, alibi_slopes,
                     deterministic, block_mask=blocks, block_elem_masks=elem, block_size=(bm, bn), fn=fn)
    return out.transpose(1, 2) if layout == "bshd" else out
