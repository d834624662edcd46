"""The one attention entry point of the model: dense SDPA, or InfLLM v2 sparse attention for long contexts.

Queries are the last Tq positions of the Tk keys (prefill: Tq == Tk; decode: Tq == 1), always causal. The same
weights serve both modes, as in MiniCPM4: below ``sparse_config["dense_len"]`` keys the layer runs dense.
Padded batches past dense_len run sparse too, on their unpadded sequences (varlen), as the released code does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def uses_sparse(sparse_config: dict[str, Any] | None, num_keys: int) -> bool:
    return sparse_config is not None and num_keys >= sparse_config["dense_len"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparse_config: dict[str, Any] | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], attention_mask [B, Tk] (1 = real token) -> [B, Hq, Tq, D]."""
    Tq, Tk = q.shape[2], k.shape[2]
    if Tk < Tq:
        raise ValueError(f"attention: {Tq} queries but only {Tk} keys; queries must be the last Tk positions")
    if uses_sparse(sparse_config, Tk):
        # Imported here so the dense model works (and imports) without the kernels package.
        from kernels.infllmv2 import infllmv2_attention

        return infllmv2_attention(q, k, v, sparse_config, attention_mask=attention_mask)
    gqa = q.shape[1] != k.shape[1]
    if attention_mask is None:
        # Decode sees every key; prefill is the plain causal triangle. Two calls rather than is_causal=Tq > 1, so
        # that under torch.compile with a dynamic query length the flag stays a Python bool.
        if Tq == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        if Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = causal_mask(Tq, Tk, q.device)
    else:
        # A padded query would see no key at all (softmax over nothing is NaN); letting it see itself keeps its
        # output finite, and no real query ever attends to a padded key.
        query_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        key_pos = torch.arange(Tk, device=q.device)[None, :]
        mask = ((key_pos <= query_pos) & attention_mask.bool()[:, None, None, :]) | (key_pos == query_pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def causal_mask(Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    """[Tq, Tk] boolean, True where query i (absolute position Tk - Tq + i) may see key j."""
    query_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    return torch.arange(Tk, device=device)[None, :] <= query_pos
