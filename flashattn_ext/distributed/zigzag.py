"""Zigzag sharding for causal load balance: the sequence is cut into 2W equal chunks and rank r
holds chunks r and 2W-1-r (an early and a late one), so under a causal mask every rank sees the
same number of visible (query, key) pairs."""

import torch
import torch.distributed as dist

from . import _comm


def _chunks_of(x: torch.Tensor, dim: int, world: int, fn: str):
    n = x.size(dim)
    if n % (2 * world):
        raise ValueError(f"flashattn_ext.distributed.{fn}: the sequence length along dim {dim} ({n}) must be a "
                         f"multiple of 2 * world size ({2 * world})")
    return x.chunk(2 * world, dim)


def zigzag_shard(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """This rank's zigzag shard of the full sequence x: chunks r and 2W-1-r concatenated along
    dim (1 for (B, S, H, D), 2 for (B, H, S, D)). Differentiable; no communication."""
    ring = _comm.resolve_group(group)
    if ring.world == 1:
        return x
    chunks = _chunks_of(x, dim, ring.world, "zigzag_shard")
    return torch.cat([chunks[ring.rank], chunks[2 * ring.world - 1 - ring.rank]], dim)


def _reassemble(shards, dim: int, world: int) -> torch.Tensor:
    """Rank w's shard holds chunks w and 2W-1-w: put the 2W chunks back in sequence order."""
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([halves[c][0] for c in range(world)] + [halves[2 * world - 1 - c][1] for c in range(world, 2 * world)], dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, ring):
        x = x.contiguous()
        shards = [torch.empty_like(x) for _ in range(ring.world)]
        dist.all_gather(shards, x, group=ring.group)
        ctx.dim, ctx.ring = dim, ring
        return _reassemble(shards, dim, ring.world)

    @staticmethod
    def backward(ctx, grad):
        # every rank holds the whole sequence: the shard's gradient is the sum over ranks
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.ring.group)
        chunks = grad.chunk(2 * ctx.ring.world, ctx.dim)
        r, w = ctx.ring.rank, ctx.ring.world
        return torch.cat([chunks[r], chunks[2 * w - 1 - r]], ctx.dim), None, None


def zigzag_unshard(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """The full sequence from every rank's zigzag shard (an all-gather; the inverse of
    zigzag_shard). Differentiable: the gradient is summed over ranks (as an all-gather's is)."""
    ring = _comm.resolve_group(group)
    if ring.world == 1:
        return x
    if x.size(dim) % 2:
        raise ValueError(f"flashattn_ext.distributed.zigzag_unshard: a zigzag shard holds two equal chunks, so its "
                         f"length along dim {dim} must be even, got {x.size(dim)}")
    return _Unshard.apply(x, dim, ring)
