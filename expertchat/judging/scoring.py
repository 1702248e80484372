"""The judge's score maths, free of models and prompts: parse a rating, clean a WIM critique, spell the scores
1..10 in tokens, turn next-token logits into a score distribution, its expectation and entropy, spell the letters
of a forced choice in tokens and read their probabilities, mask copied
n-grams and sum the pointwise mutual information of an answer with its context (GPTScore, Fu et al., 2023),
and map it to [1, 10].

Every function here is pure (tensors and strings in, tensors, floats and strings out); the doctests run in the
test suite (``tests/test_scoring.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expertchat import stats
from expertchat.errors import ExpertChatError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from expertchat.config.schema import JudgingConfig

SCORES = tuple(range(1, 11))

# --------------------------------------------------------------------------------------------- parsing


_RATING = re.compile(r"(?<!\[)\[\[\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\](?!\])")  # not inside [[[WIM]]]
# FastChat's fallback (llm_judge, one_score_pattern_backup): a single-bracket [N] when no [[N]] is there
_RATING_SINGLE = re.compile(r"(?<!\[)\[\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\](?!\])")
_WIM = re.compile(r"\[\[\[(.*?)\]\]\]", re.DOTALL)
_EMPTY_WIM = re.compile(
    r"^(?:none|nothing|n/?a|no|nil|-+|no(?:thing)?\s+(?:is\s+)?missing|nothing\s+(?:at\s+all|else|is\s+missing|"
    r"significant|important|major)?|the\s+response\s+is\s+complete|it\s+is\s+complete|no\s+feedback)\W*$",
    re.IGNORECASE)


def parse_rating(text: str, lo: float = 1, hi: float = 10) -> float | None:
    """The judge's final verdict: the LAST ``[[N]]`` in ``text`` with ``lo <= N <= hi`` (spaces and ``N/10``
    allowed), else the last single-bracket ``[N]`` (FastChat's fallback), else ``None``. The last, not the first:
    a judge often restates the prompt's own example (``for example: "Rating: [[5]]"``) before its verdict.

    >>> parse_rating('The format is "Rating: [[5]]". Rating: [[9]]'), parse_rating("Rating: [8]")
    (9.0, 8.0)
    >>> parse_rating("Rating: [[ 7 ]]"), parse_rating("[[8]] then [[11]]"), parse_rating("no score")
    (7.0, 8.0, None)
    """
    for pattern in (_RATING, _RATING_SINGLE):
        values = [float(m.group(1)) for m in pattern.finditer(text or "")]
        valid = [v for v in values if math.isfinite(v) and lo <= v <= hi]
        if valid:
            return valid[-1]
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

    >>> clean_wim("  Nothing is missing. ", 100), clean_wim("No data on costs or risks", 12)
    (('Nothing is missing.', True, False), ('No data on', False, True))
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


def choice_tokens(tokenizer: PreTrainedTokenizerBase, context: str, choices: tuple[str, ...] = ("A", "B"),
                  key: str = "judging.turing.prefix") -> tuple[tuple[int, ...], ...]:
    """The tokens that spell each of ``choices`` (e.g. the letters of a forced choice) right after ``context`` (a
    text ending with the forced prefix, e.g. ``Answer:``): the choice with a leading space and without one, each
    where it is a single token after the context's own tokens (tokenizers differ: after ``Answer:`` a BPE
    tokenizer spells ``" A"`` and ``"A"`` as two different tokens; the judge may write either).

    Returns:
        one tuple of token ids per choice (one or two ids each); a choice's probability is their summed probability.

    Raises:
        ExpertChatError: a choice has no single-token spelling after the context, or two choices share a token
            (``key`` names the setting to change).
    """
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        found: list[int] = []
        for spelling in (" " + choice, choice):
            ids = tokenizer(context + spelling, add_special_tokens=False)["input_ids"]
            if ids[:len(base)] == base and len(ids) == len(base) + 1 and ids[-1] not in found:
                found.append(ids[-1])
        if not found:
            raise ExpertChatError(f"{key}: the choice {choice!r} is not one token of its own after "
                                  f"{context[-20:]!r}; end the prefix with a colon, e.g. 'Answer:'")
        out.append(tuple(found))
    if len({t for ids in out for t in ids}) != sum(len(ids) for ids in out):
        raise ExpertChatError(f"{key}: the choices {', '.join(choices)} share a token after {context[-20:]!r}")
    return tuple(out)


def choice_probabilities(logits: torch.Tensor, choices: tuple[tuple[int, ...], ...]) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Probabilities of a forced choice from the next-token logits after its prompt (``[..., V]``): each choice's
    summed probability over its spellings (:func:`choice_tokens`), renormalized over the choices.

    Returns:
        (probs ``[..., K]`` for the K choices, summing to 1; mass ``[...]`` = their total before renormalizing).

    >>> p, mass = choice_probabilities(torch.tensor([0.0, math.log(3.0), 0.0, 0.0]), ((1,), (2, 3)))
    >>> [round(v, 4) for v in p.tolist()], round(mass.item(), 4)
    ([0.6, 0.4], 0.8333)
    """
    p = logits.float().softmax(-1)
    columns = torch.stack([p[..., list(ids)].sum(-1) for ids in choices], dim=-1)
    mass = columns.sum(-1)
    return columns / mass.clamp_min(1e-30).unsqueeze(-1), mass


def expected_score(probs: torch.Tensor) -> torch.Tensor:
    """The expectation of scores 1..10 under ``probs`` (``[..., 10]``), shape ``[...]`` (G-Eval, Liu et al., 2023).

    >>> expected_score(torch.tensor([0.0] * 6 + [0.5, 0.5, 0.0, 0.0])).item()
    7.5
    """
    return (probs * torch.arange(1, 11, dtype=probs.dtype, device=probs.device)).sum(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last axis (``[..., K]`` -> ``[...]``); 0 for a certain score.

    >>> round(entropy(torch.tensor([0.5, 0.5])).item(), 4), abs(entropy(torch.tensor([1.0, 0.0])).item())
    (0.6931, 0.0)
    """
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def copied_mask(context: list[int], answer: list[int], n: int) -> torch.Tensor:
    """Which answer tokens lie inside an ``n``-gram of tokens that also occurs in the context (``n`` = 0: none):
    :func:`expertchat.stats.copied_mask` as a ``[T]`` bool tensor, for :func:`token_pmi`.

    >>> copied_mask([1, 2, 3, 4], [9, 2, 3, 4, 9], 3).tolist()
    [False, True, True, True, False]
    """
    return torch.tensor(stats.copied_mask(context, answer, n), dtype=torch.bool)


def token_pmi(cond: torch.Tensor, uncond: torch.Tensor, copied: torch.Tensor | None = None) -> float:
    """Summed pointwise mutual information of the answer tokens with the context, in nats:
    sum_i log p(a_i | context, a_<i) - log p(a_i | content-free, a_<i), where tokens ``copied`` from the
    context count 0 (an answer that parrots the question would otherwise score highest).

    Args:
        cond, uncond: ``[T]`` log-probs of the T answer tokens with the context and with a content-free one.
        copied: ``[T]`` bool, from :func:`copied_mask`.

    >>> token_pmi(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.5]), torch.tensor([False, True]))
    2.0
    """
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
