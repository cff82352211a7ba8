"""Hugging Face transformers: flashattn_ext as an attention implementation of its own.

    import flashattn_ext.integrations.transformers as fa_hf
    fa_hf.register()                                     # once; returns the name
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=fa_hf.NAME)
    # or model.set_attn_implementation(fa_hf.NAME)

Registered through transformers' AttentionInterface together with its sdpa-style mask function
(AttentionMaskInterface): without a mask function transformers passes mask=None and padding would
be ignored. The name has no "flash" in it: transformers reads such names as requests for a hub
kernel. GQA runs without repeat_kv copies (enable_gqa), softcap is our native option, a causal
call without a mask is our causal band (no dense mask), scaling and dropout are HF's.
transformers is imported only here, on first use.
"""

NAME = "tiled_sdpa"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, **kwargs):
    """transformers' attention signature: query (B, H, L, D), key/value (B, Hk, S, D) ->
    (attn_output (B, L, H, Dv), None)."""
    import torch

    from .._api import scaled_dot_product_attention

    if position_bias is not None or kwargs.get("output_attentions", False):
        # T5-style learned position biases / attention weights: transformers' own sdpa path.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    q_length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_length:  # as transformers' sdpa path: the first q_length keys
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    softcap = kwargs.get("softcap") or 0.0
    window_size = None
    sliding_window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if sliding_window and attention_mask is None:
        # With a mask, the mask function already wrote the window into it (positions from the cache).
        window_size = (int(sliding_window) - 1, 0 if causal else -1)
    gqa = key.shape[1] != query.shape[1]
    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                       dropout_p=dropout if module.training else 0.0, is_causal=causal,
                                       scale=scaling, enable_gqa=gqa, window_size=window_size,
                                       softcap=float(softcap))
    return out.transpose(1, 2).contiguous(), None


def register(name=NAME):
    """Registers the attention function and its mask function under `name`; returns it."""
    if "flash" in name.lower():
        raise ValueError(f"flashattn_ext: the attention implementation name {name!r} must not contain 'flash' "
                         "(transformers treats such names as hub kernels)")
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
