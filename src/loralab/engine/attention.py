"""Packed attention: causal SDPA run per example inside a padding-free row, with no dense mask.

transformers handles packed rows by building a dense block-diagonal mask, which sends SDPA to its
slow masked path on the CPU (a packed LoRA step ran ~5x slower than an unmasked one). Here each
example's span, found from the restarting position ids, goes through SDPA's fast `is_causal`
kernel instead; the result is the same attention, computed without the mask.
"""
from __future__ import annotations

PACKED_ATTENTION = "loralab_packed_sdpa"
_registered = False


def _segments(position_ids) -> list[tuple[int, int]]:
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [int(position_ids.shape[-1])]
    return list(zip(starts, ends))


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for one packed row (batch 1) or any unpadded batch; falls back to SDPA otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    spans = _segments(position_ids)
    if len(spans) == 1:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    if query.device.type == "cpu" and not (dropout and module.training) and query.shape[1] % key.shape[1] == 0:
        from loralab.engine.fastpath import packed_attention

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return packed_attention(query, key, value, spans, scale), None
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                               dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
        for a, b in spans
    ]
    return torch.cat(outputs, dim=1), None  # outputs are [batch, tokens, heads, dim]


def register_packed_attention() -> str:
    """Register the implementation with transformers (no mask is built for it) and return its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
        _registered = True
    return PACKED_ATTENTION
