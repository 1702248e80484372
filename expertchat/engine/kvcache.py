"""The KV-cache machinery shared by the decode loop (``engine/generation.py``) and the judge (``judging/judge.py``).

* :class:`PreallocatedLayer` / :func:`make_cache`: a full-attention cache layer written in place into a buffer
  allocated once for a whole turn (transformers' ``DynamicLayer`` concatenates, copying the layer every step);
* :func:`forward_kwargs` / :func:`positions_from_mask`: how to call a model's forward with a cache under left
  padding;
* :class:`CacheRunner`: the forwards of one batch of left-padded prompts with their cache, mask and positions
  (the decode loop's prefill and steps);
* :class:`PrefixBatch`: a batch of prefixes run once, with short suffixes run on top of the kept cache and
  cropped off again (the judge's categories, calibration and WIM on one encoding of each rated turn).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from expertchat.engine.models import LoadedModel

class PreallocatedLayer(DynamicLayer):
    """A full-attention KV cache layer that writes into a buffer allocated once for the whole turn.

    ``keys`` / ``values`` are views of the buffer up to the current length, so the model sees exactly what a
    ``DynamicLayer`` would give it, without the per-step ``torch.cat`` (a copy of the whole layer cache into
    new memory). The buffer grows by doubling if a forward ever goes past ``capacity``.

    Args:
        capacity: number of positions to allocate (prompt length + new tokens).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the buffers from the first states' batch, heads, head dim, dtype and device."""
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        self._key_buffer = key_states.new_empty(batch, heads, self.capacity, dim)
        self._value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new states after the current length and return views of all states so far."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._resize(max(end, 2 * self.capacity))
        self._key_buffer[:, :, self.length:end] = key_states
        self._value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def preload(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take ``keys`` / ``values`` ``[batch, heads, capacity, dim]`` as the buffers, the first ``length``
        positions already filled (a reused prefix)."""
        self._key_buffer, self._value_buffer = keys, values
        self.capacity, self.length, self.device = keys.shape[2], length, keys.device
        self.is_initialized = True
        self._refresh_views()

    def get_seq_length(self) -> int:
        """Number of cached positions."""
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Key/value length and offset of the mask for a forward of ``query_length`` new tokens."""
        return self.length + query_length, 0

    def reset(self) -> None:
        """Drop the buffers."""
        super().reset()
        self._key_buffer = self._value_buffer = None
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (a negative count, as in ``DynamicLayer``)."""
        if tokens_to_remove > 0:
            raise ValueError("crop() takes a negative number of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (row ``i`` becomes rows ``i * repeats ...``)."""
        if self.is_initialized:
            index = torch.arange(self._key_buffer.shape[0], device=self.device).repeat_interleave(repeats)
            self.batch_select_indices(index)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the given batch rows, in that order."""
        if not self.is_initialized:
            return
        indices = indices.to(self.device)
        self._key_buffer = self._key_buffer.index_select(0, indices)
        self._value_buffer = self._value_buffer.index_select(0, indices)
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search)."""
        self.batch_select_indices(beam_idx)

    def _resize(self, capacity: int) -> None:
        keys = self._key_buffer.new_empty(*self._key_buffer.shape[:2], capacity, self._key_buffer.shape[-1])
        values = self._value_buffer.new_empty(*self._value_buffer.shape[:2], capacity,
                                              self._value_buffer.shape[-1])
        keys[:, :, :self.length] = self._key_buffer[:, :, :self.length]
        values[:, :, :self.length] = self._value_buffer[:, :, :self.length]
        self._key_buffer, self._value_buffer, self.capacity = keys, values, capacity

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, :self.length]
        self.values = self._value_buffer[:, :, :self.length]


def make_cache(model: PreTrainedModel, capacity: int, preallocate: bool = True) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are :class:`PreallocatedLayer` s.

    Models with other layer kinds (sliding-window, linear attention, ...) keep transformers' own layers, so
    the result is always correct; only plain full-attention layers are swapped.

    Args:
        model: the model the cache is for.
        capacity: positions to preallocate per layer (prompt + new tokens).
        preallocate: False gives transformers' plain ``DynamicCache`` (for comparisons).
    """
    cache = DynamicCache(config=model.config)
    if not preallocate:
        return cache
    if cache.layers:
        cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
                        for layer in cache.layers]
    elif cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = lambda: PreallocatedLayer(capacity)
    return cache


def forward_kwargs(model: PreTrainedModel) -> tuple[str, bool]:
    """Name of the cache argument of ``model.forward`` and whether it accepts ``logits_to_keep`` (of the wrapped
    model for a PEFT model, whose own forward takes ``**kwargs``)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(target.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, "logits_to_keep" in params


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding: real tokens count from 0, pads get 0."""
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


class CacheRunner:
    """Runs the forwards of one chunk with its cache, tracking the attention mask and positions of each row.

    Rows are the cache's batch rows: one per running sequence, or ``k`` per running sequence in contrastive
    search.
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> None:
        """``mask`` ``[batch, past + prompt]`` covers the columns already in the cache (``past``, loaded by the
        caller, e.g. :meth:`~expertchat.engine.prefixcache.ChunkLayout.load`) and ``input_ids`` ``[batch, prompt]``."""
        self.model = model
        self.cache_arg, self.has_logits_to_keep = forward_kwargs(model)
        batch, width = mask.shape
        capacity = width + max_new
        self.cache = make_cache(model, capacity)
        # The mask of every position the turn can reach: generated positions are always real tokens.
        self.mask = torch.ones(batch, capacity, dtype=torch.bool, device=input_ids.device)
        self.mask[:, :width] = mask
        self.length = 0
        self.past = width - input_ids.shape[1]
        self.input_ids = input_ids
        self.next_pos = mask.sum(-1, keepdim=True)  # position of the next token of each row

    def prefill(self, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the (left-padded) prompts through the model after the loaded past and fill the cache.

        Returns:
            The last position's logits ``[batch, vocab]`` and, with ``hidden``, the last-layer hidden states
            ``[batch, prompt_len, hidden]`` of the fed columns (meaningless at padding).
        """
        self.length = self.past + self.input_ids.shape[1]
        prompt_mask = self.mask[:, :self.length]
        positions = positions_from_mask(prompt_mask)[:, self.past:]
        out = self._forward(self.input_ids, prompt_mask, positions, hidden)
        return out.logits[:, -1], (out.hidden_states[-1] if hidden else None)

    def columns(self, row: int) -> torch.Tensor:
        """Column indices of the real (unmasked) cached positions of cache row ``row``."""
        return self.mask[row, :self.length].nonzero().squeeze(1)

    def step(self, tokens: torch.Tensor, hidden: bool = False) -> Any:
        """Feed one new token per row."""
        self.length += 1
        out = self._forward(tokens.view(-1, 1), self.mask[:, :self.length], self.next_pos, hidden)
        self.next_pos = self.next_pos + 1
        return out

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given cache rows (dropping finished sequences, or repeating rows)."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, hidden: bool) -> Any:
        kwargs: dict[str, Any] = {self.cache_arg: self.cache}
        if self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if hidden:
            kwargs["output_hidden_states"] = True
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)


class PrefixBatch:
    """A batch of left-padded prefixes run through the judge once, the KV cache kept so that suffixes can be run on
    top of it (and cropped off again). Only the model's own forward is called (``model(input_ids=...,
    attention_mask=..., position_ids=..., cache=..., logits_to_keep=...)``), so a wrapper that switches LoRA
    adapters per call judges with the right weights. ``tail_keep`` positions of logits are kept from the prefix
    pass: the answer's span must end that close to the end of every prefix (a fixed template tail follows it).

    ``shared`` leading tokens common to every prefix (the judge template's head) run once, their cache copied to
    every row. ``split`` (a count per row) goes a level further: rows whose first ``split[r]`` tokens are equal (two
    samples judged in one context) run them once as a group row whose cache is copied to each, then only their own
    rest (at least the last token); logits (``tail_keep``) come from those rests. Without two such rows the layout
    is the plain one. ``reserve`` positions after the prefixes are allocated with the cache
    (:class:`PreallocatedLayer`: suffixes and the WIM continuation write in place; a longer one grows the buffer).

    Raises:
        ValueError: the prefixes do not share their first ``shared`` tokens, or ``split`` is not one count per row.
    """

    def __init__(self, lm: LoadedModel, prefixes: list[list[int]], tail_keep: int = 1, shared: int = 0,
                 reserve: int = 0, split: list[int] | None = None) -> None:
        self.model = lm.model
        self.cache_arg, self.has_keep = forward_kwargs(self.model)
        self.device = next(self.model.parameters()).device
        self.pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        probe = make_cache(self.model, 1)  # a sliding-window layer cannot be cropped once past its window: such
        self.croppable = bool(getattr(probe, "is_croppable", True)) and not any(  # judges rerun prefix + suffix
            getattr(layer, "is_sliding", False) for layer in getattr(probe, "layers", []))
        self.spent = False  # greedy() dropped finished rows: the cache no longer holds every prefix
        shared = min([shared] + [len(p) - 1 for p in prefixes]) if self.croppable else 0
        head = prefixes[0][:shared]
        if any(p[:shared] != head for p in prefixes):
            raise ValueError("PrefixBatch: the prefixes do not share their first `shared` tokens")
        if split is not None and len(split) != len(prefixes):
            raise ValueError(f"PrefixBatch: split has {len(split)} counts for {len(prefixes)} prefixes")
        self.prefixes, split = prefixes, None if split is None else list(split)
        groups = self._groups(prefixes, shared, split) if split is not None and self.croppable else None
        parts = [p[shared:] for p in prefixes] if groups is None else groups[0]
        own = [] if groups is None else [p[n:] for p, n in zip(prefixes, split)]
        capacity = shared + max(len(p) for p in parts) + max([len(p) for p in own] or [0]) + reserve
        self._new_cache = lambda: make_cache(self.model, capacity)
        self.cache = self._new_cache()
        ids, mask = self._padded(parts, shared)
        if shared:
            self._run(torch.tensor([head], dtype=torch.long, device=self.device), mask[:1, :shared],
                      positions_from_mask(mask)[:1, :shared], 1)
            self.cache.batch_repeat_interleave(len(parts))
        positions = positions_from_mask(mask)
        if groups is not None:  # each group's part once, its cache copied to its rows, then each row's own part
            self._run(ids, mask, positions[:, shared:], 1)
            rows = torch.tensor(groups[1], device=self.device)
            self.cache.batch_select_indices(rows)
            ids, own_mask = self._padded(own, 0)
            mask = torch.cat([mask.index_select(0, rows), own_mask], 1)
            positions, shared = positions_from_mask(mask), mask.shape[1] - ids.shape[1]
        self.ids, self.mask, self.positions = ids, mask, positions[:, shared:]
        self.tail_keep = min(tail_keep, ids.shape[1])
        self.tail_logits = self._run(self.ids, self.mask, self.positions, self.tail_keep)  # [B, keep, V]
        self.next_pos = self.mask.sum(-1, keepdim=True)

    @staticmethod
    def _groups(prefixes: list[list[int]], shared: int, split: list[int]) -> tuple[list[list[int]], list[int]] | None:
        """The groups' parts after the head and each row's group (``split[r]`` clamped to ``[shared, len - 1]`` in
        place); None when no two rows share their first ``split[r]`` tokens or a group has nothing after the head."""
        found: dict[tuple[int, ...], int] = {}
        for r, p in enumerate(prefixes):
            split[r] = max(shared, min(split[r], len(p) - 1))
            found.setdefault(tuple(p[:split[r]]), len(found))
        if len(found) == len(prefixes) or any(len(key) == shared for key in found):
            return None
        return [list(key[shared:]) for key in found], [found[tuple(p[:n])] for p, n in zip(prefixes, split)]

    def _padded(self, parts: list[list[int]], shared: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``parts`` left-padded: ids ``[n, width]`` and the mask ``[n, shared + width]`` (the head's columns set)."""
        width = max(len(p) for p in parts)
        ids = torch.full((len(parts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(parts), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, p in enumerate(parts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, shared + width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.cache_arg: self.cache, "use_cache": True}
        if self.has_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -keep:]

    def extend(self, suffix: list[int], keep: int) -> torch.Tensor:
        """Run the same ``suffix`` after every prefix; return the logits of its last ``keep`` positions
        (``[B, keep, V]``) and drop the suffix from the cache again."""
        self._check_unspent()
        n = len(suffix)
        ids = torch.tensor(suffix, dtype=torch.long, device=self.device).expand(len(self.prefixes), n)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1]).expand(-1, n)], dim=1)
        positions = self.next_pos + torch.arange(n, device=self.device)
        if self.croppable:
            logits = self._run(ids, mask, positions, keep)
            self.cache.crop(-n)
            return logits
        # e.g. sliding-window layers cannot be cropped: run prefix and suffix together on a fresh cache
        self.cache = self._new_cache()
        return self._run(torch.cat([self.ids, ids], 1), mask, torch.cat([self.positions, positions], 1), keep)

    def span_logprobs(self, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Log-probabilities of the prefix tokens in ``[start, end)`` of each row (unpadded coordinates)."""
        out = []
        for r, (start, end) in enumerate(spans):
            if end <= start:
                out.append(torch.zeros(0))
                continue
            first = self.tail_keep - (len(self.prefixes[r]) - start) - 1  # logits predicting token ``start``
            if first < 0:
                raise ValueError("span_logprobs: the span starts before the kept logits; raise tail_keep")
            logp = self.tail_logits[r, first:first + end - start].float().log_softmax(-1)
            target = torch.tensor(self.prefixes[r][start:end], device=logp.device)
            out.append(logp.gather(-1, target[:, None]).squeeze(-1).cpu())
        return out

    def greedy(self, suffix: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
        """Greedy continuation of ``prefix + suffix`` for every row (the WIM critique): ``B`` lists of new token
        ids, stop token excluded. The batch's LAST use: rows leave the running batch as they finish (their cache
        rows dropped, so they cost nothing), and the cache is spent afterwards.

        Raises:
            RuntimeError: the batch was already spent by an earlier ``greedy``.
        """
        self._check_unspent()
        n, b = len(suffix), len(self.prefixes)
        ids = torch.tensor(suffix, dtype=torch.long, device=self.device).expand(b, n)
        width = self.mask.shape[1] + n
        mask = torch.ones(b, width + max_new_tokens, dtype=self.mask.dtype, device=self.device)
        mask[:, :self.mask.shape[1]] = self.mask  # generated positions are always real tokens
        positions = self.next_pos + torch.arange(n, device=self.device)
        if not self.croppable:
            self.cache = self._new_cache()
            ids, positions = torch.cat([self.ids, ids], 1), torch.cat([self.positions, positions], 1)
        self.spent = True
        logits = self._run(ids, mask[:, :width], positions, 1)
        stops = set(stop_ids)
        tokens: list[list[int]] = [[] for _ in range(b)]
        rows = list(range(b))  # the original row of each running cache row
        pos = positions[:, -1:]
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            running = []
            for r, t in enumerate(nxt.tolist()):
                if t not in stops:
                    tokens[rows[r]].append(t)
                    running.append(r)
            if not running or step == max_new_tokens - 1:
                break
            if len(running) < len(rows):
                keep = torch.tensor(running, device=self.device)
                self.cache.batch_select_indices(keep)
                mask, pos, nxt = mask.index_select(0, keep), pos.index_select(0, keep), nxt.index_select(0, keep)
                rows = [rows[r] for r in running]
            pos = pos + 1
            logits = self._run(nxt[:, None], mask[:, :width + step + 1], pos, 1)
        return tokens

    def _check_unspent(self) -> None:
        if self.spent:
            raise RuntimeError("PrefixBatch: greedy() has spent this batch's cache; build a new batch")


def copy_last_position(cache: DynamicCache, source_rows: torch.Tensor) -> None:
    """Overwrite the newest cached position of every row with that of ``source_rows[row]``."""
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer):
            raise NotImplementedError(f"contrastive search needs attention KV cache layers, not {type(layer).__name__}")
        for states in (layer.keys, layer.values):
            states[:, :, -1] = states[source_rows, :, -1]
