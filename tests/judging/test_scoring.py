"""The judge's score maths: the rating parser, the WIM cleaner, copied n-grams, score tokens and their
distribution, the letters of a forced choice and their probabilities; and the module's doctests."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertchat.errors import ExpertChatError
from expertchat.judging import scoring
from expertchat.judging.scoring import (
    choice_probabilities,
    choice_tokens,
    clean_wim,
    copied_mask,
    parse_rating,
    parse_wim,
    score_distribution,
    score_tokens,
)
from tests.conftest import DATA, ROOT  # noqa: F401


def test_doctests():
    result = doctest.testmod(scoring, raise_on_error=False)
    assert result.attempted >= 5 and result.failed == 0


# ------------------------------------------------------------------------------------------------ parser


@pytest.mark.parametrize("text, expected", [
    ("Rating: [[7]]", 7.0),
    ("Rating: [[ 7 ]]", 7.0),
    ("rating:[[10]]", 10.0),
    ("[[8/10]]", 8.0),
    ("[[7.5]]", 7.5),
    ("First [[0]], then [[11]], finally [[3]] and [[9]]", 9.0),  # the final verdict
    ('I must answer like "Rating: [[5]]". Rating: [[9]]', 9.0),  # not the echo of the prompt's example
    ("Rating: [8]", 8.0),  # FastChat's single-bracket fallback
    ("Rating: [[8]] (not [3])", 8.0),  # a double-bracket verdict wins over a single bracket
    ("WIM: [[[something]]] Rating: [[6]]", 6.0),
    ("[[[5]]]", None),  # a WIM bracket, not a rating
    ("Rating: 7", None),
    ("[[seven]]", None),
    ("", None),
    ("[[-3]] [[1e9]] [[nan]]", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


@given(st.text(max_size=400))
@settings(max_examples=300, deadline=None)
def test_parse_rating_never_fails_and_stays_in_range(text):
    value = parse_rating(text)
    assert value is None or (1 <= value <= 10 and math.isfinite(value))


@given(st.text(alphabet=st.characters(blacklist_characters="[]"), max_size=80),
       st.integers(min_value=1, max_value=10), st.text(alphabet=st.characters(blacklist_characters="[]"), max_size=80),
       st.sampled_from(["", " ", "  "]))
@settings(max_examples=200, deadline=None)
def test_parse_rating_finds_the_verdict_in_any_text(before, score, after, pad):
    assert parse_rating(f"{before}Rating: [[{pad}{score}{pad}]]{after}") == score


@given(st.lists(st.integers(min_value=-50, max_value=50), min_size=1, max_size=6))
@settings(max_examples=200, deadline=None)
def test_parse_rating_skips_out_of_range_scores(scores):
    text = " ".join(f"[[{s}]]" for s in scores)
    valid = [s for s in scores if 1 <= s <= 10]
    assert parse_rating(text) == (float(valid[-1]) if valid else None)


def test_the_judge_replies_that_echoed_the_prompt_give_their_final_verdicts():
    """tests/data/cases/judge-parse-first-match: an echo of the prompt's example, a single-bracket verdict and a
    decimal one: 9, 8, 8.5, so the weighted score of judging=parse is 8.5 (the turn is no longer skipped)."""
    import json

    from tests.conftest import compose_cfg

    replies = json.loads((DATA / "cases/judge-parse-first-match/judge_replies.json").read_text())
    scores = {name: parse_rating(text) for name, text in replies.items()}
    assert scores == {"knowledge": 9.0, "depth": 8.0, "human_expert_likeness": 8.5}
    rubric = compose_cfg("judging=parse").judging.active()
    assert sum(rubric[n].weight * s for n, s in scores.items()) / sum(c.weight for c in rubric.values()) == 8.5


def test_parse_wim():
    assert parse_wim("Rating: [[5]] WIM: [[[It omits costs.]]]") == "It omits costs."
    assert parse_wim("[[[ ]]] [[[second]]]") == "second"
    assert parse_wim("no brackets") is None and parse_wim("") is None


@pytest.mark.parametrize("text", ["", "   ", "None", "none.", "Nothing", "Nothing is missing.", "N/A", "n/a",
                                  "No", "nothing at all", "--", "...", '"None"', "The response is complete."])
def test_empty_wims_are_detected(text):
    assert clean_wim(text, 400)[1]


@pytest.mark.parametrize("text", ["It does not give the year.", "Nothing about costs or risks.",
                                  "No mention of the 1958 paper."])
def test_real_wims_are_not_empty(text):
    _, empty, _ = clean_wim(text, 400)
    assert not empty


@given(st.text(max_size=3000), st.integers(min_value=1, max_value=500))
@settings(max_examples=200, deadline=None)
def test_clean_wim_caps_length_and_never_fails(text, cap):
    out, empty, truncated = clean_wim(text, cap)
    assert len(out) <= cap and isinstance(empty, bool) and isinstance(truncated, bool)


def test_copied_mask_marks_ngrams_from_the_context():
    assert copied_mask([1, 2, 3, 4], [9, 2, 3, 4, 9], 3).tolist() == [False, True, True, True, False]
    assert copied_mask([1, 2, 3], [1, 2, 9, 3], 3).tolist() == [False] * 4
    assert copied_mask([1, 2, 3], [1, 2, 3], 0).tolist() == [False] * 3


# ------------------------------------------------------------------------------------------ score tokens


def test_score_tokens_handle_two_token_ten(smol_tokenizer):
    st_ = score_tokens(smol_tokenizer, "Rating: [[")
    assert st_.ext is not None and st_.second[9] is not None  # "10" = "1" + "0" for SmolLM2
    assert st_.first[9] == st_.first[0] == st_.ext and all(s is None for s in st_.second[:9])
    assert len(set(st_.first[:9])) == 9


def test_score_distribution_splits_one_and_ten():
    st_ = scoring.ScoreTokens(first=tuple(range(1, 10)) + (1,), second=(None,) * 9 + (0,), ext=1)
    logits = torch.randn(3, 2, 12)
    probs, mass = score_distribution(logits, st_)
    p1 = logits[:, 0].softmax(-1)
    p2 = logits[:, 1].softmax(-1)
    raw = torch.stack([p1[:, 1] * (1 - p2[:, 0])] + [p1[:, k] for k in range(2, 10)] + [p1[:, 1] * p2[:, 0]], -1)
    assert torch.allclose(mass, raw.sum(-1), atol=1e-6)
    assert torch.allclose(probs, raw / raw.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(3))


class _MergingTokenizer:
    """A tokenizer whose "[[1" is one token: the prefix would merge with the score."""

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("[[1", i):
                ids.append(1000)
                i += 3
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_score_tokens_reject_a_prefix_that_merges():
    with pytest.raises(scoring.ExpertChatError, match="rating_prefix"):
        score_tokens(_MergingTokenizer(), "Rating: [[")


# -------------------------------------------------------------------------------------------- forced choice


class CharTokenizer:
    """Every character is a token (its code point): a space is a token of its own, so " A" is two tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class WordTokenizer:
    """Whitespace-split words keep their leading space ("Answer:A" is one word): after "Answer:" only " A" is a
    token of its own (as in tokenizers that always mark a word start)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        import re

        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r" ?\S+", text)]}


def test_choice_tokens_take_every_one_token_spelling(smol_tokenizer):
    """SmolLM2 spells the letter after "Answer:" as " A" or "A" (two tokens): both count. A tokenizer whose space
    is its own token has only "A"; one that glues "Answer:A" into a word has only " A"."""
    ids = lambda tok, text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    smol = choice_tokens(smol_tokenizer, "Answer:")
    assert smol == ((ids(smol_tokenizer, " A")[0], ids(smol_tokenizer, "A")[0]),
                    (ids(smol_tokenizer, " B")[0], ids(smol_tokenizer, "B")[0]))
    assert len({*smol[0], *smol[1]}) == 4
    assert choice_tokens(CharTokenizer(), "Answer:") == ((ord("A"),), (ord("B"),))
    word = WordTokenizer()
    assert choice_tokens(word, "Answer:") == ((word.vocab[" A"],), (word.vocab[" B"],))


def test_choice_tokens_refuse_a_choice_without_its_own_token():
    with pytest.raises(ExpertChatError, match=r"judging\.turing\.prefix: the choice 'AI' is not one token"):
        choice_tokens(CharTokenizer(), "Answer:", ("AI", "Human"))
    with pytest.raises(ExpertChatError, match="share a token"):
        choice_tokens(CharTokenizer(), "Answer:", ("A", "A"))


def test_choice_probabilities_sum_the_spellings_and_renormalize():
    logits = torch.full((2, 6), -1e4)
    logits[0, [1, 2, 3]] = torch.tensor([0.6, 0.2, 0.2]).log()  # " A", "A", " B"; all mass on the letters
    logits[1, [0, 1, 3, 4]] = torch.tensor([0.5, 0.1, 0.1, 0.3]).log()  # half the mass elsewhere; B in two spellings
    p, mass = choice_probabilities(logits, ((1, 2), (3, 4)))
    assert p[0].tolist() == pytest.approx([0.8, 0.2]) and mass[0].item() == pytest.approx(1.0)
    assert p[1].tolist() == pytest.approx([0.2, 0.8]) and mass[1].item() == pytest.approx(0.5)
