"""Decode attention for grouped-query models without copying the KV cache per query head.

transformers' `sdpa` attention hands SDPA the grouped KV heads directly (`enable_gqa`) only when
there is no attention mask; with one (every padded batch: generation of left-padded prompts) it
first expands K and V to one copy per query head (`repeat_kv`). For a decode step of the
Llama-3.1-8B shape (8 KV heads, 32 query heads) at batch 128 and 1000 cached tokens that writes
and reads back 4x the cache, ~67 GB a step, against 17 GB for the cache itself.

One query token per row needs no causal order among the query heads of a group, so a decode step
can run as SDPA over the KV heads with the group's query heads in the query-length slot:
(batch, kv_heads, group, head_dim) against the (batch, kv_heads, cached, head_dim) cache, the
padding mask broadcast over the group. Same kernel, same fp32 softmax, no copy. Prefill (more
than one query token) and everything else goes to transformers' own `sdpa` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "quantgate_grouped_sdpa"


def grouped_decode_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    n, heads, q_len, dim = query.shape
    mask = attention_mask
    # Only a plain decode step of a grouped-query layer, with a (n, 1, 1, kv) mask or none.
    plain = (q_len == 1 and groups > 1 and not dropout and kwargs.get("position_bias") is None
             and not kwargs.get("output_attentions") and (mask is None or mask.shape[-2] == 1))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # query head h uses KV head h // groups (transformers' repeat_kv order)
    q = query.reshape(n, key.shape[1], groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling, is_causal=False)
    return out.reshape(n, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_grouped_decode_attention(model: torch.nn.Module) -> bool:
    """Switch a grouped-query model that runs transformers' `sdpa` to the attention above.
    Returns whether it was switched (models with one KV head per query head keep theirs)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if not heads or not kv_heads or heads == kv_heads:
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers: keep sdpa
        return False
    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks sdpa gets
    set_impl = getattr(model, "set_attn_implementation", None)
    if set_impl is None:
        return False
    try:
        set_impl(NAME)
    except (ValueError, ImportError, NotImplementedError):  # a model class that refuses custom attention keeps sdpa
        set_impl("sdpa")
        return False
    return True
