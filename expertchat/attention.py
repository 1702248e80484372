"""Decode-step attention for CPUs: grouped-query matmuls instead of SDPA for the few new positions of a step.

A profile of the dialogue stage's decode step (SmolLM2-135M, bf16, batch 32, 400 cached positions, this 2-core
CPU) put 83% of the step in ``aten::_scaled_dot_product_flash_attention_for_cpu`` (5.1 ms per layer call), and
only 13% in the linear layers. PyTorch's CPU SDPA kernel is built for long query blocks; a decode step has one
query per row, and grouped-query models (SmolLM2: 9 query heads on 3 KV heads; Llama-3-8B, Mixtral: 32 on 8)
first have their KV heads repeated (a copy of the whole cache per layer and step). :func:`grouped_attention`
instead views the ``g`` query heads of each KV head as ``g`` rows of one matrix and runs two batched matmuls
against the un-repeated cache (softmax in float32): 0.45 ms for the same call, 10-14x faster, the same values
to bf16 rounding (``experiments/benchmarks`` and issue 13 give the figures).

Steps of at most ``MAX_QUERY`` new positions per row take this path (decode steps, contrastive search's
candidates, the judge's short suffixes); longer ones (prefill, training forwards) and anything it does not cover
(dropout, soft-capping, attention sinks, no mask on several positions) go to transformers' SDPA as before.

Registered with transformers as ``attn_implementation="grouped_decode"`` (:func:`register`), the default for
models loaded on a CPU (``<role>.attn_implementation``, :func:`expertchat.models.load_model`).
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "grouped_decode"
MAX_QUERY = 32  # new positions per row up to which the grouped path runs (its scores are [B, H, q, L] floats)


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for transformers' ``AttentionInterface``.

    Args:
        query: ``[B, H, q, D]``; key, value: ``[B, H_kv, L, D]`` (``H`` a multiple of ``H_kv``).
        attention_mask: boolean ``[B, 1, q, L]`` (True: attend), as ``sdpa_mask`` makes it, or None (no mask
            needed: one new position per row attending to everything).
        scaling: the score scale (default ``D ** -0.5``).

    Returns:
        ``([B, q, H, D], None)``, as transformers' attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q, d = query.shape
    h_kv = key.shape[1]
    if (q > MAX_QUERY or (attention_mask is None and q > 1) or (dropout and module.training) or h % h_kv
            or kwargs.get("softcap") or kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None
            or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    g = h // h_kv
    scale = d ** -0.5 if scaling is None else scaling
    grouped = query.reshape(b, h_kv, g * q, d)  # query head j * g + r attends with KV head j (repeat_kv's order)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # [B, H_kv, g * q, L]
    if attention_mask is not None:
        # the float32 minimum, not -inf: a row with nothing to attend to (a left pad) stays finite, as in eager
        scores = scores.view(b, h_kv, g, q, -1).masked_fill(~attention_mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1).to(value.dtype).view(b, h_kv, g * q, -1)
    out = torch.matmul(probs, value).view(b, h, q, d)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`grouped_attention` (and SDPA's boolean masks) with transformers under :data:`NAME`;
    idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
