"""Context parallelism on torch.distributed: one sequence sharded across ranks.

    from flashattn_ext.distributed import ring_attention, ulysses_attention, zigzag_shard, zigzag_unshard
    q, k, v = (zigzag_shard(x, dim=1) for x in (q_full, k_full, v_full))    # this rank's shard
    out = ring_attention(q, k, v, causal=True)                              # this rank's output shard

ring_attention: K/V shards travel around the ring, partial results merge exactly through their lse;
ulysses_attention: all-to-all from sequence shards to head shards and back. Both run on our ops
(torch.ops.flashattn_ext.fwd / bwd) over any torch.distributed backend (NCCL, gloo); importing
this module initialises nothing.
"""

from ._comm import count_bytes
from .ring import merge_partial, ring_attention
from .ulysses import ulysses_attention
from .zigzag import zigzag_shard, zigzag_unshard

__all__ = ["ring_attention", "ulysses_attention", "zigzag_shard", "zigzag_unshard", "merge_partial", "count_bytes"]
