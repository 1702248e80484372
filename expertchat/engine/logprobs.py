"""Completion log-probabilities with each distinct prompt encoded once, for online DPO's forwards.

Online DPO (TRL's ``OnlineDPOTrainer``) samples ``k`` completions per prompt and, for the policy (with gradient)
and the reference (without), computes log p(completion token | prompt, earlier completion tokens) by running the
model over every ``[prompt ; completion]`` row: each prompt is encoded ``k`` times, and the logits (and their
log-softmax over the whole vocabulary) are computed at every prompt position, where only the last one is used.

:func:`completion_logprobs` returns the same numbers (up to float rounding) with the prompt encoded ONCE per
distinct prompt: a first forward over the ``B`` distinct prompts keeps their KV cache and the logits of the last
prompt position; the cache is repeated to the ``k x B`` rows (``index_select``: gradients flow back into the
prompt's one encoding, summed over its completions); a second forward runs the completions on it. The positions
are those of the concatenated row (the cache's length, as in a single forward over ``[prompt ; completion]``),
and the attention mask is the row's, so left padding is treated the same way. The log-softmax runs over the ``C``
completion positions only.

Cost, for ``k`` = 2 samples of C tokens after P prompt tokens: ``B (P + 2C)`` token positions through the body
instead of ``2B (P + C)``, and ``2BC`` logits instead of ``2B (P + C)``; with P = 120 and C = 32 about 0.58x the
body and 0.21x the head. Measured on SmolLM2-135M (``experiments/benchmarks/bench_training.py``): see its
``project_split``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from expertchat.engine.kvcache import forward_kwargs
from expertchat.engine.prefixcache import distinct

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel


def completion_logprobs(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """``log p(completion_ids[i, t] | prompt i, completion_ids[i, :t])`` for every row and position.

    Args:
        model: a causal LM whose forward takes ``attention_mask``, ``use_cache`` and a cache (``cache``, or
            ``past_key_values`` before transformers 5.25) and returns it (every transformers ``*ForCausalLM``;
            PEFT-wrapped too); ``logits_to_keep`` is used where the forward takes it.
        prompt_ids, prompt_mask: ``[N, P]``, left-padded (mask 0 on padding); rows equal in both (TRL's layout:
            the B prompts, then the same B again) are encoded once.
        completion_ids, completion_mask: ``[N, C]``, right-padded. The mask is only the attention mask of the
            completion positions: padded positions still get a (meaningless) log-prob, as in TRL.

    Returns:
        ``[N, C]`` log-probabilities in the logits' dtype, differentiable when the model has gradients on.

    Raises:
        ValueError: no prompt tokens. RuntimeError: the model's forward ignored the cache it was given.
    """
    c = completion_ids.shape[1]
    if prompt_ids.shape[1] == 0:
        raise ValueError("completion_logprobs() needs at least one prompt token per row")
    firsts, rows = distinct([tuple(r) for r in torch.cat((prompt_ids, prompt_mask), 1).tolist()])
    cache_arg, has_logits_to_keep = forward_kwargs(model)
    first = model(input_ids=prompt_ids[firsts], attention_mask=prompt_mask[firsts], use_cache=True,
                  **({"logits_to_keep": 1} if has_logits_to_keep else {}))
    index = torch.tensor(rows, device=prompt_ids.device)
    logits = first.logits[:, -1:].index_select(0, index)  # [N, 1, V]: the first completion token's logits
    if c > 1:
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        cache.reorder_cache(index)
        mask = torch.cat((prompt_mask, completion_mask[:, :-1]), dim=1)
        rest = model(input_ids=completion_ids[:, :-1], attention_mask=mask, use_cache=True, **{cache_arg: cache})
        if cache.get_seq_length() != mask.shape[1]:  # a forward that dropped the cache argument: wrong numbers
            raise RuntimeError(f"completion_logprobs(): {type(model).__name__}'s forward did not use the KV cache "
                               f"passed as `{cache_arg}` (its length is {cache.get_seq_length()}, not {mask.shape[1]})")
        logits = torch.cat((logits, rest.logits), dim=1)  # [N, C, V]
    return torch.take_along_dim(logits.log_softmax(dim=-1), completion_ids.unsqueeze(-1), dim=2).squeeze(-1)
