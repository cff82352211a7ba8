"""flashattn_ext: FlashAttention as a PyTorch C++/CUDA extension.

Exact attention computed tile by tile with an online softmax, saving only the output and the
log-sum-exp and recomputing the probabilities in the backward pass; a drop-in for
torch.nn.functional.scaled_dot_product_attention.

    import flashattn_ext
    out = flashattn_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = flashattn_ext.flash_attn_func(q, k, v, causal=True)        # (B, S, H, D) layout
    with flashattn_ext.patch_sdpa():                                   # route torch's SDPA here
        model(x)
    flashattn_ext.distributed.ring_attention(q, k, v, causal=True)    # context parallel (imported lazily)
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.flashattn_ext.*)
from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from . import sparse
from ._api import flash_attn_func, scaled_dot_product_attention
from ._patch import patch_sdpa
from .sparse import BlockSparseMask, block_sparse_attention

__version__ = "0.1.0"


def build_info():
    """What this build contains: devices, dtypes, features, CUDA archs and head dims."""
    return dict(_C.build_info())


def __getattr__(name):
    # flashattn_ext.distributed is imported on first use, so `import flashattn_ext` stays light
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["scaled_dot_product_attention", "flash_attn_func", "block_sparse_attention", "BlockSparseMask", "sparse",
           "patch_sdpa", "build_info", "__version__"]
