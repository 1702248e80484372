"""Fast batched decoding for the dialogue stage: sampling, greedy and contrastive search.

Each call writes one turn for many dialogues at once. Instead of ``model.generate`` the module runs its own
decode loop, calling the model's forward directly with a KV cache, because on small models and CPUs the
per-step overhead of ``generate`` (logits processors, stopping criteria, cache bookkeeping) is a large part
of the step time. What makes the loop fast:

* the KV cache is preallocated for the whole turn (prompt + ``max_new_tokens``) and written in place;
  transformers' ``DynamicLayer`` concatenates a new tensor per layer and step, which costs a full copy of
  the cache (and fresh memory) every step;
* logits are computed for the last position only (``logits_to_keep=1``);
* prompts are sorted by length and cut into chunks of ``batch_size``, so little padding is computed; a prompt
  repeated in a chunk (online DPO samples each prompt twice) is prefilled once and its cache rows copied;
* finished sequences leave the running batch (their cache rows are dropped), so they cost nothing;
* sampling draws by inverse CDF (``cumsum`` + ``searchsorted``, ~1 ms for 32 x 49k on 2 CPU cores) instead
  of ``torch.multinomial`` (~30 ms), and never sorts the whole vocabulary for top-p when top-k is on, or
  when the nucleus lies within the best 256 tokens.

Contrastive search (Su et al., 2022) was moved out of transformers 5 to a Hub repo that cannot be reached
here, so it is implemented below. At each step it takes the ``k`` most probable tokens; for each candidate
``v`` it computes the last-layer hidden state ``h_v`` (by feeding ``v`` one step ahead) and picks
``argmax_v (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j)`` over the hidden states ``h_j`` of all previous
non-pad tokens. The ``B x k`` candidates of a batch go through ONE forward per step: the cache is repeated
``k`` times once after the prompt, and after each step only the newest position of the chosen candidate is
copied into its ``k`` rows (all rows of a sequence share the same past, so nothing else has to move).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expertchat.engine.kvcache import CacheRunner, copy_last_position
from expertchat.engine.models import stop_ids
from expertchat.engine.prefixcache import ChunkLayout, PrefixStore, cacheable, distinct, take_entry

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Hashable

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from expertchat.config.schema import GenerationConfig


@dataclass
class Generated:
    """One generated turn.

    Attributes:
        text: the decoded new text, special tokens stripped, surrounding whitespace removed.
        token_ids: the new tokens, without the stop token.
        prompt_tokens: number of prompt tokens fed to the model (after truncation).
        new_tokens: number of generated tokens, including a final stop token if one was produced.
        finished: True if a stop token ended the turn, False if ``max_new_tokens`` was reached.
        reused_tokens: leading prompt tokens taken from the prefix cache instead of prefilled.
        stop_token: the stop token that ended the turn (None when none did).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    finished: bool
    reused_tokens: int = 0
    stop_token: int | None = None


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: GenerationConfig,
             *, stop_token_ids: list[int] | None = None, seed: int | None = None,
             max_prompt_tokens: int | None = None, store: PrefixStore | None = None,
             keys: list[Hashable] | None = None, keep: bool = True) -> list[Generated]:
    """Generate one continuation per prompt, batched.

    Args:
        model: a causal LM (``*ForCausalLM``); it runs in its own dtype and on its own device.
        tokenizer: its tokenizer.
        prompts: already-rendered chat strings (with their special tokens); tokenized without adding any.
        cfg: decoding settings: ``strategy`` (``sample`` or ``contrastive``), ``max_new_tokens``,
            ``temperature`` / ``top_k`` / ``top_p`` (sampling), ``top_k`` / ``penalty_alpha`` (contrastive)
            and ``batch_size`` (most prompts per forward pass).
        stop_token_ids: ids that end a sequence; default: the tokenizer's EOS and the model's generation
            config EOS ids.
        seed: seed of the sampling generator (default: ``cfg.seed`` where the config has one); None: torch's
            global RNG.
        max_prompt_tokens: longer prompts are cut from the left (their end is kept).
        store: prefix caching (:mod:`expertchat.engine.prefixcache`): the longest common token prefix with the tokens
            cached under the prompt's key is reused, not prefilled; the same outputs (up to float rounding).
        keys: the store key of each prompt (e.g. a dialogue id); needed with ``store``.
        keep: store each prompt's states (prompt + reply) under its key for its next turn; False for a last turn.

    Returns:
        One :class:`Generated` per prompt, in the order of ``prompts``.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer) if stop_token_ids is None else sorted(set(stop_token_ids))
    encoded = _encode(tokenizer, prompts, max_prompt_tokens)
    if store is not None and (keys is None or len(keys) != len(encoded)):
        raise ValueError("generate(): `store` needs one key per prompt in `keys`")
    seed = getattr(cfg, "seed", None) if seed is None else seed
    generator = None
    if cfg.strategy == "sample" and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    pad_id = _pad_id(tokenizer, stops)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    if store is not None and not cacheable(model):
        store = None
    # Longest first: similar lengths share a chunk (little padding), and the largest cache comes first.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[Generated | None] = [None] * len(encoded)
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start:start + cfg.batch_size]
        saver = None if store is None else _Saver(store, [keys[i] for i in chunk], [encoded[i] for i in chunk],
                                                  keep, _contrastive(cfg))
        outputs = _decode_chunk(model, [encoded[i] for i in chunk], cfg, stop_tensor, pad_id, generator, saver)
        if saver is not None and not keep:  # a last turn: its dialogues' caches are freed
            for key in saver.keys:
                store.drop(key)
        texts = tokenizer.batch_decode([ids for ids, _ in outputs], skip_special_tokens=True)
        reused = [n for _, n in saver.matches] if saver is not None else [0] * len(chunk)
        for i, (ids, stop), text, n in zip(chunk, outputs, texts, reused):
            results[i] = Generated(text=text.strip(), token_ids=ids, prompt_tokens=len(encoded[i]),
                                   new_tokens=len(ids) + int(stop is not None), finished=stop is not None,
                                   reused_tokens=n, stop_token=stop)
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ decode loop


def _encode(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_prompt_tokens: int | None) -> list[list[int]]:
    """Token ids of each prompt, cut from the left to ``max_prompt_tokens``; an empty prompt is an error."""
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is not None and max_prompt_tokens > 0:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("generate() got an empty prompt (no tokens); every prompt needs at least one token")
    return encoded


def _contrastive(cfg: GenerationConfig) -> bool:
    """Whether ``cfg`` asks for contrastive search proper (``k == 1`` or ``alpha == 0`` is greedy)."""
    return cfg.strategy == "contrastive" and cfg.top_k > 1 and cfg.penalty_alpha > 0


def _pad_id(tokenizer: PreTrainedTokenizerBase, stops: list[int]) -> int:
    """Any valid token id works for padding (pads are masked); prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *stops):
        if candidate is not None:
            return int(candidate)
    return 0


class _Saver:
    """The prefix store's side of one chunk: what each row reuses, and storing each row's states when it ends."""

    def __init__(self, store: PrefixStore, keys: list[Hashable], prompts: list[list[int]], keep: bool,
                 hidden: bool) -> None:
        self.store, self.keys, self.prompts, self.keep = store, keys, prompts, keep
        self.matches = [store.match(key, ids, hidden) for key, ids in zip(keys, prompts)]
        store.reused_tokens += sum(n for _, n in self.matches)
        self.tokens: torch.Tensor | None = None  # [chunk, max_new] the loop's new tokens, set by the loop

    def save(self, runner: CacheRunner, cache_rows: list[int], rows: list[int], fed: int,
             context: torch.Tensor | None = None) -> None:
        """Store chunk row ``rows[i]`` from cache row ``cache_rows[i]``; its first ``fed`` new tokens are cached.

        ``context``: per cache row (the same order as ``cache_rows``), the unit-norm hidden states by column.
        """
        if not self.keep:
            return
        new = self.tokens[:, :fed].tolist()
        for i, (cache_row, row) in enumerate(zip(cache_rows, rows)):
            columns = runner.columns(cache_row)
            hidden = None if context is None else context[i].index_select(0, columns)
            entry = take_entry(runner.cache, cache_row, columns, self.prompts[row] + new[row], hidden)
            self.store.put(self.keys[row], entry)


@torch.inference_mode()
def _decode_chunk(model: PreTrainedModel, prompts: list[list[int]], cfg: GenerationConfig, stops: torch.Tensor,
                  pad_id: int, generator: torch.Generator | None,
                  saver: _Saver | None = None) -> list[tuple[list[int], int | None]]:
    """Decode one chunk of tokenized prompts; returns (new ids without the stop token, the stop token or None)
    per prompt."""
    matches = saver.matches if saver is not None else [(None, 0)] * len(prompts)
    if _contrastive(cfg):
        layout = ChunkLayout(prompts, matches, pad_id, stops.device)
        tokens, finished = _contrastive_loop(model, layout, cfg, stops, saver)
    else:
        firsts, index = distinct([tuple(p) for p in prompts] if saver is None else list(range(len(prompts))))
        rows = torch.tensor(index, device=stops.device) if len(firsts) < len(prompts) else None
        layout = ChunkLayout([prompts[i] for i in firsts], [matches[i] for i in firsts], pad_id, stops.device)
        tokens, finished = _sample_loop(model, layout, cfg, stops, generator, saver, rows)
    out = []
    for row_tokens, done in zip(tokens.tolist(), finished.tolist()):
        ids = [t for t in row_tokens if t >= 0]
        out.append((ids[:-1], ids[-1]) if done else (ids, None))
    return out


def _sample_loop(model: PreTrainedModel, layout: ChunkLayout, cfg: GenerationConfig, stops: torch.Tensor,
                 generator: torch.Generator | None, saver: _Saver | None,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling (or greedy, for ``contrastive`` with ``alpha == 0`` or ``k == 1``) with a dropping batch.
    ``rows``: the layout row each sequence starts from (a prompt prefilled once for several sequences).

    Returns:
        tokens: ``[batch, max_new_tokens]`` new ids, ``-1`` after a sequence ended.
        finished: ``[batch]`` whether a stop token ended the sequence.
    """
    device = layout.mask.device
    batch = layout.mask.shape[0] if rows is None else len(rows)
    runner = CacheRunner(model, layout.input_ids, layout.mask, cfg.max_new_tokens)
    layout.load(runner.cache)
    tokens = torch.full((batch, cfg.max_new_tokens), -1, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    alive = torch.arange(batch, device=device)  # chunk row of each running row
    if saver is not None:
        saver.tokens = tokens
    greedy = cfg.strategy == "contrastive"
    logits, _ = runner.prefill()
    if rows is not None:
        runner.select(rows)
        logits = logits.index_select(0, rows)
    for step in range(cfg.max_new_tokens):
        if greedy:
            next_tokens = logits.float().argmax(-1)
        else:
            next_tokens = sample_next(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        tokens[alive, step] = next_tokens
        stopped = torch.isin(next_tokens, stops)
        any_stopped = bool(stopped.any())
        if any_stopped:
            finished[alive[stopped]] = True
        if step + 1 == cfg.max_new_tokens:
            if saver is not None:  # the cache holds the prompt and every new token but the last
                saver.save(runner, list(range(len(alive))), alive.tolist(), step)
            break
        if any_stopped:  # finished rows leave the batch and its cache
            if saver is not None:
                gone = stopped.nonzero().squeeze(1)
                saver.save(runner, gone.tolist(), alive[gone].tolist(), step)
            keep = (~stopped).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            alive, next_tokens = alive[keep], next_tokens[keep]
            runner.select(keep)
        logits = runner.step(next_tokens).logits[:, -1]
    return tokens, finished


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from ``logits`` with temperature, top-k and top-p (nucleus) filtering.

    The filters follow transformers' logits warpers (temperature, then top-k, then top-p on the renormalized
    top-k distribution). For speed on CPU the draw uses the inverse CDF (``cumsum`` + ``searchsorted``:
    about 1 ms for 32 x 49k) rather than ``torch.multinomial`` (about 30 ms), and pure top-p first looks for
    the nucleus among the best 256 tokens (``topk``) before falling back to a full sort (about 45 ms).

    Args:
        logits: ``[rows, vocab]`` scores.
        temperature: divides the logits (> 0).
        top_k: keep the ``top_k`` best tokens (0: all).
        top_p: keep the smallest set of best tokens whose probability reaches ``top_p`` (1.0: all).
        generator: random generator (None: torch's global one).

    Returns:
        ``[rows]`` token ids.
    """
    # One fp32 copy, then in-place work: on CPU each fresh 6 MB temporary costs page faults every step.
    logits = logits.to(torch.float32, copy=True)
    if temperature != 1.0:
        logits.div_(temperature)
    if top_k == 1:
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    candidates = None  # vocabulary ids of the columns of ``logits`` once they are a sorted subset
    if 0 < top_k < vocab:
        logits, candidates = logits.topk(top_k, dim=-1)  # sorted, descending
    if top_p < 1.0:
        log_total = logits.logsumexp(-1, keepdim=True)  # the distribution top-p applies to
        if candidates is None:
            logits, candidates = _nucleus_superset(logits, log_total, top_p)
        probs = (logits - log_total).exp()
        # Drop a token when the better tokens before it already reach top_p (the best one is always kept).
        probs = probs.masked_fill((probs.cumsum(-1) - probs) >= top_p, 0.0)
    else:
        probs = logits.sub_(logits.amax(-1, keepdim=True)).exp_()  # softmax, up to the normalization
    choice = _draw(probs, generator)
    return choice if candidates is None else candidates.gather(1, choice[:, None]).squeeze(1)


def _nucleus_superset(logits: torch.Tensor, log_total: torch.Tensor, top_p: float,
                      first: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The best tokens of each row, sorted, enough of them to hold every row's top-p nucleus.

    Tries ``topk(first)`` and grows it 8x until the kept mass reaches ``top_p`` in every row (exact: the
    nucleus is a prefix of the sorted distribution); ends with the full sort at worst.
    """
    vocab, size = logits.shape[-1], min(first, logits.shape[-1])
    while True:
        values, ids = logits.topk(size, dim=-1)
        if size == vocab or bool(((values - log_total).exp().sum(-1) >= top_p).all()):
            return values, ids
        size = min(vocab, size * 8)


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One column per row, with probability proportional to ``weights`` (non-negative, any scale).

    ``weights`` is overwritten (by its cumulative sum).
    """
    cdf = weights.cumsum_(-1)
    u = torch.rand(weights.shape[0], 1, generator=generator, device=weights.device, dtype=cdf.dtype)
    # First column whose cdf exceeds u * total; ``right=True`` never lands on a zero-weight column.
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return choice.clamp_(max=weights.shape[-1] - 1)


def _prompt_context(layout: ChunkLayout, prompt_hidden: torch.Tensor,
                    max_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm last-layer hidden states of every position ``[batch, prompt + max_new, hidden]`` (fp32; the
    reused prefix's from the store, the fed prompt's from the prefill), and which of them are real tokens."""
    batch, prompt_len = layout.mask.shape
    context = prompt_hidden.new_zeros(batch, prompt_len + max_new, prompt_hidden.shape[-1], dtype=torch.float32)
    context[:, :layout.past] = layout.hidden(prompt_hidden.shape[-1])
    context[:, layout.past:prompt_len] = torch.nn.functional.normalize(prompt_hidden.float(), dim=-1)
    valid = torch.zeros(batch, prompt_len + max_new, dtype=torch.bool, device=layout.mask.device)
    valid[:, :prompt_len] = layout.mask
    return context, valid


def _contrastive_loop(model: PreTrainedModel, layout: ChunkLayout, cfg: GenerationConfig, stops: torch.Tensor,
                      saver: _Saver | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive search, all sequences and their ``k`` candidates in one forward per step.

    Returns:
        tokens: ``[batch, max_new_tokens]`` new ids, ``-1`` after a sequence ended.
        finished: ``[batch]`` whether a stop token ended the sequence.
    """
    batch, prompt_len = layout.mask.shape
    k, alpha, max_new = cfg.top_k, cfg.penalty_alpha, cfg.max_new_tokens
    device = layout.mask.device
    runner = CacheRunner(model, layout.input_ids, layout.mask, max_new)
    layout.load(runner.cache)
    tokens = torch.full((batch, max_new), -1, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    alive = torch.arange(batch, device=device)
    if saver is not None:
        saver.tokens = tokens

    logits, prompt_hidden = runner.prefill(hidden=True)
    context, valid = _prompt_context(layout, prompt_hidden, max_new)
    runner.select(torch.arange(batch, device=device).repeat_interleave(k))  # k cache rows per sequence
    offsets = torch.arange(k, device=device)

    for step in range(max_new):
        rows = len(alive)
        top_probs, top_ids = logits.float().softmax(-1).topk(k, dim=-1)  # [rows, k]
        out = runner.step(top_ids.reshape(-1), hidden=True)
        cand_hidden = torch.nn.functional.normalize(out.hidden_states[-1][:, -1].float(), dim=-1).view(rows, k, -1)
        length = prompt_len + step
        similarity = torch.bmm(cand_hidden, context[:, :length].transpose(1, 2))  # [rows, k, length]
        similarity = similarity.masked_fill(~valid[:, None, :length], float("-inf")).amax(-1)
        scores = (1.0 - alpha) * top_probs - alpha * similarity
        choice = scores.argmax(-1)  # [rows]
        chosen_rows = torch.arange(rows, device=device) * k + choice
        next_tokens = top_ids.gather(1, choice[:, None]).squeeze(1)
        tokens[alive, step] = next_tokens
        stopped = torch.isin(next_tokens, stops)
        any_stopped = bool(stopped.any())
        if any_stopped:
            finished[alive[stopped]] = True
        context[:, length] = cand_hidden.view(rows * k, -1)[chosen_rows]
        valid[:, length] = True
        if step + 1 == max_new:
            if saver is not None:  # the chosen candidates were fed: the cache holds every new token
                saver.save(runner, chosen_rows.tolist(), alive.tolist(), step + 1, context)
            break
        # Every row of a sequence now takes the chosen candidate's newest key/value and hidden state.
        copy_last_position(runner.cache, chosen_rows.repeat_interleave(k))
        logits = out.logits[chosen_rows, -1]
        if any_stopped and saver is not None:
            gone = stopped.nonzero().squeeze(1)
            saver.save(runner, (gone * k).tolist(), alive[gone].tolist(), step + 1, context[gone])
        if any_stopped:  # finished sequences leave the batch: their k cache rows are dropped
            keep = (~stopped).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            alive, logits, context, valid = alive[keep], logits[keep], context[keep], valid[keep]
            runner.select((keep[:, None] * k + offsets).reshape(-1))
    return tokens, finished
