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

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

# The compiled core: loading it registers torch.ops.flashattn_ext.* and their fake kernels. Where
# torch or the built extension is missing the package still imports, so the pure-NumPy parts
# (flashattn_ext.iolab) work; the attention API then raises the import error on first use.
try:
    import torch  # noqa: F401  (loads libtorch before the extension)
    from . import _C  # noqa: F401
    from . import _fake  # noqa: F401
    _core_error = None
except ImportError as e:  # no torch, or the extension is not built
    _C = None
    _core_error = e

# Public names, imported on first use (PEP 562).
_LAZY = {
    "scaled_dot_product_attention": "._api",
    "flash_attn_func": "._api",
    "patch_sdpa": "._patch",
    "block_sparse_attention": ".sparse",
    "BlockSparseMask": ".sparse",
    "flash_attn_varlen_func": "._varlen",
    "flash_attn_varlen_qkvpacked_func": "._varlen",
    "flash_attn_varlen_kvpacked_func": "._varlen",
    "flash_attn_qkvpacked_func": "._varlen",
    "flash_attn_kvpacked_func": "._varlen",
    "flash_attn_with_kvcache": "._kvcache",
}
_SUBMODULES = ("sparse", "distributed", "iolab", "testing")


def build_info():
    """What this build contains: devices, dtypes, features, CUDA archs and head dims."""
    _require_core()
    return dict(_C.build_info())


def _require_core():
    if _core_error is not None:
        raise ImportError(f"flashattn_ext: the compiled extension could not be loaded ({_core_error}); build it "
                          f"with `pip install --no-build-isolation -e .` next to an installed torch") from _core_error


def __getattr__(name):
    import importlib
    if name in _LAZY:
        _require_core()
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["scaled_dot_product_attention", "flash_attn_func", "block_sparse_attention", "BlockSparseMask", "sparse",
           "patch_sdpa", "build_info", "__version__"]
__all__ += ["flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
            "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_with_kvcache"]
