"""Judging: a judge model rates a turn per rubric category, and says what is missing (WIM).

Two rating modes (``judging.mode``):

* ``expected`` (default): for each category the judge reads the context, the rated turn and the category's
  instruction, and its reply is forced to start with ``judging.rating_prefix`` (``Rating: [[``). The score is
  the expectation of its next-token distribution over the ten scores 1..10, renormalized over the ten
  (tokenizer-aware: where "10" is two tokens, "1" then "0", one forward pass with the "1" appended gives both
  steps). Never a parse failure; the distribution, its argmax, entropy and the probability mass the judge put
  on the ten scores are kept.
* ``parse``: the judge generates (the original's wording and decoding, up to 256 new tokens) and ``[[N]]`` /
  ``[[[WIM]]]`` are parsed; a failure is counted and never a silent 0 (``judging.on_parse_failure``).

A category's ``signal`` can instead be ``likelihood``: the GPTScore-style pointwise mutual information of the
rated turn with its context, read from the same forward pass (log p(turn | context) - log p(turn | a
content-free context), summed over the turn's tokens) and mapped to [1, 10] by a logistic curve; ``blend`` is
the mean of both. ``experiments/judge_sanity`` measures which signal a small judge can be trusted with.

Cost: the context and the turn are encoded once per turn (the *prefix*); each category's instruction, each
phrasing, the content-free calibration and the WIM request are short *suffixes* run on the cached prefix. All
turns go through in batches of ``judging.batch_size``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from expertchat.config import GenerationConfig, JudgingConfig
from expertchat.errors import ExpertChatError
from expertchat.models import LoadedModel, chat_messages

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SCORES = tuple(range(1, 11))
LOGITS_BUDGET = 2 ** 27  # most logits kept at once for the likelihood (x 2 bytes in bf16: 256 MiB)
# Sentinels that split a rendered judge prompt: private-use characters, which no chat template strips (Llama 3's
# ``| trim`` strips whitespace, and control characters such as \x1e count as whitespace in Python).
_SPLIT = ("\ue000CTX\ue001", "\ue000ANS\ue001", "\ue000INS\ue001")


# ------------------------------------------------------------------------------------------------- records


@dataclass
class RatingItem:
    """One thing to rate: ``answer`` (the rated turn) in reply to ``context`` (a question or earlier turns)."""

    context: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)  # carried into the output record (ids, rater, ...)


@dataclass
class CategoryScore:
    """A category's score in [1, 10] (``None``: unparseable and skipped) and how it was obtained."""

    score: float | None
    signal: str  # rubric | likelihood | blend | parse
    status: str = "ok"  # ok | parse_failure (parse mode) | empty_answer
    dist: list[float] | None = None  # expected mode: renormalized probabilities of the scores 1..10
    argmax: int | None = None
    entropy: float | None = None  # nats, of ``dist``
    mass: float | None = None  # probability the judge put on the ten scores before renormalizing
    rubric: float | None = None  # the rubric score behind a likelihood/blend signal
    likelihood: float | None = None  # the likelihood score behind a likelihood/blend signal
    raw: str | None = None  # parse mode: the judge's text (capped)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v is not None or k == "score"}
        if self.dist is not None:
            out["dist"] = [round(p, 5) for p in self.dist]
        for k in ("score", "entropy", "mass", "rubric", "likelihood"):
            if out.get(k) is not None:
                out[k] = round(out[k], 5)
        return out


@dataclass
class Judgement:
    """The judge's verdict on one item: per-category scores, weighted score, WIM and bookkeeping."""

    categories: dict[str, CategoryScore]
    score: float | None  # weighted mean over categories in [1, 10]; None when skipped
    status: str  # ok | skipped (a category failed to parse) | neutral (failure scored neutral) | empty_answer
    wim: str | None = None  # the critique (None: not asked)
    wim_empty: bool = False  # the judge said nothing is missing (or wrote nothing)
    wim_status: str = "none"  # none (not asked) | ok | empty | parsed (from a parse-mode reply) | truncated
    pmi: float | None = None  # summed log p(answer | context) - log p(answer | content-free), when computed
    answer_tokens: int = 0


# --------------------------------------------------------------------------------------------- parsing


_RATING = re.compile(r"(?<!\[)\[\[\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")  # not inside [[[WIM]]]
_WIM = re.compile(r"\[\[\[(.*?)\]\]\]", re.DOTALL)
_EMPTY_WIM = re.compile(
    r"^(?:none|nothing|n/?a|no|nil|-+|no(?:thing)?\s+(?:is\s+)?missing|nothing\s+(?:at\s+all|else|is\s+missing|"
    r"significant|important|major)?|the\s+response\s+is\s+complete|it\s+is\s+complete|no\s+feedback)\W*$",
    re.IGNORECASE)


def parse_rating(text: str, lo: float = 1, hi: float = 10) -> float | None:
    """The first ``[[N]]`` in ``text`` with ``lo <= N <= hi`` (spaces and ``N/10`` allowed), else ``None``.

    >>> parse_rating("Rating: [[ 7 ]]"), parse_rating("[[11]] then [[8]]"), parse_rating("no score")
    (7.0, 8.0, None)
    """
    for match in _RATING.finditer(text or ""):
        try:
            value = float(match.group(1))
        except ValueError:  # pragma: no cover - the regex only matches numbers
            continue
        if math.isfinite(value) and lo <= value <= hi:
            return value
    return None


def parse_wim(text: str) -> str | None:
    """The first non-blank ``[[[...]]]`` in ``text``, else ``None``.

    >>> parse_wim("WIM: [[[No data on costs.]]]"), parse_wim("Rating: [[5]]")
    ('No data on costs.', None)
    """
    for match in _WIM.finditer(text or ""):
        if match.group(1).strip():
            return match.group(1).strip()
    return None


def clean_wim(text: str | None, max_chars: int) -> tuple[str, bool, bool]:
    """Normalize a WIM critique: strip, cap at ``max_chars`` (at a word boundary), detect "nothing missing".

    Returns:
        (text, empty, truncated): ``empty`` when the judge wrote nothing or said none / nothing / n/a.
    """
    text = re.sub(r"\s+", " ", (text or "")).strip().strip("\"'`*[]").strip()
    truncated = len(text) > max_chars
    if truncated:
        cut = text[:max_chars]
        text = cut[:cut.rfind(" ")] if " " in cut[max_chars // 2:] else cut
    empty = not text or bool(_EMPTY_WIM.match(text)) or not any(ch.isalnum() for ch in text)
    return text, empty, truncated


# ------------------------------------------------------------------------------------------- score tokens


@dataclass(frozen=True)
class ScoreTokens:
    """How the scores 1..10 are spelled in tokens right after the rating prefix.

    ``first[s]`` is the first token of score ``s``; where a score takes two tokens (``10`` = ``1``, ``0``),
    ``ext`` is their shared first token and ``second[s]`` the second one. P(10) = P(1) * P(0 | 1) and
    P(1) = P(1) * (1 - P(0 | 1)).
    """

    first: tuple[int, ...]
    second: tuple[int | None, ...]
    ext: int | None


def score_tokens(tokenizer: PreTrainedTokenizerBase, context: str) -> ScoreTokens:
    """Find the token spelling of 1..10 after ``context`` (a text ending with the rating prefix).

    Raises:
        ExpertChatError: the prefix merges with a digit, or a score needs more than two tokens, or two scores
            share a first token in another way than "1" / "10" (choose another ``judging.rating_prefix``).
    """
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    first, second = [], []
    for s in SCORES:
        ids = tokenizer(context + str(s), add_special_tokens=False)["input_ids"]
        tail = ids[len(base):]
        if ids[:len(base)] != base or not 1 <= len(tail) <= 2:
            raise ExpertChatError(f"judging.rating_prefix: the score {s} does not tokenize on its own after "
                                  f"{context[-20:]!r}; end the prefix with a bracket, e.g. 'Rating: [['")
        first.append(tail[0])
        second.append(tail[1] if len(tail) == 2 else None)
    singles = [f for f, s2 in zip(first, second) if s2 is None]
    doubles = [(f, s2) for f, s2 in zip(first, second) if s2 is not None]
    ext = {f for f, _ in doubles}
    if len(set(singles)) != len(singles) or len(ext) > 1 or len({s2 for _, s2 in doubles}) != len(doubles):
        raise ExpertChatError("judging.rating_prefix: the scores 1..10 share first tokens in a way this judge "
                              "cannot score in one pass; choose another prefix")
    return ScoreTokens(tuple(first), tuple(second), next(iter(ext)) if ext else None)


def score_distribution(logits: torch.Tensor, st: ScoreTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of 1..10 from the logits after the prefix (``[..., V]``) and, when ``st.ext`` is set, after
    the prefix plus the ext token (``[..., 1, V]`` stacked as ``logits[..., 0, :]`` and ``logits[..., 1, :]``).

    Returns:
        (probs ``[..., 10]`` renormalized, mass ``[...]`` = their total before renormalizing).
    """
    p_first = logits[..., 0, :].float().softmax(-1)
    if st.ext is not None:
        p_next = logits[..., 1, :].float().softmax(-1)
        p_cont = sum(p_next[..., s2] for s2 in st.second if s2 is not None)
    columns = []
    for f, s2 in zip(st.first, st.second):
        if s2 is not None:  # e.g. "10": P("1") * P("0" | "1")
            columns.append(p_first[..., f] * p_next[..., s2])
        elif f == st.ext:  # e.g. "1": P("1") * P(not a two-token score | "1")
            columns.append(p_first[..., f] * (1 - p_cont))
        else:
            columns.append(p_first[..., f])
    p = torch.stack(columns, dim=-1)
    mass = p.sum(-1)
    return p / mass.clamp_min(1e-30).unsqueeze(-1), mass


def expected_score(probs: torch.Tensor) -> torch.Tensor:
    return (probs * torch.arange(1, 11, dtype=probs.dtype, device=probs.device)).sum(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def copied_mask(context: list[int], answer: list[int], n: int) -> torch.Tensor:
    """Which answer tokens lie inside an ``n``-gram of tokens that also occurs in the context (``n`` = 0: none).

    >>> copied_mask([1, 2, 3, 4], [9, 2, 3, 4, 9], 3).tolist()
    [False, True, True, True, False]
    """
    mask = torch.zeros(len(answer), dtype=torch.bool)
    if n <= 0 or len(context) < n:
        return mask
    grams = {tuple(context[i:i + n]) for i in range(len(context) - n + 1)}
    for i in range(len(answer) - n + 1):
        if tuple(answer[i:i + n]) in grams:
            mask[i:i + n] = True
    return mask


def token_pmi(cond: torch.Tensor, uncond: torch.Tensor, copied: torch.Tensor | None = None) -> float:
    """Summed pointwise mutual information of the answer tokens with the context, in nats:
    sum_i log p(a_i | context, a_<i) - log p(a_i | content-free, a_<i), where tokens ``copied`` from the
    context count 0 (an answer that parrots the question would otherwise score highest)."""
    pmi = cond.float() - uncond.float()
    if copied is not None and len(copied):
        pmi = torch.where(copied, torch.zeros_like(pmi), pmi)
    return float(pmi.sum())


def likelihood_score(pmi: float, cfg: JudgingConfig, n_tokens: int = 1) -> float:
    """Map the PMI of an answer with its context (nats) to [1, 10]: 5.5 at ``likelihood_center``, logistic."""
    value = pmi / max(n_tokens, 1) if cfg.likelihood_per_token else pmi
    if not math.isfinite(value):  # a numerical failure of the judge: no score (the turn is skipped, counted)
        return math.nan
    z = max(-60.0, min(60.0, (value - cfg.likelihood_center) / cfg.likelihood_scale))
    return 1.0 + 9.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------------------------- prompts


class JudgePrompts:
    """The judge's prompts, tokenized in parts so that one prefix serves every category.

    A judge prompt is the chat rendering of ``[system, user: prompt(context, answer) + instruction]`` with the
    assistant reply started by a forced prefix. The prefix part (up to the instruction) is tokenized as
    head + context + middle + answer + tail, so the answer's token span is known exactly; each instruction and
    the rest of the rendering form a suffix shared by every item.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: JudgingConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        user = cfg.prompt.format(context=_SPLIT[0], answer=_SPLIT[1]) + _SPLIT[2]
        messages = chat_messages(cfg.system, [(False, user)], tokenizer.chat_template)
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a chat template: plain text
            rendered = "\n\n".join(m["content"] for m in messages) + "\n\n"
        if any(rendered.count(s) != 1 for s in _SPLIT):
            raise ExpertChatError("judging.prompt: the judge's chat template dropped or repeated the context / "
                                  "answer / instruction; check judging.prompt and the model's chat_template")
        head, rest = rendered.split(_SPLIT[0])
        middle, rest = rest.split(_SPLIT[1])
        after, self.tail = rest.split(_SPLIT[2])
        self.head_ids, self.middle_ids, self.after_ids = (self._ids(head), self._ids(middle), self._ids(after))
        names = list(cfg.rubric)
        self.rating_suffixes = {  # (category, phrasing) -> suffix ids
            (name, j): self._ids(ins.format(category=name.replace("_", " "),
                                            description=cfg.rubric[name].description) + self.tail
                                 + cfg.rating_prefix)
            for name in names for j, ins in enumerate(cfg.instructions)
        }
        first = next(iter(self.rating_suffixes))
        ins0 = cfg.instructions[0].format(category=first[0].replace("_", " "),
                                          description=cfg.rubric[first[0]].description)
        self.scores = score_tokens(tokenizer, ins0 + self.tail + cfg.rating_prefix)
        self.wim_suffix = self._ids(cfg.wim_instruction + self.tail + cfg.wim_prefix)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def context_ids(self, context: str) -> list[int]:
        ids = self._ids(context.strip())
        return ids[-self.cfg.max_context_tokens:]

    def answer_ids(self, answer: str) -> list[int]:
        return self._ids(answer.strip())[:self.cfg.max_answer_tokens]

    def prefix(self, context_ids: list[int], answer_ids: list[int]) -> tuple[list[int], int]:
        """Prefix token ids and where the answer starts in them."""
        start = len(self.head_ids) + len(context_ids) + len(self.middle_ids)
        return self.head_ids + context_ids + self.middle_ids + answer_ids + self.after_ids, start

    def parse_prompt(self, context: str, answer: str, category: str) -> str:
        """The full text prompt of parse mode for one category (the original's instruction)."""
        ins = self.cfg.parse_instruction.format(category=category.replace("_", " "),
                                                description=self.cfg.rubric[category].description)
        ids = (self.prefix(self.context_ids(context), self.answer_ids(answer))[0] + self._ids(ins + self.tail))
        return self.tok.decode(ids)

    def wim_prompt(self, context: str, answer: str) -> str:
        ids = self.prefix(self.context_ids(context), self.answer_ids(answer))[0] + self.wim_suffix
        return self.tok.decode(ids)


# ----------------------------------------------------------------------------------------- forward engine


class PrefixBatch:
    """A batch of left-padded prefixes run through the judge once, with the KV cache kept so that suffixes can
    be run on top of it (and cropped off again).

    Only the model's own forward is called (``model(input_ids=..., attention_mask=..., position_ids=...,
    cache=..., logits_to_keep=...)``), so a wrapper that switches LoRA adapters per call judges with the right
    weights. ``tail_keep`` positions of logits are kept from the prefix pass: the answer's span must end that
    close to the end of every prefix (it does: a fixed template tail follows the answer).

    ``shared`` leading tokens common to every prefix (the judge template's head) are run once and their cache
    is copied to every row; the rows are padded between that head and the rest.
    """

    def __init__(self, lm: LoadedModel, prefixes: list[list[int]], tail_keep: int = 1, shared: int = 0) -> None:
        from transformers.cache_utils import DynamicCache

        from expertchat.generation import forward_kwargs, positions_from_mask

        self.model = lm.model
        self.cache_arg, self.has_keep = forward_kwargs(self.model)
        self.device = next(self.model.parameters()).device
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self._new_cache = lambda: DynamicCache(config=self.model.config)
        self.cache = self._new_cache()
        # a sliding-window layer cannot be cropped once past its window: such judges rerun prefix + suffix instead
        self.croppable = bool(getattr(self.cache, "is_croppable", True)) and not any(
            getattr(layer, "is_sliding", False) for layer in getattr(self.cache, "layers", []))
        b = len(prefixes)
        shared = min([shared] + [len(p) - 1 for p in prefixes]) if self.croppable else 0
        head = prefixes[0][:shared]
        if any(p[:shared] != head for p in prefixes):
            raise ValueError("PrefixBatch: the prefixes do not share their first `shared` tokens")
        self.prefixes = prefixes
        rests = [p[shared:] for p in prefixes]
        width = max(len(p) for p in rests)
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, p in enumerate(rests):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, shared + width - len(p):] = 1
        self.ids, self.mask = ids.to(self.device), mask.to(self.device)
        self.width = shared + width
        positions = positions_from_mask(self.mask)
        self.positions = positions[:, shared:]
        self.tail_keep = min(tail_keep, width)
        if shared:
            head_ids = torch.tensor([head], dtype=torch.long, device=self.device)
            self._run(head_ids, self.mask[:1, :shared], positions[:1, :shared], 1)
            self.cache.batch_repeat_interleave(b)
        self.tail_logits = self._run(self.ids, self.mask, self.positions, self.tail_keep)  # [B, keep, V]
        self.next_pos = self.mask.sum(-1, keepdim=True)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.cache_arg: self.cache, "use_cache": True}
        if self.has_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -keep:]

    def extend(self, suffix: list[int], keep: int) -> torch.Tensor:
        """Run the same ``suffix`` after every prefix; return the logits of its last ``keep`` positions
        (``[B, keep, V]``) and drop the suffix from the cache again."""
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
        """Greedy continuation of ``prefix + suffix`` for every row (the WIM critique); the cache is restored."""
        n, b = len(suffix), len(self.prefixes)
        ids = torch.tensor(suffix, dtype=torch.long, device=self.device).expand(b, n)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1]).expand(-1, n)], dim=1)
        positions = self.next_pos + torch.arange(n, device=self.device)
        if not self.croppable:
            self.cache = self._new_cache()
            ids, positions = torch.cat([self.ids, ids], 1), torch.cat([self.positions, positions], 1)
        logits = self._run(ids, mask, positions, 1)
        stops = set(stop_ids)
        tokens: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        pos = positions[:, -1:]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    if t in stops:
                        done[r] = True
                    else:
                        tokens[r].append(t)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            logits = self._run(nxt[:, None], mask, pos, 1)
        if self.croppable:
            self.cache.crop(-(self.cache.get_seq_length() - self.width))
        return tokens


# ------------------------------------------------------------------------------------------------ the judge


class Judge:
    """A judge model with a rubric: rates :class:`RatingItem` s in batches.

    Args:
        lm: the judge model and tokenizer (any causal LM; a PEFT-wrapped model works too).
        cfg: the judging configuration (rubric, templates, mode).
    """

    def __init__(self, lm: LoadedModel, cfg: JudgingConfig) -> None:
        self.lm = lm
        self.cfg = cfg
        self.prompts = JudgePrompts(lm.tokenizer, cfg)
        self.counts: dict[str, int] = {"items": 0, "parse_failures": 0, "skipped": 0, "neutral": 0,
                                       "empty_answers": 0, "empty_wims": 0, "truncated_wims": 0, "non_finite": 0}
        self.seconds: dict[str, float] = {"parse_generation": 0.0, "wim_generation": 0.0}  # parse mode

    # ------------------------------------------------------------------------------------------ public
    def rate(self, items: list[RatingItem], *, wim: bool | None = None, progress: bool = False) -> list[Judgement]:
        """Rate every item in every rubric category (and write its WIM when ``wim``, default ``cfg.wim``)."""
        wim = self.cfg.wim if wim is None else wim
        results: list[Judgement | None] = [None] * len(items)
        live = []
        for i, item in enumerate(items):
            if not (item.answer or "").strip():
                results[i] = self._empty(item, wim)
            else:
                live.append(i)
        raw = self._raw([items[i] for i in live], wim=wim, progress=progress)
        for i, r in zip(live, raw):
            results[i] = self._judgement(r, wim)
        self.counts["items"] += len(items)
        return results  # type: ignore[return-value]

    def measure(self, items: list[RatingItem], *, calibrate: bool = True, wim: bool = False,
                progress: bool = False) -> list[dict[str, Any]]:
        """Raw signals per item, for experiments: per (category, phrasing) score distributions, the
        content-free distributions (calibration), answer token log-probs with and without the context."""
        return self._raw(items, wim=wim, progress=progress, calibrate=calibrate, keep_logprobs=True)

    # --------------------------------------------------------------------------------------- internals
    def _needs(self) -> tuple[bool, bool]:
        signals = {c.signal for c in self.cfg.rubric.values()}
        rubric = self.cfg.mode == "expected" and bool(signals & {"rubric", "blend"})
        likelihood = bool(signals & {"likelihood", "blend"})
        return rubric, likelihood

    @torch.no_grad()
    def _raw(self, items: list[RatingItem], *, wim: bool, progress: bool = False, calibrate: bool | None = None,
             keep_logprobs: bool = False) -> list[dict[str, Any]]:
        cfg, pr = self.cfg, self.prompts
        need_rubric, need_likelihood = self._needs()
        if keep_logprobs:
            need_rubric = need_likelihood = True
        calibrate = cfg.calibrate if calibrate is None else calibrate
        rubric_keys = [k for k in pr.rating_suffixes  # measure(): every category; rate(): those that use it
                       if keep_logprobs or cfg.rubric[k[0]].signal in {"rubric", "blend"}]
        enc = []
        for item in items:
            ctx, ans = pr.context_ids(item.context), pr.answer_ids(item.answer)
            prefix, start = pr.prefix(ctx, ans)
            enc.append({"ctx": ctx, "ans": ans, "prefix": prefix, "start": start})
        out: list[dict[str, Any]] = [{} for _ in items]
        order = sorted(range(len(items)), key=lambda i: -len(enc[i]["prefix"]))
        bar = _progress(len(items), progress, "rating")
        keep = 2 if pr.scores.ext is not None else 1
        need_prefix = need_rubric or need_likelihood or (wim and cfg.mode == "expected")
        for chunk in self._chunks(order, enc, need_likelihood) if need_prefix else []:
            tail = len(pr.after_ids) + max(len(enc[i]["ans"]) for i in chunk) + 1 if need_likelihood else 1
            batch = PrefixBatch(self.lm, [enc[i]["prefix"] for i in chunk], tail_keep=tail,
                                shared=len(pr.head_ids))
            if need_rubric:
                for key in rubric_keys:
                    ids = pr.rating_suffixes[key] + ([pr.scores.ext] if keep == 2 else [])
                    probs, mass = score_distribution(batch.extend(ids, keep), pr.scores)
                    for r, i in enumerate(chunk):
                        out[i].setdefault("dists", {})[key] = (probs[r].cpu(), float(mass[r]))
            if need_likelihood:
                spans = [(enc[i]["start"], enc[i]["start"] + len(enc[i]["ans"])) for i in chunk]
                cond = batch.span_logprobs(spans)
                for r, i in enumerate(chunk):
                    out[i]["cond"] = cond[r]
            if wim and cfg.mode == "expected":
                texts = batch.greedy(pr.wim_suffix, cfg.wim_max_new_tokens, self.lm.stop_token_ids)
                for r, i in enumerate(chunk):
                    out[i]["wim"] = self.lm.tokenizer.decode(texts[r], skip_special_tokens=True)
            del batch
            if need_likelihood:  # the same answers after a content-free context
                cf_ctx = pr.context_ids(cfg.content_free)
                base = [pr.prefix(cf_ctx, enc[i]["ans"]) for i in chunk]
                batch = PrefixBatch(self.lm, [p for p, _ in base], tail_keep=tail,
                                    shared=len(pr.head_ids) + len(cf_ctx) + len(pr.middle_ids) - 1)
                spans = [(st, st + len(enc[i]["ans"])) for (_, st), i in zip(base, chunk)]
                for r, (i, lp) in enumerate(zip(chunk, batch.span_logprobs(spans))):
                    out[i]["uncond"] = lp
                del batch
            if need_rubric and calibrate:  # content-free answer, same context
                cf_ans = pr.answer_ids(cfg.content_free)
                batch = PrefixBatch(self.lm, [pr.prefix(enc[i]["ctx"], cf_ans)[0] for i in chunk],
                                    shared=len(pr.head_ids))
                for key in rubric_keys:
                    ids = pr.rating_suffixes[key] + ([pr.scores.ext] if keep == 2 else [])
                    probs, _ = score_distribution(batch.extend(ids, keep), pr.scores)
                    for r, i in enumerate(chunk):
                        out[i].setdefault("cf_dists", {})[key] = probs[r].cpu()
                del batch
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if cfg.mode == "parse":
            self._parse_pass(items, out, wim)
        for i, item in enumerate(items):
            out[i]["answer_tokens"] = len(enc[i]["ans"])
            if "cond" in out[i]:
                copied = copied_mask(enc[i]["ctx"], enc[i]["ans"], cfg.likelihood_copy_ngram)
                out[i]["pmi"] = token_pmi(out[i]["cond"], out[i]["uncond"], copied)
                out[i]["copied_tokens"] = int(copied.sum())
                if not keep_logprobs:
                    del out[i]["cond"], out[i]["uncond"]
            out[i]["calibrate"] = calibrate
        return out

    def _chunks(self, order: list[int], enc: list[dict[str, Any]], likelihood: bool) -> list[list[int]]:
        """Cut items (longest prefix first) into batches of at most ``batch_size`` rows; with the likelihood on,
        also at most ``LOGITS_BUDGET`` kept logits (rows x answer positions x vocabulary)."""
        vocab = int(getattr(self.lm.model.config, "vocab_size", None) or len(self.lm.tokenizer))
        tail = len(self.prompts.after_ids) + 1
        chunks: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            n = max(longest, tail + len(enc[i]["ans"]))
            too_big = likelihood and current and (len(current) + 1) * n * vocab > LOGITS_BUDGET
            if current and (len(current) >= self.cfg.batch_size or too_big):
                chunks.append(current)
                current, n = [], tail + len(enc[i]["ans"])
            current.append(i)
            longest = n
        if current:
            chunks.append(current)
        return chunks

    def _parse_pass(self, items: list[RatingItem], out: list[dict[str, Any]], wim: bool) -> None:
        """Parse mode: one generation per (item, category); WIM from those replies or a WIM generation."""
        from expertchat.generation import generate

        cfg = self.cfg
        gen = GenerationConfig(strategy=cfg.parse_strategy, max_new_tokens=cfg.parse_max_new_tokens,
                               temperature=cfg.parse_temperature, top_k=cfg.parse_top_k,
                               penalty_alpha=cfg.parse_penalty_alpha, batch_size=cfg.batch_size)
        names = list(cfg.rubric)
        prompts = [self.prompts.parse_prompt(it.context, it.answer, name) for it in items for name in names]
        start = time.perf_counter()
        texts = [g.text for g in generate(self.lm.model, self.lm.tokenizer, prompts, gen,
                                          stop_token_ids=self.lm.stop_token_ids, seed=0)]
        self.seconds["parse_generation"] += time.perf_counter() - start
        for i in range(len(items)):
            replies = texts[i * len(names):(i + 1) * len(names)]
            out[i]["replies"] = dict(zip(names, replies))
            found = next((w for w in map(parse_wim, replies) if w), None)
            if found is not None:
                out[i]["wim"], out[i]["wim_parsed"] = found, True
        if wim:
            missing = [i for i in range(len(items)) if "wim" not in out[i]]
            if missing:
                wim_gen = GenerationConfig(strategy="sample", top_k=1, max_new_tokens=cfg.wim_max_new_tokens,
                                           batch_size=cfg.batch_size)
                prompts = [self.prompts.wim_prompt(items[i].context, items[i].answer) for i in missing]
                start = time.perf_counter()
                for i, g in zip(missing, generate(self.lm.model, self.lm.tokenizer, prompts, wim_gen,
                                                  stop_token_ids=self.lm.stop_token_ids, seed=0)):
                    out[i]["wim"] = g.text
                self.seconds["wim_generation"] += time.perf_counter() - start

    def _rubric_from_raw(self, raw: dict[str, Any], name: str) -> CategoryScore:
        """The category's rubric score: the phrasings' distributions averaged (calibrated when configured)."""
        keys = [k for k in raw["dists"] if k[0] == name]
        dists, masses = [], []
        for key in keys:
            p, mass = raw["dists"][key]
            if raw.get("calibrate") and "cf_dists" in raw:
                p = p / raw["cf_dists"][key].clamp_min(1e-6)
                p = p / p.sum()
            dists.append(p)
            masses.append(mass)
        p = torch.stack(dists).mean(0)
        return CategoryScore(score=float(expected_score(p)), signal="rubric", dist=p.tolist(),
                             argmax=int(p.argmax()) + 1, entropy=float(entropy(p)), mass=sum(masses) / len(masses))

    def _judgement(self, raw: dict[str, Any], wim: bool) -> Judgement:
        cfg = self.cfg
        cats: dict[str, CategoryScore] = {}
        failed = neutral = False
        for name, cat in cfg.rubric.items():
            like = None
            if cat.signal in {"likelihood", "blend"}:
                like = likelihood_score(raw["pmi"], cfg, raw["answer_tokens"])
            if cfg.mode == "parse" and cat.signal != "likelihood":
                reply = raw["replies"][name]
                value = parse_rating(reply)
                cs = CategoryScore(score=value, signal="parse", raw=reply[:2000])
                if value is None:
                    self.counts["parse_failures"] += 1
                    cs.status = "parse_failure"
                    if cfg.on_parse_failure == "neutral":
                        cs.score, neutral = cfg.neutral_score, True
                    else:
                        failed = True
            elif cat.signal == "likelihood":
                cs = CategoryScore(score=like, signal="likelihood", likelihood=like)
            else:
                cs = self._rubric_from_raw(raw, name)
            if cat.signal == "blend" and cs.score is not None:
                cs.rubric, cs.likelihood, cs.signal = cs.score, like, "blend"
                cs.score = (cs.score + like) / 2
            cats[name] = cs
        if failed:
            self.counts["skipped"] += 1
            score, status = None, "skipped"
        else:
            score = weighted_score(cats, cfg)
            status = "neutral" if neutral else "ok"
            self.counts["neutral"] += int(neutral)
            if score is None:  # a non-finite category score (e.g. fp16 overflow in the judge): skipped, counted
                status = "skipped"
                self.counts["skipped"] += 1
                self.counts["non_finite"] += 1
        j = Judgement(categories=cats, score=score, status=status, pmi=raw.get("pmi"),
                      answer_tokens=raw["answer_tokens"])
        if wim:
            text, empty, truncated = clean_wim(raw.get("wim"), cfg.wim_max_chars)
            j.wim, j.wim_empty = text, empty
            j.wim_status = "empty" if empty else "parsed" if raw.get("wim_parsed") else \
                "truncated" if truncated else "ok"
            self.counts["empty_wims"] += int(empty)
            self.counts["truncated_wims"] += int(truncated)
        return j

    def _empty(self, item: RatingItem, wim: bool) -> Judgement:
        """An empty turn: the lowest score in every category, no critique; counted."""
        self.counts["empty_answers"] += 1
        cats = {name: CategoryScore(score=1.0, signal=cat.signal, status="empty_answer")
                for name, cat in self.cfg.rubric.items()}
        return Judgement(categories=cats, score=1.0, status="empty_answer",
                         wim="" if wim else None, wim_empty=wim, wim_status="empty" if wim else "none")


def weighted_score(cats: dict[str, CategoryScore], cfg: JudgingConfig) -> float | None:
    """The weighted mean of the category scores (weights from the rubric), clipped to [1, 10]."""
    total = weight = 0.0
    for name, cs in cats.items():
        w = cfg.rubric[name].weight
        if cs.score is None or not math.isfinite(cs.score):
            return None
        if w > 0:
            total += w * min(10.0, max(1.0, cs.score))
            weight += w
    return total / weight if weight > 0 else None


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="turn")


# ------------------------------------------------------------------------------------------ the rating stage

RATINGS_FILE = "ratings.jsonl"


def join_context(texts: list[str], n: int) -> str:
    """The judge's context: the last ``n`` of the message texts before a turn, blank-line separated."""
    return "\n\n".join(list(texts)[-n:])


def turn_context(turns: list[tuple[bool, str]], n: int) -> str:
    """The judge's context from ``(own, text)`` turns (``dialogue.context``): see :func:`join_context`."""
    return join_context([text for _, text in turns], n)


def dialogue_items(dialogues: list, ratee: str, dialogue_cfg, judging: JudgingConfig) -> list[RatingItem]:
    """One :class:`RatingItem` per turn ``ratee`` spoke: the preceding context (opening question included) and
    the turn."""
    from expertchat.dialogue import context

    items = []
    for d in dialogues:
        for t in d.turns:
            if t["role"] == ratee:
                ctx = turn_context(context(d, ratee, t["turn"], dialogue_cfg), judging.context_turns)
                items.append(RatingItem(ctx, t["text"], {"dialogue_id": d.id, "turn": t["turn"], "topic": d.topic,
                                                         "ratee_model": t["model"]}))
    return items


def rating_record(item: RatingItem, j: Judgement, parts, mode: str, **extra: Any) -> dict[str, Any]:
    """One line of ``ratings.jsonl``: every component of the rating, not just the reward."""
    return {
        **extra, **item.meta, "mode": mode, "status": j.status, "score": _r(j.score),
        "categories": {name: cs.to_json() for name, cs in j.categories.items()},
        "pmi": _r(j.pmi), "answer_tokens": j.answer_tokens, "wim": j.wim, "wim_status": j.wim_status,
        "similarity": _r(parts.similarity), "similarity_status": parts.similarity_status,
        "rating": _r(parts.rating), "reward": _r(parts.reward),
    }


def _r(x: float | None, nd: int = 5) -> float | None:
    return None if x is None else round(float(x), nd)


def summarize(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Means of score, each category, similarity and reward over rated records, and the counts of every case."""
    def mean(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {
        "rated": len(records), "scored": sum(r["score"] is not None for r in records),
        "score_mean": mean(r["score"] for r in records),
        "category_means": {n: mean(r["categories"][n]["score"] for r in records) for n in names},
        "similarity_mean": mean(r["similarity"] for r in records),
        "reward_mean": mean(r["reward"] for r in records),
        "parse_failures": sum(c.get("status") == "parse_failure" for r in records for c in r["categories"].values()),
        "skipped": sum(r["status"] == "skipped" for r in records),
        "neutral": sum(r["status"] == "neutral" for r in records),
        "empty_answers": sum(r["status"] == "empty_answer" for r in records),
        "empty_wims": sum(r["wim_status"] == "empty" for r in records),
    }


def run_rating(models: dict[str, LoadedModel], dialogues: list, dialogue_cfg, judging: JudgingConfig, reward,
               store, *, round_idx: int = 0, progress: bool = True) -> dict[str, Any]:
    """The rating stage: each model rates every turn of the other; one ``ratings.jsonl`` line per rated turn.

    Args:
        models: ``{"actor": ..., "judge": ...}``; the rater of the actor's turns is the judge and vice versa.
        dialogues: the round's dialogues (``dialogue.run_dialogues`` / ``dialogue.load_dialogues``).
        reward: the :class:`~expertchat.config.RewardConfig` (zeta, empty-WIM similarity, embedder).
        store: the run folder; records are appended and flushed per rater.

    Returns:
        The stage summary: per rated model (``ratee``) the means and counts of :func:`summarize`, and seconds.
    """
    from expertchat.dialogue import ROLES
    from expertchat.rewards import load_embedder, rewards

    embedder = load_embedder(reward.embedder) if reward.zeta > 0 else None
    summary: dict[str, Any] = {"mode": judging.mode, "zeta": reward.zeta, "models": {}}
    for ratee in ROLES:
        rater = ROLES[1 - ROLES.index(ratee)]
        items = dialogue_items(dialogues, ratee, dialogue_cfg, judging)
        start = time.perf_counter()
        judge = Judge(models[rater], judging)
        judgements = judge.rate(items, wim=reward.zeta > 0 and judging.wim, progress=progress)
        parts = rewards(judgements, [it.answer for it in items], reward, embedder)
        seconds = time.perf_counter() - start
        records = [rating_record(it, j, p, judging.mode, round=round_idx, rater=rater, ratee=ratee,
                                 rater_model=models[rater].name)
                   for it, j, p in zip(items, judgements, parts)]
        for rec in records:
            store.append(RATINGS_FILE, rec)
        s = summarize(records, list(judging.rubric))
        s.update(rater=rater, rater_model=models[rater].name, ratee_model=models[ratee].name,
                 seconds=round(seconds, 2))
        summary["models"][ratee] = s
        log.info("round %d: %s (%s) rated by %s: score %s, reward %s, %s/%s scored, %.1fs", round_idx, ratee,
                 models[ratee].name, rater, s["score_mean"], s["reward_mean"], s["scored"], s["rated"], seconds)
    return summary
