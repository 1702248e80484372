"""What two speakers do to each other in a dialogue, measured on its words: partner echo, agreement, questions,
novelty, who steers, and how alike the speakers grow (convergence). Pure functions of the turns' texts (and, for
the embedding measures, of vectors the caller computed), so that any run folder can be measured again.

Words, not model tokens: the two speakers of a run may use different tokenizers (Mixtral's and Llama-3's), and a
measure of what one copies from the other must count the same units on both sides. :func:`words` lowercases and
keeps runs of letters, digits and apostrophes (Unicode-aware); *content words* drop a short list of English
function words (:data:`STOPWORDS`).

Per turn ``t`` of a dialogue (turn 0 opens it; ``t-1`` is the partner's last turn):

- ``echo``: the share of the turn's words inside a word 3-gram that also occurs in the partner's last turn (the
  copy rule of :func:`expertchat.stats.copied_mask`, the same as the report's "copied from the prompt");
- ``agreement`` / ``disagreement``: whether the turn uses a phrase of :data:`AGREEMENT` / :data:`DISAGREEMENT`
  (a documented lexicon in the spirit of sycophancy studies that count assent markers, e.g. Sharma et al., 2023,
  "Towards Understanding Sycophancy in Language Models", arXiv 2310.13548);
- ``questions``: sentences ending in ``?``;
- ``novelty``: the share of the turn's distinct content words new to the dialogue (absent from the topic and from
  every earlier turn);
- ``introduced`` / ``taken_up``: how many content words the turn introduced, and how many of those the partner
  used in a later turn (who steers: the speaker whose new words the other takes up);
- ``length_ratio`` and ``vocab_overlap`` with the partner's last turn: shorter/longer word count, and the Jaccard
  index of the two turns' content-word sets (convergence: the speakers growing alike).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from expertchat.stats import copied_fraction

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+")

# English function words (articles, pronouns, auxiliaries, prepositions, conjunctions): what content words leave out.
STOPWORDS = frozenset("""
a an the and or but nor so yet for of in on at to from by with about as into onto over under than then that this
these those there here it its it's is are was were be been being am do does did done have has had having i me my we
us our you your he him his she her they them their what which who whom whose when where why how all any both each
few more most other some such no not only own same too very can could will would shall should may might must just
also if because while though although until unless since up down out off again further once well really quite let's
i'm you're we're they're that's there's isn't aren't don't doesn't didn't can't won't
""".split())

# Phrases that assent to the partner (matched on word boundaries, lowercased). Chosen from the openings seen in the
# default run ("Your interpretation is spot on") and the assent markers counted in sycophancy studies.
AGREEMENT = (
    "i agree", "we agree", "agreed", "you're right", "you are right", "that's right", "that is right", "exactly",
    "absolutely", "spot on", "precisely", "indeed", "great point", "good point", "excellent point", "well said",
    "you make a great point", "you make a good point", "couldn't agree more", "that's true", "that is true",
    "that's correct", "that is correct", "i concur", "fair point", "well put",
)
DISAGREEMENT = (
    "i disagree", "i don't agree", "i do not agree", "not quite", "i'm not sure", "i am not sure",
    "on the contrary", "that's wrong", "that is wrong", "that's incorrect", "that is incorrect", "i doubt",
    "not necessarily", "i'd push back", "i would push back",
)


def words(text: str) -> list[str]:
    """The lowercased words of ``text`` (letters, digits, inner apostrophes; Unicode-aware).

    >>> words("Spot on! CRISPR's base-editors can't cut.")
    ['spot', 'on', "crispr's", 'base', 'editors', "can't", 'cut']
    """
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def content_words(text: str) -> set[str]:
    """The distinct words of ``text`` that are not :data:`STOPWORDS` (nor one letter long)."""
    return {w for w in words(text) if w not in STOPWORDS and len(w) > 1}


def _uses(text_words: Sequence[str], phrases: Sequence[str]) -> bool:
    padded = " " + " ".join(text_words) + " "
    return any(f" {p} " in padded for p in phrases)


def agrees(text: str) -> bool:
    """Whether ``text`` uses a phrase of :data:`AGREEMENT`.

    >>> agrees("Your interpretation is spot on."), agrees("The spot is on the map")
    (True, False)
    """
    return _uses(words(text), AGREEMENT)


def disagrees(text: str) -> bool:
    """Whether ``text`` uses a phrase of :data:`DISAGREEMENT`."""
    return _uses(words(text), DISAGREEMENT)


def questions(text: str) -> int:
    """How many sentences of ``text`` end in a question mark.

    >>> questions("Why? And how would it scale?? It would not.")
    2
    """
    return sum(1 for end in _SENTENCE_END.findall(text) if "?" in end)


def jaccard(a: set[str], b: set[str]) -> float | None:
    """``|a & b| / |a | b|``; None when both are empty."""
    return len(a & b) / len(a | b) if a or b else None


def dialogue_measures(topic: str, texts: Sequence[str]) -> list[dict[str, Any]]:
    """The measures of the module docstring for each turn of one dialogue.

    Args:
        topic: what the dialogue is about (its content words are not new when a turn uses them).
        texts: ``[T]`` the turns' texts in order; speakers alternate (turn ``t`` answers turn ``t-1``).

    Returns:
        ``[T]`` dicts with ``words``, ``echo`` (None for turn 0 or an empty turn), ``agreement``, ``disagreement``,
        ``questions``, ``novelty`` (None without content words), ``introduced``, ``taken_up``, ``length_ratio``
        and ``vocab_overlap`` (None for turn 0).
    """
    tokens = [words(t) for t in texts]
    content = [content_words(t) for t in texts]
    seen = set(content_words(topic))
    new_words: list[set[str]] = []
    for c in content:
        new_words.append(c - seen)
        seen |= c
    out = []
    for t, text in enumerate(texts):
        prev = t - 1
        later_partner = set().union(*(content[u] for u in range(t + 1, len(texts)) if (u - t) % 2 == 1))
        longer = max(len(tokens[t]), len(tokens[prev])) if prev >= 0 else 0
        out.append({
            "words": len(tokens[t]),
            "echo": copied_fraction(tokens[prev], tokens[t], 3) if prev >= 0 else None,
            "agreement": _uses(tokens[t], AGREEMENT),
            "disagreement": _uses(tokens[t], DISAGREEMENT),
            "questions": questions(text),
            "novelty": round(len(new_words[t]) / len(content[t]), 6) if content[t] else None,
            "introduced": len(new_words[t]),
            "taken_up": len(new_words[t] & later_partner),
            "length_ratio": round(min(len(tokens[t]), len(tokens[prev])) / longer, 6) if longer else None,
            "vocab_overlap": (None if prev < 0 or (j := jaccard(content[t], content[prev])) is None
                              else round(j, 6)),
        })
    return out


def steering(measures: Sequence[dict[str, Any]], speakers: Sequence[str]) -> dict[str, float | None]:
    """Who steers one dialogue: each speaker's share of the content words the partner took up (sums to 1 when
    anything was taken up; None for each speaker otherwise).

    Args:
        measures: ``[T]`` what :func:`dialogue_measures` returned.
        speakers: ``[T]`` who spoke each turn (e.g. ``actor``, ``judge``).
    """
    taken: dict[str, int] = {s: 0 for s in speakers}
    for m, s in zip(measures, speakers, strict=True):
        taken[s] += m["taken_up"]
    total = sum(taken.values())
    return {s: (round(n / total, 6) if total else None) for s, n in taken.items()}
