"""The judge's signals: how a rubric category's score in [1, 10] is read off what the judge measured.

Each signal is one entry of :data:`SIGNALS`: what it needs measured and how it scores. A category's configured
``signal`` (``judging.rubric.<name>.signal``) resolves to an entry by :func:`resolve` (in ``judging.mode=parse`` the
rating signal is ``parse``, not ``rubric``). What the judge's passes measured for one item is a :class:`Measured`;
a signal turns it into a :class:`CategoryScore`. Adding a signal is one entry here (and its test).

Needs (what :class:`~expertchat.judging.judge.Judge` computes when some active category's signal asks for it):
``distributions`` (the score-token distributions of every phrasing, expected mode), ``logprobs`` (the answer's
token log-probs with and without the context: the PMI), ``replies`` (parse mode's generated replies), ``turing``
(the forced choice "a human expert or an AI?" in both letter orders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from expertchat.config.judging import JudgingConfig
from expertchat.judging.scoring import entropy, expected_score, likelihood_score, parse_rating


@dataclass
class Measured:
    """What the judge measured for one item, before any signal scores it.

    Attributes:
        answer_tokens: tokens of the answer the judge read (a long answer is cut to its two ends).
        answer_total_tokens: tokens of the whole answer.
        calibrate: whether rubric distributions are divided by the content-free answer's.
        dists: ``(category, phrasing) -> (probabilities [10] of the scores 1..10, probability mass on them)``.
        cf_dists: ``(category, phrasing) -> probabilities [10]`` for a content-free answer (calibration).
        cond: the answer's token log-probs given its context, ``[answer_tokens]`` (``measure`` keeps them).
        uncond: the same given a content-free context, ``[answer_tokens]``.
        pmi: summed ``cond - uncond`` over the answer tokens not copied from the context (nats).
        copied_tokens: answer tokens inside an n-gram copied from the context (they count 0 in ``pmi``).
        wim: the judge's "what is missing" text, as generated.
        wim_parsed: the WIM came from a parse-mode reply's ``[[[...]]]``.
        replies: parse mode: category -> the judge's generated reply.
        turing: per letter order (A = human expert, then A = AI): (p(human expert) renormalized over the two
            letters, the probability the judge put on the two letters).
    """

    answer_tokens: int = 0
    answer_total_tokens: int = 0
    calibrate: bool = False
    dists: dict[tuple[str, int], tuple[torch.Tensor, float]] = field(default_factory=dict)
    cf_dists: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    pmi: float | None = None
    copied_tokens: int | None = None
    wim: str | None = None
    wim_parsed: bool = False
    replies: dict[str, str] = field(default_factory=dict)
    turing: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class CategoryScore:
    """A category's score in [1, 10] (``None``: unparseable and skipped) and how it was obtained."""

    score: float | None
    signal: str  # rubric | likelihood | blend | parse | turing
    status: str = "ok"  # ok | parse_failure (parse mode) | empty_answer
    dist: list[float] | None = None  # expected mode: renormalized probabilities of the scores 1..10
    argmax: int | None = None
    entropy: float | None = None  # nats, of ``dist``
    mass: float | None = None  # probability the judge put on the ten scores (turing: two letters), not renormalized
    rubric: float | None = None  # the rubric score behind a likelihood/blend signal
    likelihood: float | None = None  # the likelihood score behind a likelihood/blend signal
    raw: str | None = None  # parse mode: the judge's text (capped)
    p_human: float | None = None  # turing: the judge's probability that a human expert wrote the turn

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v is not None or k == "score"}
        if self.dist is not None:
            out["dist"] = [round(p, 5) for p in self.dist]
        for k in ("score", "entropy", "mass", "rubric", "likelihood", "p_human"):
            if out.get(k) is not None:
                out[k] = round(out[k], 5)
        return out


@dataclass(frozen=True)
class Signal:
    """One way to score a category: ``needs`` (what must be measured) and ``score(measured, category, cfg)``."""

    needs: frozenset[str]
    score: Callable[[Measured, str, JudgingConfig], CategoryScore]


def rubric(m: Measured, name: str, cfg: JudgingConfig) -> CategoryScore:
    """The expected score over the ten score tokens, the phrasings' distributions averaged (each divided by the
    content-free answer's and renormalized when ``m.calibrate``: contextual calibration, Zhao et al. 2021)."""
    dists, masses = [], []
    for key in [k for k in m.dists if k[0] == name]:
        p, mass = m.dists[key]
        if m.calibrate and m.cf_dists:
            p = p / m.cf_dists[key].clamp_min(1e-6)
            p = p / p.sum()
        dists.append(p)
        masses.append(mass)
    p = torch.stack(dists).mean(0)
    return CategoryScore(score=float(expected_score(p)), signal="rubric", dist=p.tolist(),
                         argmax=int(p.argmax()) + 1, entropy=float(entropy(p)), mass=sum(masses) / len(masses))


def parse(m: Measured, name: str, cfg: JudgingConfig) -> CategoryScore:
    """The ``[[N]]`` parsed from the judge's reply; unparseable: status ``parse_failure``, scored
    ``cfg.neutral_score`` under ``on_parse_failure=neutral``, else ``None`` (the item is skipped)."""
    reply = m.replies[name]
    value = parse_rating(reply)
    cs = CategoryScore(score=value, signal="parse", raw=reply[:2000])
    if value is None:
        cs.status = "parse_failure"
        if cfg.on_parse_failure == "neutral":
            cs.score = cfg.neutral_score
    return cs


def likelihood(m: Measured, name: str, cfg: JudgingConfig) -> CategoryScore:
    """GPTScore-style relevance: the PMI of the answer with its context mapped to [1, 10] by a logistic curve
    (:func:`~expertchat.judging.scoring.likelihood_score`). The category's wording is not read."""
    like = likelihood_score(m.pmi, cfg, m.answer_tokens)
    return CategoryScore(score=like, signal="likelihood", likelihood=like)


def blend(m: Measured, name: str, cfg: JudgingConfig) -> CategoryScore:
    """The mean of the judge's rating (``rubric``, or ``parse`` in parse mode) and the likelihood score."""
    cs = SIGNALS[rating_signal(cfg.mode)].score(m, name, cfg)
    like = likelihood_score(m.pmi, cfg, m.answer_tokens)
    if cs.score is not None:
        cs.rubric, cs.likelihood, cs.signal = cs.score, like, "blend"
        cs.score = (cs.score + like) / 2
    return cs


def turing(m: Measured, name: str, cfg: JudgingConfig) -> CategoryScore:
    """The seed's game as a signal: the judge's probability that a human expert rather than an AI wrote the turn,
    p = p_A / (p_A + p_B) from its next-token probabilities after a forced-choice question (``judging.turing``),
    asked in both letter orders (A = human expert, then A = AI) and averaged, which cancels a small judge's
    preference for one letter or position (selection bias: Zheng et al. 2024, "Large Language Models Are Not Robust
    Multiple Choice Selectors", whose permutation baseline this is). Score 1 + 9 p in [1, 10]; ``mass`` is the
    probability the judge put on the two letters (mean of both orders). The category's wording is not read.
    """
    p = sum(ph for ph, _ in m.turing) / len(m.turing)
    mass = sum(ms for _, ms in m.turing) / len(m.turing)
    return CategoryScore(score=1.0 + 9.0 * p, signal="turing", p_human=p, mass=mass)


# The registry: a category's configured signal -> how it is scored. "rating" in ``needs``: the mode's rating signal.
SIGNALS: dict[str, Signal] = {
    "rubric": Signal(frozenset({"distributions"}), rubric),
    "parse": Signal(frozenset({"replies"}), parse),
    "likelihood": Signal(frozenset({"logprobs"}), likelihood),
    "blend": Signal(frozenset({"logprobs", "rating"}), blend),
    "turing": Signal(frozenset({"turing"}), turing),
}


def rating_signal(mode: str) -> str:
    """The signal that reads the judge's rating: ``rubric`` (expected mode) or ``parse`` (parse mode)."""
    return "parse" if mode == "parse" else "rubric"


def resolve(signal: str, mode: str) -> str:
    """The registry entry a configured ``signal`` means under ``judging.mode``.

    >>> resolve("rubric", "parse"), resolve("blend", "parse"), resolve("likelihood", "expected")
    ('parse', 'blend', 'likelihood')
    """
    return rating_signal(mode) if signal == "rubric" else signal


def needs(signal: str, mode: str) -> frozenset[str]:
    """What must be measured for a category of ``signal`` under ``mode``.

    >>> sorted(needs("blend", "expected")), sorted(needs("blend", "parse")), sorted(needs("rubric", "parse"))
    (['distributions', 'logprobs'], ['logprobs', 'replies'], ['replies'])
    """
    own = SIGNALS[resolve(signal, mode)].needs
    return (own - {"rating"}) | (SIGNALS[rating_signal(mode)].needs if "rating" in own else frozenset())
