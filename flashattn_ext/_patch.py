"""patch_sdpa(): route torch.nn.functional.scaled_dot_product_attention through flashattn_ext, so
nn.MultiheadAttention, nn.TransformerEncoderLayer and third-party models use it unchanged."""

import functools
import threading
import warnings

import torch
import torch.nn.functional as F

from torch.overrides import handle_torch_function, has_torch_function

from ._api import _bottom_right_causal, _sdpa_plain
from ._api import scaled_dot_product_attention as _ours

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_Tensor = torch.Tensor
_is_batched = torch._C._functorch.is_batchedtensor
_is_compiling = torch.compiler.is_compiling
_cpu_flash = torch._C._get_flash_sdp_enabled
_grad_enabled = torch.is_grad_enabled
_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def _fused_backends_enabled(query):
    """Whether sdpa_kernel()'s current backend set has a fused backend we stand in for: torch's
    flash kernel on CPU; flash, memory-efficient or cuDNN attention on CUDA."""
    if torch._C._get_flash_sdp_enabled():
        return True
    device = getattr(query, "device", None)
    return device is not None and device.type == "cuda" and (
        torch._C._get_mem_efficient_sdp_enabled() or torch._C._get_cudnn_sdp_enabled())


def _tracing_tensor_types():
    # torch.compile traces with these wrappers: they reach our op, whose fake kernel handles them.
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return (torch.Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)
_lock = threading.Lock()
_warned = set()


@functools.lru_cache(maxsize=None)
def _build_info():
    from . import _C
    return _C.build_info()


def _cuda_built():
    return bool(_build_info()["cuda"])


def unsupported_reason(query, key, value, attn_mask=None):
    """Why flashattn_ext cannot take this SDPA call (None if it can). Input that SDPA itself
    rejects is not 'unsupported': the extension raises its own error for it."""
    tensors = [t for t in (query, key, value, attn_mask) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.is_nested:
            return "nested (jagged) tensors"
        if type(t) not in _tracing_tensor_types():
            return f"tensor subclass {type(t).__name__}"
    device = query.device if isinstance(query, torch.Tensor) else None
    if device is not None and device.type not in ("cpu", "cuda"):
        return f"device {device.type}"
    if device is not None and device.type == "cuda" and not _cuda_built():
        return "this build of flashattn_ext has no CUDA kernels"
    if isinstance(query, torch.Tensor) and query.dtype not in _DTYPES:
        return f"dtype {query.dtype}"
    if device is not None and device.type == "cuda" and isinstance(value, torch.Tensor) and \
            max(query.shape[-1], value.shape[-1]) > _build_info()["cuda_max_headdim"]:
        return f"head dim above {_build_info()['cuda_max_headdim']} on CUDA"
    if not torch.compiler.is_compiling() and isinstance(query, torch.Tensor) and \
            torch._C._functorch.is_batchedtensor(query):
        return "vmap (functorch batched tensors)"
    return None


class patch_sdpa:
    """Routes torch.nn.functional.scaled_dot_product_attention through flashattn_ext.

    Installed at construction; undone by .undo() or at the end of a `with` block:

        with flashattn_ext.patch_sdpa():
            loss = model(x).sum()
        handle = flashattn_ext.patch_sdpa(); ...; handle.undo()

    A call the extension cannot take (other devices, nested tensors, vmap, ...) goes to torch's
    own SDPA with a one-time warning saying why. `calls` and `fallbacks` count what happened.
    Under sdpa_kernel([...]) without a fused backend (CPU: FLASH_ATTENTION; CUDA: FLASH, EFFICIENT
    or CUDNN) calls go to torch, which serves (or refuses) them as it would unpatched. torch's
    CausalBias masks become our causal band (top-left / bottom-right).

    Training with activation checkpointing: the backward recomputes the forward, so the patch must
    still be installed then -- install it once for the whole loop (handle = patch_sdpa(), then
    handle.undo()); undo() warns when checkpointed calls ran under it. undo() also warns when
    nothing called SDPA (torch's MHA fast path, need_weights=True), unless warn_if_unused=False.
    """

    def __init__(self, *, warn_if_unused=True):
        self.calls = 0
        self.fallbacks = {}
        self.checkpointed_calls = 0  # calls under non-reentrant activation checkpointing
        self._warn_if_unused = warn_if_unused
        self._original = F.scaled_dot_product_attention
        self._active = True
        patch = self

        def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         scale=None, enable_gqa=False):
            # Fast path, the common case: plain CPU tensors of a dtype we take (what
            # unsupported_reason would accept, decided in a few attribute reads).
            if (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor
                    and (attn_mask is None or type(attn_mask) is _Tensor)
                    and query.is_cpu and query.dtype in _DTYPES
                    and not (query.is_nested or key.is_nested or value.is_nested)
                    and (attn_mask is None or not attn_mask.is_nested)):
                compiling = _is_compiling()
                if compiling or (_cpu_flash() and not _is_batched(query)):
                    patch.calls += 1
                    if not compiling and _grad_enabled() and _saved_tensors_hooks(False) is not None:
                        patch._note_hooks()
                    return _sdpa_plain(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            if not torch.compiler.is_compiling() and not _fused_backends_enabled(query):
                # sdpa_kernel([...]) left out every fused backend this call would stand in for:
                # torch serves it (or raises, as it does without the patch).
                why = "the sdpa_kernel() backend selection (no fused backend enabled)"
                patch.fallbacks[why] = patch.fallbacks.get(why, 0) + 1
                return patch._original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            if attn_mask is not None and type(attn_mask) not in _tracing_tensor_types():
                from torch.nn.attention.bias import CausalBias, CausalVariant
                if isinstance(attn_mask, CausalBias):
                    # torch's causal masks: our causal band, top-left or bottom-right aligned.
                    if is_causal:
                        raise ValueError("CausalBias should not be used with causal=True")
                    if unsupported_reason(query, key, value) is None:
                        patch.calls += 1
                        if attn_mask.variant == CausalVariant.UPPER_LEFT or attn_mask.seq_len_q == attn_mask.seq_len_kv:
                            return _ours(query, key, value, None, dropout_p, True, scale, enable_gqa)
                        return _bottom_right_causal(query, key, value, dropout_p, scale, enable_gqa)
            # Any other tensor subclass with a __torch_function__ override takes the call over, as it
            # would for torch's function (then calls back into this one with plain tensors).
            if has_torch_function((query, key, value, attn_mask)):
                return handle_torch_function(scaled_dot_product_attention, (query, key, value, attn_mask), query, key,
                                             value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
            why = unsupported_reason(query, key, value, attn_mask)
            if why is None:
                patch.calls += 1
                if not torch.compiler.is_compiling() and _grad_enabled() and _saved_tensors_hooks(False) is not None:
                    patch._note_hooks()
                return _ours(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
            patch.fallbacks[why] = patch.fallbacks.get(why, 0) + 1
            with _lock:
                first = why not in _warned
                _warned.add(why)
            if first:
                warnings.warn(f"flashattn_ext.patch_sdpa: falling back to torch's scaled_dot_product_attention "
                              f"for {why}", stacklevel=2)
            return patch._original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                   is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

        scaled_dot_product_attention.__doc__ = _ours.__doc__
        scaled_dot_product_attention.__wrapped_by_flashattn_ext__ = True
        self._patched = scaled_dot_product_attention
        F.scaled_dot_product_attention = scaled_dot_product_attention

    def _note_hooks(self):
        # Saved-tensor hooks around a call: non-reentrant activation checkpointing, whose backward
        # recomputes this forward later -- after the patch may be gone.
        hooks = _saved_tensors_hooks(False)
        if hooks and any("checkpoint" in getattr(h, "__qualname__", "") for h in hooks):
            self.checkpointed_calls += 1

    def undo(self):
        """Restore torch's function (idempotent)."""
        if self._active:
            if self.checkpointed_calls:
                warnings.warn(
                    f"flashattn_ext.patch_sdpa: {self.checkpointed_calls} call(s) ran under activation checkpointing; "
                    f"their backward recomputes the forward after this patch is undone, with torch's SDPA (a "
                    f"CheckpointError, or a silent mix of kernels). Keep the patch installed until the backward is "
                    f"done: handle = flashattn_ext.patch_sdpa() once for the whole training loop, handle.undo() at "
                    f"the end", stacklevel=2)
            if self.calls == 0 and not self.fallbacks and self._warn_if_unused:
                warnings.warn(
                    "flashattn_ext.patch_sdpa: scaled_dot_product_attention was not called while the patch was "
                    "installed. nn.MultiheadAttention with need_weights=True, and nn.TransformerEncoderLayer / "
                    "MultiheadAttention's fast path (eval mode under no_grad) do not call it; turn the fast path off "
                    "with torch.backends.mha.set_fastpath_enabled(False), pass need_weights=False", stacklevel=2)
            if F.scaled_dot_product_attention is self._patched:
                F.scaled_dot_product_attention = self._original
            else:
                warnings.warn("flashattn_ext.patch_sdpa.undo: scaled_dot_product_attention was re-patched by "
                              "someone else since; leaving it as it is")
            self._active = False

    restore = undo

    @property
    def active(self):
        return self._active

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False
