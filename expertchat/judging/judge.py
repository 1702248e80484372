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
the mean of both. ``turing`` is the seed's game asked of the judge: after the turn, a forced choice "written by a
human expert or by an AI? Answer A or B", its reply forced to start ``Answer:``; p(human expert) = p_A / (p_A + p_B)
from the next-token probabilities (each letter with and without a leading space), asked in both letter orders and
averaged, scored 1 + 9 p. ``experiments/judge_sanity`` measures which signal a small judge can be trusted with.

Cost: the context and the turn are encoded once per turn (the *prefix*); each category's instruction, each
phrasing, the turing question (two letter orders), the content-free calibration and the WIM request are short
*suffixes* run on the cached prefix. All
turns go through in batches of ``judging.batch_size``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from expertchat.config.schema import GenerationConfig, JudgingConfig
from expertchat.engine.kvcache import PrefixBatch
from expertchat.engine.models import LoadedModel
from expertchat.engine.prefixcache import distinct
from expertchat.judging.prompts import JudgePrompts
from expertchat.judging.scoring import (
    choice_probabilities,
    clean_wim,
    copied_mask,
    parse_wim,
    score_distribution,
    token_pmi,
)
from expertchat.judging.signals import SIGNALS, CategoryScore, Measured, needs, resolve
from expertchat.report.console import progress_bar

log = logging.getLogger(__name__)

LOGITS_BUDGET = 2 ** 27  # most logits kept at once for the likelihood (x 2 bytes in bf16: 256 MiB)


# ------------------------------------------------------------------------------------------------- records


@dataclass
class RatingItem:
    """One thing to rate: ``answer`` (the rated turn) in reply to ``context`` (a question or earlier turns)."""

    context: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)  # carried into the output record (ids, rater, ...)


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
    answer_tokens: int = 0  # tokens of the answer the judge read
    answer_total_tokens: int = 0  # tokens of the whole answer: more than answer_tokens when it was cut

    @property
    def judge_saw_whole(self) -> bool:
        return self.answer_tokens >= self.answer_total_tokens


# ------------------------------------------------------------------------------------------------ the judge


class Judge:
    """A judge model with a rubric: rates :class:`RatingItem` s in batches.

    Args:
        lm: the judge model and tokenizer (any causal LM; a PEFT-wrapped model works too).
        cfg: the judging configuration (rubric, templates, mode).
        share_context: items of a batch with the same context (the two samples of a DPO prompt) encode it once
            (``PrefixBatch(split=...)``); False encodes every item whole (the same scores, up to float rounding).
    """

    def __init__(self, lm: LoadedModel, cfg: JudgingConfig, share_context: bool = True) -> None:
        self.lm = lm
        self.cfg = cfg
        self.share_context = share_context
        self.prompts = JudgePrompts(lm.tokenizer, cfg)
        self.counts: dict[str, int] = {"items": 0, "parse_failures": 0, "skipped": 0, "neutral": 0,
                                       "empty_answers": 0, "empty_wims": 0, "truncated_wims": 0, "non_finite": 0}
        self.seconds: dict[str, float] = {"parse_generation": 0.0, "wim_generation": 0.0}  # parse mode

    # ------------------------------------------------------------------------------------------ public
    def rate(self, items: list[RatingItem], *, wim: bool | None = None, progress: bool = False,
             desc: str = "rating") -> list[Judgement]:
        """Rate every item in every rubric category (and write its WIM when ``wim``, default ``cfg.wim``);
        ``desc`` names the progress shown with ``progress``."""
        wim = self.cfg.wim if wim is None else wim
        results: list[Judgement | None] = [None] * len(items)
        live = []
        for i, item in enumerate(items):
            if not (item.answer or "").strip():
                results[i] = self._empty(item, wim)
            else:
                live.append(i)
        raw = self._raw([items[i] for i in live], wim=wim, progress=progress, desc=desc)
        for i, r in zip(live, raw):
            results[i] = self._judgement(r, wim)
        self.counts["items"] += len(items)
        return results  # type: ignore[return-value]

    def measure(self, items: list[RatingItem], *, calibrate: bool = True, wim: bool = False,
                progress: bool = False) -> list[Measured]:
        """Raw signals per item, for experiments: per (category, phrasing) score distributions, the
        content-free distributions (calibration), answer token log-probs with and without the context."""
        return self._raw(items, wim=wim, progress=progress, calibrate=calibrate, keep_logprobs=True)

    # --------------------------------------------------------------------------------------- internals
    def _needs(self) -> set[str]:
        """What the active categories need measured (``distributions``, ``logprobs``, ``turing``, ``replies``)."""
        return set().union(*(needs(c.signal, self.cfg.mode) for c in self.cfg.active().values()))

    @torch.no_grad()
    def _raw(self, items: list[RatingItem], *, wim: bool, progress: bool = False, calibrate: bool | None = None,
             keep_logprobs: bool = False, desc: str = "rating") -> list[Measured]:
        """What the judge measured per item (:class:`~expertchat.judging.signals.Measured`): the score
        distributions per (category, phrasing), with and without a content-free answer, the answer's token
        log-probs with the context and a content-free one folded into ``pmi``, the turing choice, the WIM text,
        token counts (``keep_logprobs``: everything, for :meth:`measure`)."""
        cfg, pr = self.cfg, self.prompts
        wanted = self._needs() | ({"distributions", "logprobs", "turing"} if keep_logprobs else set())
        need_rubric, need_likelihood, turing = (k in wanted for k in ("distributions", "logprobs", "turing"))
        calibrate = cfg.calibrate if calibrate is None else calibrate
        rubric_keys = [k for k in pr.rating_suffixes  # measure(): every category; rate(): those that use it
                       if keep_logprobs or "distributions" in needs(cfg.rubric[k[0]].signal, cfg.mode)
                       ] if need_rubric else []
        enc = [self._encode(item) for item in items]
        out = [Measured(calibrate=calibrate) for _ in items]
        order = sorted(range(len(items)), key=lambda i: -len(enc[i]["prefix"]))
        expected_wim = wim and cfg.mode == "expected"
        prefix_pass = rubric_keys or need_likelihood or turing or expected_wim
        chunks = self._chunks(order, enc, need_likelihood) if prefix_pass else []
        parse = max(cfg.batch_size, -(-len(items) // 10)) if cfg.mode == "parse" else 0  # items per parse pass
        with progress_bar(len(items) * (bool(chunks) + bool(parse)), progress, desc, unit="turn") as bar:
            for chunk in chunks:
                tail = len(pr.after_ids) + max(len(enc[i]["ans"]) for i in chunk) + 1 if need_likelihood else 1
                self._prefix_pass(chunk, enc, out, rubric_keys, tail, need_likelihood, turing, expected_wim)
                if need_likelihood:
                    self._content_free_context(chunk, enc, out, tail)
                if rubric_keys and calibrate:
                    self._content_free_answer(chunk, enc, out, rubric_keys)
                bar.update(len(chunk))
            for lo in range(0, len(items) if parse else 0, parse or 1):  # parse mode generates: the slow part
                self._parse_pass(items[lo:lo + parse], out[lo:lo + parse], wim)
                bar.update(len(items[lo:lo + parse]))
        for i, m in enumerate(out):
            m.answer_tokens, m.answer_total_tokens = len(enc[i]["ans"]), enc[i]["total"]
            if m.cond is not None:
                copied = copied_mask(enc[i]["ctx"], enc[i]["ans"], cfg.likelihood_copy_ngram)
                m.pmi, m.copied_tokens = token_pmi(m.cond, m.uncond, copied), int(copied.sum())
                if not keep_logprobs:
                    m.cond = m.uncond = None
        return out

    def _encode(self, item: RatingItem) -> dict[str, Any]:
        """The item's context and answer ids (capped), its prefix ids and where the answer starts in them."""
        full = self.prompts.all_answer_ids(item.answer)
        ctx, ans = self.prompts.context_ids(item.context), self.prompts.cut_answer(full)
        prefix, start = self.prompts.prefix(ctx, ans)
        return {"ctx": ctx, "ans": ans, "prefix": prefix, "start": start, "total": len(full)}

    def _distributions(self, batch: PrefixBatch, keys: list[tuple[str, int]]):
        """``(key, probs [B, 10], mass [B])`` for each (category, phrasing) suffix run on ``batch``."""
        pr = self.prompts
        keep = 2 if pr.scores.ext is not None else 1
        for key in keys:
            ids = pr.rating_suffixes[key] + ([pr.scores.ext] if keep == 2 else [])
            probs, mass = score_distribution(batch.extend(ids, keep), pr.scores)
            yield key, probs, mass

    def _prefix_pass(self, chunk: list[int], enc: list[dict[str, Any]], out: list[Measured],
                     rubric_keys: list[tuple[str, int]], tail: int, likelihood: bool, turing: bool, wim: bool) -> None:
        """One encoding of context + answer per item; the rubric suffixes, the answer's log-probs, the turing
        question and the WIM continuation all read its cache."""
        pr = self.prompts
        split = [len(pr.head_ids) + len(enc[i]["ctx"]) + len(pr.middle_ids) - 1 for i in chunk]  # context's end - 1
        batch = PrefixBatch(self.lm, [enc[i]["prefix"] for i in chunk], tail_keep=tail, shared=len(pr.head_ids),
                            reserve=_reserve(self.prompts, self.cfg, wim), split=split if self.share_context else None)
        for key, probs, mass in self._distributions(batch, rubric_keys):
            for r, i in enumerate(chunk):
                out[i].dists[key] = (probs[r].cpu(), float(mass[r]))
        if likelihood:
            spans = [(enc[i]["start"], enc[i]["start"] + len(enc[i]["ans"])) for i in chunk]
            for i, lp in zip(chunk, batch.span_logprobs(spans)):
                out[i].cond = lp
        if turing:
            for i, orders in zip(chunk, turing_choice(batch, pr)):
                out[i].turing = orders
        if wim:
            texts = batch.greedy(pr.wim_suffix, self.cfg.wim_max_new_tokens, self.lm.stop_token_ids)
            for r, i in enumerate(chunk):
                out[i].wim = self.lm.tokenizer.decode(texts[r], skip_special_tokens=True)

    def _content_free_context(self, chunk: list[int], enc: list[dict[str, Any]], out: list[Measured],
                              tail: int) -> None:
        """The answers' log-probs after a content-free context (the PMI's second term)."""
        pr = self.prompts
        cf_ctx = pr.context_ids(self.cfg.content_free)
        base = [pr.prefix(cf_ctx, enc[i]["ans"]) for i in chunk]
        batch = PrefixBatch(self.lm, [p for p, _ in base], tail_keep=tail,
                            shared=len(pr.head_ids) + len(cf_ctx) + len(pr.middle_ids) - 1, reserve=0)
        spans = [(st, st + len(enc[i]["ans"])) for (_, st), i in zip(base, chunk)]
        for i, lp in zip(chunk, batch.span_logprobs(spans)):
            out[i].uncond = lp

    def _content_free_answer(self, chunk: list[int], enc: list[dict[str, Any]], out: list[Measured],
                             rubric_keys: list[tuple[str, int]]) -> None:
        """The score distributions of a content-free answer in the same context (contextual calibration), once per
        distinct context of the chunk."""
        pr = self.prompts
        cf_ans = pr.answer_ids(self.cfg.content_free)
        firsts, index = distinct([tuple(enc[i]["ctx"]) for i in chunk] if self.share_context else list(chunk))
        batch = PrefixBatch(self.lm, [pr.prefix(enc[chunk[f]]["ctx"], cf_ans)[0] for f in firsts],
                            shared=len(pr.head_ids), reserve=_reserve(self.prompts, self.cfg, False))
        for key, probs, _ in self._distributions(batch, rubric_keys):
            for i, r in zip(chunk, index):
                out[i].cf_dists[key] = probs[r].cpu()

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

    def _parse_pass(self, items: list[RatingItem], out: list[Measured], wim: bool) -> None:
        """Parse mode: one generation per (item, category); WIM from those replies or a WIM generation."""
        from expertchat.engine.generation import generate

        cfg = self.cfg
        p = cfg.parse
        gen = GenerationConfig(strategy=p.strategy, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                               top_k=p.top_k, penalty_alpha=p.penalty_alpha, batch_size=cfg.batch_size)
        names = list(cfg.active())
        prompts = [self.prompts.parse_prompt(it.context, it.answer, name) for it in items for name in names]
        start = time.perf_counter()
        texts = [g.text for g in generate(self.lm.model, self.lm.tokenizer, prompts, gen,
                                          stop_token_ids=self.lm.stop_token_ids, seed=0)]
        self.seconds["parse_generation"] += time.perf_counter() - start
        for i in range(len(items)):
            replies = texts[i * len(names):(i + 1) * len(names)]
            out[i].replies = dict(zip(names, replies))
            found = next((w for w in map(parse_wim, replies) if w), None)
            if found is not None:
                out[i].wim, out[i].wim_parsed = found, True
        if wim:
            missing = [i for i in range(len(items)) if out[i].wim is None]
            if missing:
                wim_gen = GenerationConfig(strategy="sample", top_k=1, max_new_tokens=cfg.wim_max_new_tokens,
                                           batch_size=cfg.batch_size)
                prompts = [self.prompts.wim_prompt(items[i].context, items[i].answer) for i in missing]
                start = time.perf_counter()
                for i, g in zip(missing, generate(self.lm.model, self.lm.tokenizer, prompts, wim_gen,
                                                  stop_token_ids=self.lm.stop_token_ids, seed=0)):
                    out[i].wim = g.text
                self.seconds["wim_generation"] += time.perf_counter() - start

    def _judgement(self, m: Measured, wim: bool) -> Judgement:
        """The item's verdict: each active category scored by its signal (:data:`SIGNALS`), weighted, and its WIM."""
        cfg = self.cfg
        cats = {name: SIGNALS[resolve(cat.signal, cfg.mode)].score(m, name, cfg)
                for name, cat in cfg.active().items()}
        failures = sum(cs.status == "parse_failure" for cs in cats.values())
        self.counts["parse_failures"] += failures
        failed = failures > 0 and cfg.on_parse_failure != "neutral"
        neutral = failures > 0 and cfg.on_parse_failure == "neutral"
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
        j = Judgement(categories=cats, score=score, status=status, pmi=m.pmi,
                      answer_tokens=m.answer_tokens, answer_total_tokens=m.answer_total_tokens)
        if wim:
            text, empty, truncated = clean_wim(m.wim, cfg.wim_max_chars)
            j.wim, j.wim_empty = text, empty
            j.wim_status = "empty" if empty else "parsed" if m.wim_parsed else \
                "truncated" if truncated else "ok"
            self.counts["empty_wims"] += int(empty)
            self.counts["truncated_wims"] += int(truncated)
        return j

    def _empty(self, item: RatingItem, wim: bool) -> Judgement:
        """An empty turn: the lowest score in every category, no critique; counted."""
        self.counts["empty_answers"] += 1
        cats = {name: CategoryScore(score=1.0, signal=cat.signal, status="empty_answer")
                for name, cat in self.cfg.active().items()}
        return Judgement(categories=cats, score=1.0, status="empty_answer",
                         wim="" if wim else None, wim_empty=wim, wim_status="empty" if wim else "none")


def turing_choice(batch: PrefixBatch, prompts: JudgePrompts) -> list[list[tuple[float, float]]]:
    """The forced choice "a human expert or an AI?" in both letter orders, one suffix each on ``batch``'s cache: per
    row, ``[(p(human expert), probability on the two letters)]`` for order 0 (A = human expert), then 1 (A = AI)."""
    rows: list[list[tuple[float, float]]] = [[] for _ in batch.prefixes]
    for order, ids in enumerate(prompts.turing_suffixes):
        p, mass = choice_probabilities(batch.extend(ids, 1)[:, -1], prompts.turing_choices)
        for r, row in enumerate(rows):
            row.append((float(p[r, order]), float(mass[r])))
    return rows


def _reserve(pr: JudgePrompts, cfg: JudgingConfig, wim: bool) -> int:
    """Cache positions a prefix batch needs after its prefixes: the longest suffix run on it."""
    return max([len(ids) + 1 for ids in [*pr.rating_suffixes.values(), *pr.turing_suffixes]]
               + [len(pr.wim_suffix) + cfg.wim_max_new_tokens if wim else 0])


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


def join_context(texts: list[str], n: int) -> str:
    """The judge's context: the last ``n`` of the message texts before a turn, blank-line separated."""
    return "\n\n".join(list(texts)[-n:])


def turn_context(turns: list[tuple[bool, str]], n: int) -> str:
    """The judge's context from ``(own, text)`` turns (``dialogue.context``): see :func:`join_context`."""
    return join_context([text for _, text in turns], n)
