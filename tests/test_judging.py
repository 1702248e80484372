"""Judging: the rating parser, score tokens, the shared-prefix engine against a plain forward, parse mode, WIM,
the rating stage, and (embedded SmolLM2) the default judge on labelled answer pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertchat import judging
from expertchat.config import DialogueConfig, JudgingConfig, ModelConfig, RewardConfig, RubricCategory
from expertchat.dialogue import Dialogue
from expertchat.generation import Generated
from expertchat.judging import (
    Judge, JudgePrompts, RatingItem, clean_wim, copied_mask, parse_rating, parse_wim, score_distribution, score_tokens)
from expertchat.models import LoadedModel
from expertchat.store import RunStore
from tests.conftest import SHARED_DATA, make_tiny_model

PAIRS = Path(__file__).parent / "data" / "judge_pairs.jsonl"
ITEMS = [
    RatingItem("What is the capital of France?", "Paris is the capital of France, on the Seine."),
    RatingItem("Explain photosynthesis briefly.", "Plants turn light, water and CO2 into sugar and oxygen."),
    RatingItem("Why is the sky blue?", "Rayleigh scattering: short wavelengths scatter more."),
    RatingItem("What is 2 + 2?", "4"),
    RatingItem("Name a prime number.", "Seven is prime, since its only divisors are one and itself, and it is odd."),
]


def tiny_judge(tok, **overrides) -> Judge:
    model = make_tiny_model(tok, dtype=torch.float32)
    cfg = JudgingConfig(**{"batch_size": 2, **overrides})
    return Judge(LoadedModel("tiny", model, tok, ModelConfig(name="tiny")), cfg)


# ------------------------------------------------------------------------------------------------ parser


@pytest.mark.parametrize("text, expected", [
    ("Rating: [[7]]", 7.0),
    ("Rating: [[ 7 ]]", 7.0),
    ("rating:[[10]]", 10.0),
    ("[[8/10]]", 8.0),
    ("[[7.5]]", 7.5),
    ("First [[0]], then [[11]], finally [[3]] and [[9]]", 3.0),
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
       st.integers(min_value=1, max_value=10), st.text(max_size=80), st.sampled_from(["", " ", "  "]))
@settings(max_examples=200, deadline=None)
def test_parse_rating_finds_the_first_valid_score(before, score, after, pad):
    assert parse_rating(f"{before}Rating: [[{pad}{score}{pad}]]{after}") == score


@given(st.lists(st.integers(min_value=-50, max_value=50), min_size=1, max_size=6))
@settings(max_examples=200, deadline=None)
def test_parse_rating_skips_out_of_range_scores(scores):
    text = " ".join(f"[[{s}]]" for s in scores)
    valid = [s for s in scores if 1 <= s <= 10]
    assert parse_rating(text) == (float(valid[0]) if valid else None)


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
    st_ = judging.ScoreTokens(first=tuple(range(1, 10)) + (1,), second=(None,) * 9 + (0,), ext=1)
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
    with pytest.raises(judging.ExpertChatError, match="rating_prefix"):
        score_tokens(_MergingTokenizer(), "Rating: [[")


# ------------------------------------------------------------------------------ engine vs plain forward


def reference_dists(judge: Judge, item: RatingItem) -> dict[tuple[str, int], torch.Tensor]:
    """The score distribution of each (category, phrasing) from one plain, unbatched forward pass."""
    pr = judge.prompts
    prefix, _ = pr.prefix(pr.context_ids(item.context), pr.answer_ids(item.answer))
    out = {}
    with torch.no_grad():
        for key, suffix in pr.rating_suffixes.items():
            ids = prefix + suffix + [pr.scores.ext]
            logits = judge.lm.model(input_ids=torch.tensor([ids])).logits[0, -2:]
            out[key] = score_distribution(logits, pr.scores)[0]
    return out


def reference_logprobs(judge: Judge, context: str, answer: str) -> torch.Tensor:
    pr = judge.prompts
    prefix, start = pr.prefix(pr.context_ids(context), pr.answer_ids(answer))
    with torch.no_grad():
        logp = judge.lm.model(input_ids=torch.tensor([prefix])).logits[0].float().log_softmax(-1)
    n = len(pr.answer_ids(answer))
    return logp[start - 1:start - 1 + n].gather(-1, torch.tensor(prefix[start:start + n])[:, None]).squeeze(-1)


def test_batched_expected_scores_match_a_plain_forward(smol_tokenizer):
    """Left padding, the shared prefix cache and the two-step "10" give exactly the plain forward's numbers."""
    cfg = {"instructions": JudgingConfig().instructions + ["Score its {category} ({description}) as [[N]]."],
           "rubric": {"knowledge": RubricCategory("Correct?", 1.0, "rubric"),
                      "depth": RubricCategory("Detailed?", 2.0, "blend")}}
    judge = tiny_judge(smol_tokenizer, **cfg)
    raw = judge.measure(ITEMS, calibrate=False)
    for item, r in zip(ITEMS, raw):
        ref = reference_dists(judge, item)
        assert set(r["dists"]) == set(ref) and len(ref) == 4
        for key, p in ref.items():
            assert torch.allclose(r["dists"][key][0], p, atol=1e-4), key
        cond = reference_logprobs(judge, item.context, item.answer)
        uncond = reference_logprobs(judge, judge.cfg.content_free, item.answer)
        assert torch.allclose(r["cond"], cond, atol=1e-4) and torch.allclose(r["uncond"], uncond, atol=1e-4)
        copied = copied_mask(judge.prompts.context_ids(item.context), judge.prompts.answer_ids(item.answer), 3)
        assert r["pmi"] == pytest.approx(float(torch.where(copied, 0.0, cond - uncond).sum()), abs=1e-3)


def test_judgements_are_complete_and_batch_size_invariant(smol_tokenizer):
    rubric = {"knowledge": RubricCategory("Correct?", 1.0, "likelihood"),
              "depth": RubricCategory("Detailed?", 1.0, "blend"),
              "human_expert_likeness": RubricCategory("Human?", 2.0, "rubric")}
    a = tiny_judge(smol_tokenizer, rubric=rubric, batch_size=1).rate(ITEMS, wim=False)
    b = tiny_judge(smol_tokenizer, rubric=rubric, batch_size=4).rate(ITEMS, wim=False)
    for ja, jb in zip(a, b):
        assert ja.status == "ok" and ja.wim is None and ja.wim_status == "none"
        assert 1 <= ja.score <= 10 and ja.score == pytest.approx(jb.score, abs=1e-3)
        rub = ja.categories["human_expert_likeness"]
        assert rub.signal == "rubric" and sum(rub.dist) == pytest.approx(1) and 1 <= rub.argmax <= 10
        assert 0 <= rub.entropy <= math.log(10) + 1e-6 and 0 < rub.mass <= 1
        blend = ja.categories["depth"]
        assert blend.score == pytest.approx((blend.rubric + blend.likelihood) / 2)
        scores = {n: c.score for n, c in ja.categories.items()}
        assert ja.score == pytest.approx((scores["knowledge"] + scores["depth"] + 2 * scores[
            "human_expert_likeness"]) / 4)


def test_calibration_divides_by_the_content_free_distribution(smol_tokenizer):
    rubric = {"knowledge": RubricCategory("Correct?", 1.0, "rubric")}
    judge = tiny_judge(smol_tokenizer, rubric=rubric, calibrate=True)
    raw = judge.measure(ITEMS[:2], calibrate=True)
    j = judge.rate(ITEMS[:2], wim=False)
    for r, jj in zip(raw, j):
        p = r["dists"][("knowledge", 0)][0] / r["cf_dists"][("knowledge", 0)]
        p = p / p.sum()
        assert jj.score == pytest.approx(float((p * torch.arange(1, 11)).sum()), abs=1e-4)


def test_wim_greedy_continuation_matches_a_plain_greedy_loop(smol_tokenizer):
    judge = tiny_judge(smol_tokenizer, wim_max_new_tokens=6)
    pr = judge.prompts
    got = judge.rate(ITEMS[:3], wim=True)
    for item, j in zip(ITEMS[:3], got):
        ids = pr.prefix(pr.context_ids(item.context), pr.answer_ids(item.answer))[0] + pr.wim_suffix
        new = []
        with torch.no_grad():
            for _ in range(6):
                t = int(judge.lm.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if t in judge.lm.stop_token_ids:
                    break
                new.append(t)
        expected, _, _ = clean_wim(smol_tokenizer.decode(new, skip_special_tokens=True), 400)
        assert j.wim == expected and j.wim_status in {"ok", "empty"}


def test_parroting_the_question_earns_no_likelihood(smol_tokenizer):
    judge = tiny_judge(smol_tokenizer, rubric={"knowledge": RubricCategory("Correct?", 1.0, "likelihood")})
    q = "Which methods did Socrates employ to challenge the prevailing thoughts of his time?"
    echo = judge.rate([RatingItem(q, q)], wim=False)[0]
    assert echo.pmi == 0.0 and echo.categories["knowledge"].score == pytest.approx(
        judging.likelihood_score(0.0, judge.cfg))


@pytest.mark.parametrize("answer", ["", "   ", "\n\t"])
def test_an_empty_turn_scores_lowest_and_is_counted(smol_tokenizer, answer):
    judge = tiny_judge(smol_tokenizer)
    [j] = judge.rate([RatingItem("Why?", answer)], wim=True)
    assert j.status == "empty_answer" and j.score == 1.0 and j.wim_empty
    assert judge.counts["empty_answers"] == 1


def test_a_judge_that_computes_nan_skips_the_turn_and_counts_it(smol_tokenizer):
    """NaN logits (e.g. an fp16 overflow) give no score, never an extreme one; the turn is skipped and counted."""
    from expertchat.rewards import rewards

    judge = tiny_judge(smol_tokenizer)
    with torch.no_grad():
        judge.lm.model.lm_head.weight.fill_(float("nan"))
    [j] = judge.rate([RatingItem("Why is the sky blue?", "Rayleigh scattering.")], wim=False)
    assert j.score is None and j.status == "skipped"
    assert judge.counts["non_finite"] == 1 and judge.counts["skipped"] == 1
    [parts] = rewards([j], ["Rayleigh scattering."], RewardConfig(zeta=0.0), None)
    assert parts.reward is None  # no reward: a trainer masks the pair, it is not scored 0


def test_long_context_and_answer_are_capped(smol_tokenizer):
    judge = tiny_judge(smol_tokenizer, max_context_tokens=16, max_answer_tokens=24)
    big = "word " * 5000
    [j] = judge.rate([RatingItem(big, big)], wim=False)
    assert j.answer_tokens == 24 and 1 <= j.score <= 10


# ------------------------------------------------------------------------------------------- parse mode


@pytest.fixture
def fake_generate(monkeypatch):
    """Replace the judge's text generation by canned replies (cycled), recording the prompts."""
    calls: dict = {"prompts": [], "replies": []}

    def generate(model, tokenizer, prompts, cfg, **kwargs):
        calls["prompts"] += list(prompts)
        out = []
        for _ in prompts:
            text = calls["replies"][len(calls["prompts"]) - len(prompts) + len(out)]
            out.append(Generated(text=text, token_ids=[], prompt_tokens=1, new_tokens=1, finished=True))
        return out

    monkeypatch.setattr("expertchat.generation.generate", generate)
    return calls


PARSE_RUBRIC = {"knowledge": RubricCategory("Correct?", 1.0, "rubric"),
                "depth": RubricCategory("Detailed?", 1.0, "rubric")}


def test_parse_mode_scores_counts_and_skips(smol_tokenizer, fake_generate):
    fake_generate["replies"] = [
        "Good. Rating: [[ 7 ]] WIM: [[[It omits the year.]]]", "Rating: [[11]] sorry, [[4]]",  # item 0: 7, 4
        "", "[[9]]",                                                                          # item 1: failure
        "x" * 20000, "]]]][[[[ garbage",                                                      # item 2: failures
    ]
    judge = tiny_judge(smol_tokenizer, mode="parse", rubric=PARSE_RUBRIC)
    res = judge.rate(ITEMS[:3], wim=False)
    assert res[0].score == pytest.approx(5.5) and res[0].status == "ok"
    assert res[0].categories["knowledge"].signal == "parse" and res[0].categories["depth"].score == 4
    assert res[1].score is None and res[1].status == "skipped"
    assert res[1].categories["knowledge"].status == "parse_failure"
    assert res[2].score is None and len(res[2].categories["knowledge"].raw) <= 2000
    assert judge.counts["parse_failures"] == 3 and judge.counts["skipped"] == 2
    assert len(fake_generate["prompts"]) == 6 and "Begin your evaluation" in fake_generate["prompts"][0]


def test_parse_failures_can_score_neutral(smol_tokenizer, fake_generate):
    fake_generate["replies"] = ["no score", "Rating: [[8]]"]
    judge = tiny_judge(smol_tokenizer, mode="parse", rubric=PARSE_RUBRIC, on_parse_failure="neutral",
                       neutral_score=5.0)
    [j] = judge.rate(ITEMS[:1], wim=False)
    assert j.status == "neutral" and j.score == pytest.approx(6.5) and judge.counts["neutral"] == 1


def test_parse_mode_takes_the_wim_from_the_rating_reply(smol_tokenizer, fake_generate):
    """One judge pass serves the score and the WIM; a WIM is generated only where the replies hold none."""
    fake_generate["replies"] = ["[[6]] [[[No numbers given.]]]", "[[6]]",  # item 0: WIM parsed
                                "[[5]]", "[[5]]",                          # item 1: no WIM in the replies
                                "Nothing."]                                # item 1's WIM generation
    judge = tiny_judge(smol_tokenizer, mode="parse", rubric=PARSE_RUBRIC)
    a, b = judge.rate(ITEMS[:2], wim=True)
    assert a.wim == "No numbers given." and a.wim_status == "parsed" and not a.wim_empty
    assert b.wim_empty and b.wim_status == "empty"
    assert len(fake_generate["prompts"]) == 5 and "missing" in fake_generate["prompts"][-1]


def test_parse_mode_with_a_real_tiny_model_counts_failures(smol_tokenizer):
    judge = tiny_judge(smol_tokenizer, mode="parse", rubric=PARSE_RUBRIC, parse_max_new_tokens=4,
                       parse_strategy="sample")
    res = judge.rate(ITEMS[:2], wim=False)
    assert judge.counts["parse_failures"] == 4 and all(j.score is None for j in res)


# ------------------------------------------------------------------------------------------- rating stage


class FakeEmbedder:
    def similarity(self, a, b):
        return [0.5 for _ in a]


def test_rating_stage_writes_one_record_per_turn(smol_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("expertchat.rewards.load_embedder", lambda cfg: FakeEmbedder())
    tok = smol_tokenizer
    models = {"actor": LoadedModel("tiny_a", make_tiny_model(tok), tok, ModelConfig(name="tiny_a")),
              "judge": LoadedModel("tiny_j", make_tiny_model(tok, seed=1), tok, ModelConfig(name="tiny_j"))}
    dialogues = []
    for i, topic in enumerate(["tides", "compilers"]):
        d = Dialogue(f"r0-d00{i}", topic)
        for t, text in enumerate(["The moon pulls the ocean.", "Why two bulges?", "", "Inertia, mostly."]):
            d.turns.append({"dialogue_id": d.id, "turn": t, "role": "actor" if t % 2 == 0 else "judge",
                            "model": "tiny_a" if t % 2 == 0 else "tiny_j", "text": text, "topic": topic})
        dialogues.append(d)
    store = RunStore(tmp_path)
    cfg = JudgingConfig(wim_max_new_tokens=4, batch_size=3)
    summary = judging.run_rating(models, dialogues, DialogueConfig(), cfg, RewardConfig(), store, progress=False)
    rows = [json.loads(line) for line in (tmp_path / judging.RATINGS_FILE).read_text().splitlines()]
    assert len(rows) == 8 and {(r["rater"], r["ratee"]) for r in rows} == {("judge", "actor"), ("actor", "judge")}
    keys = {"round", "dialogue_id", "turn", "rater", "ratee", "rater_model", "ratee_model", "categories", "score",
            "wim", "wim_status", "similarity", "similarity_status", "rating", "reward", "mode", "status", "pmi"}
    assert all(keys <= set(r) for r in rows)
    assert all(-1 <= r["reward"] <= 1 and math.isfinite(r["reward"]) for r in rows)
    empty = [r for r in rows if r["turn"] == 2]
    assert len(empty) == 2 and all(r["status"] == "empty_answer" and r["similarity"] == 0.0 for r in empty)
    first = next(r for r in rows if r["turn"] == 0)
    assert first["rater_model"] == "tiny_j" and set(first["categories"]) == set(cfg.rubric)
    s = summary["models"]["actor"]
    assert s["rated"] == 4 and s["empty_answers"] == 2 and s["rater"] == "judge" and s["score_mean"] is not None


# --------------------------------------------------------------------------------------- embedded SmolLM2


def _binom_p(wins: int, n: int) -> float:
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def test_default_judge_prefers_good_answers_on_labelled_pairs(smollm2):
    """The key real-model check: the default judge (SmolLM2-135M) prefers the good answer of >= 75% of the
    labelled pairs, off-topic pairs included, far beyond chance. (The naive rubric score: 44%; the default: 90%.)"""
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(pairs) >= 40 and {p["kind"] for p in pairs} == {"off_topic", "vague", "wrong", "truncated"}
    items = [RatingItem(p["question"], p[k]) for p in pairs for k in ("good", "poor")]
    res = Judge(smollm2, JudgingConfig()).rate(items, wim=False)
    wins = [g.score > p.score for g, p in zip(res[0::2], res[1::2])]
    rate = sum(wins) / len(wins)
    off = [w for w, p in zip(wins, pairs) if p["kind"] == "off_topic"]
    assert rate >= 0.75, f"win rate {rate:.0%}"
    assert sum(off) / len(off) >= 0.75
    assert _binom_p(sum(wins), len(wins)) < 1e-3


@pytest.mark.parametrize("name", ["llama3_8b_instruct", "mixtral_8x7b_instruct"])
def test_judge_prompts_render_with_the_real_chat_templates(smol_tokenizer, name):
    """The judge's prompt survives each real template (Llama 3 trims message contents; Mixtral has no system
    role): context and answer appear once each, in order, and the instruction follows them."""
    import copy

    path = SHARED_DATA / "chat_templates" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = json.loads(path.read_text())["chat_template"]
    prompts = JudgePrompts(tok, JudgingConfig())
    context, answer = "What drives a Plinian eruption?", "Gas exsolution in silicic magma."
    ids, start = prompts.prefix(prompts.context_ids(context), prompts.answer_ids(answer))
    text = tok.decode(ids + prompts.rating_suffixes[("knowledge", 0)])
    assert text.count(context) == 1 and text.count(answer) == 1
    assert text.index(context) < text.index(answer) < text.index("knowledge") < text.rindex("Rating: [[")
    assert tok.decode(ids[start:start + len(prompts.answer_ids(answer))]) == answer


def test_a_sliding_window_judge_rates_past_its_window(smol_tokenizer):
    """Sliding-window cache layers cannot be cropped once past the window: the judge reruns prefix + suffix."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=16)).eval()
    judge = Judge(LoadedModel("sw", model, smol_tokenizer, ModelConfig(name="sw")), JudgingConfig(wim_max_new_tokens=4))
    out = judge.rate([RatingItem("Why is the sky blue? " * 5, "Rayleigh scattering of light. " * 4)] * 2, wim=True)
    assert all(j.status == "ok" and 1 <= j.score <= 10 for j in out)
    assert out[0].score == out[1].score and out[0].wim_status != "none"
