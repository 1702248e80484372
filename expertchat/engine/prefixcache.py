"""Prefix caching across turns: each role's KV cache of every dialogue kept between its turns.

A role's prompt at turn ``t + 2`` is its prompt at turn ``t``, its own reply, the partner's reply and the
template's glue, re-rendered. Re-rendering does not always extend the old tokens (templates re-tokenize text,
some drop thinking blocks), so nothing is assumed: the new prompt is matched against the cached tokens, the
longest common token prefix is reused and only the rest is prefilled (at least the last prompt token always
is, for its logits).

Layout of one chunk (``B`` prompts, ``Lc`` = the longest reused prefix, ``S`` = the longest new part)::

    columns [0, Lc)        reused prefixes, right-aligned (left-padded), loaded from the store
    columns [Lc, Lc + S)   the new tokens, right-aligned, fed to the model in one forward
    columns Lc + S ...     generated tokens

Padding inside the rows is masked; positions count real tokens only (:func:`positions_from_mask`), so a row
sees exactly the keys, values and positions it would see with its whole prompt prefilled at once. Only
full-attention caches are reused (:func:`cacheable`): sliding-window and other layer kinds prefill every turn.

Memory: an entry holds the keys and values of every layer for every cached token (SmolLM2-135M in bf16:
23 KB per token), plus the normalized last-layer hidden states for contrastive search. The store refuses
entries beyond its cap (``generation.prefix_cache_gb``; those dialogues re-prefill their next turn, logged
once) and the dialogue stage clears it when the dialogues end.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expertchat.engine.kvcache import PreallocatedLayer, make_cache

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel
    from transformers.cache_utils import DynamicCache

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One dialogue's cache for one role.

    Attributes:
        tokens: the token ids whose states are cached, in order.
        keys / values: ``[layers, kv_heads, len(tokens), head_dim]`` in the model's dtype.
        hidden: ``[len(tokens), hidden]`` unit-norm fp32 last-layer hidden states (contrastive search), or None.
    """

    tokens: list[int]
    keys: torch.Tensor
    values: torch.Tensor
    hidden: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.hidden is None else self.hidden.nbytes
        return self.keys.nbytes + self.values.nbytes + extra


def distinct(keys: list[Hashable]) -> tuple[list[int], list[int]]:
    """The position of each distinct key's first occurrence, and for every key the index of its distinct one
    (the rows to encode once, and the row each copy reads).

    >>> distinct(["a", "b", "a", "c", "b"])
    ([0, 1, 3], [0, 1, 0, 2, 1])
    """
    firsts: list[int] = []
    where: dict[Hashable, int] = {}
    index = []
    for i, key in enumerate(keys):
        if key not in where:
            where[key] = len(firsts)
            firsts.append(i)
        index.append(where[key])
    return firsts, index


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists.

    >>> common_prefix([1, 2, 3, 4], [1, 2, 5])
    2
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixStore:
    """Cached prefixes by key (e.g. a dialogue id), for one model, bounded in memory.

    Args:
        cap_gb: most memory the entries may hold, in GiB (2**30 bytes); an entry that would go past it is
            not stored (that dialogue's next turn prefills its whole prompt) and a warning is logged once.
    """

    def __init__(self, cap_gb: float) -> None:
        self.cap = int(cap_gb * 2**30)
        self.entries: dict[Hashable, Entry] = {}
        self.nbytes = 0
        self.refused = 0
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to the store (a running count)

    def match(self, key: Hashable, ids: list[int], need_hidden: bool) -> tuple[Entry | None, int]:
        """The entry for ``key`` and how many leading tokens of ``ids`` it covers (0: none).

        At most ``len(ids) - 1``: the last prompt token is always fed, for the next token's logits.
        """
        entry = self.entries.get(key)
        if entry is None or (need_hidden and entry.hidden is None):
            return None, 0
        n = min(common_prefix(entry.tokens, ids), len(ids) - 1)
        return (entry, n) if n > 0 else (None, 0)

    def put(self, key: Hashable, entry: Entry) -> bool:
        """Store ``entry`` under ``key`` (replacing the old one); False if it would exceed the cap."""
        self.drop(key)
        if self.nbytes + entry.nbytes > self.cap:
            if not self.refused:
                log.warning("prefix cache full (%.2f GB cap): the next turns of some dialogues prefill their "
                            "whole prompt; raise generation.prefix_cache_gb to keep them", self.cap / 2**30)
            self.refused += 1
            return False
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        return True

    def drop(self, key: Hashable) -> None:
        """Free the entry of ``key`` (e.g. a dialogue that ended)."""
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def clear(self) -> None:
        """Free every entry."""
        self.entries.clear()
        self.nbytes = 0


def cacheable(model: PreTrainedModel) -> bool:
    """Whether the model's cache is made of full-attention layers only (the layers a prefix can be loaded into)."""
    layers = make_cache(model, 1).layers
    return bool(layers) and all(isinstance(layer, PreallocatedLayer) for layer in layers)


class ChunkLayout:
    """Input ids, attention mask and reused prefixes of one chunk of prompts (layout in the module docstring).

    Args:
        prompts: the full prompt ids of each row.
        matches: ``(entry, reused)`` per row, from :meth:`PrefixStore.match` (``(None, 0)``: nothing reused).
        pad_id: id written at padding (masked).
        device: where the tensors go.

    Attributes:
        past: ``Lc``, the columns loaded from the store.
        input_ids: ``[B, S]`` the new tokens to feed; mask: ``[B, Lc + S]`` (bool).
    """

    def __init__(self, prompts: list[list[int]], matches: list[tuple[Entry | None, int]], pad_id: int,
                 device: torch.device) -> None:
        self.matches = matches
        self.past = max(n for _, n in matches)
        news = [ids[n:] for ids, (_, n) in zip(prompts, matches)]
        width = max(len(ids) for ids in news)
        self.input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((len(prompts), self.past + width), dtype=torch.bool, device=device)
        for row, (ids, (_, n)) in enumerate(zip(news, matches)):
            self.input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            self.mask[row, self.past - n:self.past] = True
            self.mask[row, self.past + width - len(ids):] = True

    def load(self, cache: DynamicCache) -> None:
        """Write the reused keys and values into the (empty, preallocated) cache and set its length to ``Lc``."""
        if not self.past:
            return
        first = next(e for e, _ in self.matches if e is not None)
        batch = len(self.matches)
        for index, layer in enumerate(cache.layers):
            heads, _, dim = first.keys.shape[1:]
            keys = first.keys.new_zeros(batch, heads, layer.capacity, dim)  # zeros: pads must stay finite
            values = first.values.new_zeros(batch, heads, layer.capacity, first.values.shape[-1])
            for row, (entry, n) in enumerate(self.matches):
                if n:
                    keys[row, :, self.past - n:self.past] = entry.keys[index, :, :n]
                    values[row, :, self.past - n:self.past] = entry.values[index, :, :n]
            layer.preload(keys, values, self.past)

    def hidden(self, size: int) -> torch.Tensor:
        """``[B, Lc, size]`` the reused unit-norm hidden states (zeros at padding), for contrastive search."""
        out = torch.zeros(len(self.matches), self.past, size, device=self.mask.device)
        for row, (entry, n) in enumerate(self.matches):
            if n:
                out[row, self.past - n:] = entry.hidden[:n]
        return out


def take_entry(cache: DynamicCache, row: int, columns: torch.Tensor, tokens: list[int],
               hidden: torch.Tensor | None = None) -> Entry:
    """Copy one cache row's states at ``columns`` (its real tokens, in order) out of the batch cache.

    Args:
        cache: the batch cache (preallocated layers).
        row: its batch row.
        columns: ``[len(tokens)]`` column index of each cached token.
        tokens: the ids of those tokens.
        hidden: ``[len(tokens), hidden]`` their unit-norm hidden states, or None.
    """
    layers = cache.layers
    keys = layers[0].keys.new_empty(len(layers), layers[0].keys.shape[1], len(tokens), layers[0].keys.shape[-1])
    values = layers[0].values.new_empty(len(layers), layers[0].values.shape[1], len(tokens),
                                        layers[0].values.shape[-1])
    for index, layer in enumerate(layers):
        torch.index_select(layer.keys[row], 1, columns, out=keys[index])
        torch.index_select(layer.values[row], 1, columns, out=values[index])
    return Entry(tokens, keys, values, None if hidden is None else hidden.clone())
