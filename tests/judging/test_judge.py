"""Judging: the shared-prefix engine against a plain forward, parse mode, WIM, the prompts under real chat
templates, and (embedded SmolLM2) the default judge on labelled answer pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from expertchat.config.schema import JudgingConfig, ModelConfig, ParseConfig, RewardConfig, RubricCategory
from expertchat.engine.generation import Generated
from expertchat.engine.models import LoadedModel
from expertchat.judging import scoring
from expertchat.judging.judge import Judge, RatingItem
from expertchat.judging.scoring import clean_wim, copied_mask, score_distribution
from tests.conftest import DATA, compose_cfg, make_tiny_model

PAIRS = DATA / "judge_pairs.jsonl"
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
        assert set(r.dists) == set(ref) and len(ref) == 4
        for key, p in ref.items():
            assert torch.allclose(r.dists[key][0], p, atol=1e-4), key
        cond = reference_logprobs(judge, item.context, item.answer)
        uncond = reference_logprobs(judge, judge.cfg.content_free, item.answer)
        assert torch.allclose(r.cond, cond, atol=1e-4) and torch.allclose(r.uncond, uncond, atol=1e-4)
        copied = copied_mask(judge.prompts.context_ids(item.context), judge.prompts.answer_ids(item.answer), 3)
        assert r.pmi == pytest.approx(float(torch.where(copied, 0.0, cond - uncond).sum()), abs=1e-3)


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
        p = r.dists[("knowledge", 0)][0] / r.cf_dists[("knowledge", 0)]
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
        scoring.likelihood_score(0.0, judge.cfg))


@pytest.mark.parametrize("answer", ["", "   ", "\n\t"])
def test_an_empty_turn_scores_lowest_and_is_counted(smol_tokenizer, answer):
    judge = tiny_judge(smol_tokenizer)
    [j] = judge.rate([RatingItem("Why?", answer)], wim=True)
    assert j.status == "empty_answer" and j.score == 1.0 and j.wim_empty
    assert judge.counts["empty_answers"] == 1


def test_a_judge_that_computes_nan_skips_the_turn_and_counts_it(smol_tokenizer):
    """NaN logits (e.g. an fp16 overflow) give no score, never an extreme one; the turn is skipped and counted."""
    from expertchat.judging.rewards import rewards

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


# ----------------------------------------------------------------------------------------- turing signal

TURING = {"human_expert_likeness": RubricCategory("Human?", 1.0, "turing")}


def letter_probs(logits: torch.Tensor, choices) -> torch.Tensor:
    """p(A), p(B) renormalized from next-token logits ``[V]``, each letter's spellings summed (the reference)."""
    p = logits.float().softmax(-1)
    pa, pb = (sum(float(p[t]) for t in ids) for ids in choices)
    return torch.tensor([pa, pb]) / (pa + pb)


def test_turing_matches_a_plain_forward_in_both_letter_orders(smol_tokenizer):
    """Each order's p(human expert) is the letter naming a human expert (A, then B) read off a plain forward of
    prefix + question; the score is 1 + 9 x their mean."""
    judge = tiny_judge(smol_tokenizer, rubric=TURING, wim=False)
    pr = judge.prompts
    assert len(pr.turing_suffixes) == 2 and all(len(ids) == 2 for ids in pr.turing_choices)  # " A" and "A"
    got = judge.rate(ITEMS)
    for item, j, m in zip(ITEMS, got, judge.measure(ITEMS, calibrate=False)):
        prefix, _ = pr.prefix(pr.context_ids(item.context), pr.answer_ids(item.answer))
        ref = []
        with torch.no_grad():
            for order, suffix in enumerate(pr.turing_suffixes):  # order 0: A = human expert; 1: B = human expert
                logits = judge.lm.model(input_ids=torch.tensor([prefix + suffix])).logits[0, -1]
                ref.append(float(letter_probs(logits, pr.turing_choices)[order]))
        assert [p for p, _ in m.turing] == pytest.approx(ref, abs=1e-4)
        cs = j.categories["human_expert_likeness"]
        assert cs.signal == "turing" and cs.p_human == pytest.approx(sum(ref) / 2, abs=1e-4)
        assert 1 <= j.score <= 10 and j.score == pytest.approx(1 + 9 * cs.p_human)


@pytest.fixture
def crafted_letters():
    """A forward hook that replaces the judge's next-token logits after each turing question (order 0, order 1)
    with crafted ones, recording every forward call's input length."""
    state: dict = {"logits": None, "calls": []}

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"]
        state["calls"].append(ids.shape[1])
        for order, suffix in enumerate(state["suffixes"]):
            if ids.shape[1] >= len(suffix) and ids[0, -len(suffix):].tolist() == suffix:
                output.logits[:, -1] = state["logits"][order]
        return output

    state["hook"] = hook
    return state


def letters(vocab: int, probs: dict[int, float]) -> torch.Tensor:
    logits = torch.full((vocab,), -1e4)
    for t, p in probs.items():
        logits[t] = math.log(p)
    return logits


def test_turing_reads_crafted_letter_probabilities_on_one_encoding_of_the_turn(smol_tokenizer, crafted_letters):
    """A judge 80% sure a human expert wrote the turn, whichever letter names one, its A and B spread over both
    spellings and 40% of its mass elsewhere: p = 0.8, score 8.2. The turn is encoded once; each order is one suffix."""
    judge = tiny_judge(smol_tokenizer, rubric=TURING, wim=False, batch_size=8)
    (a_sp, a), (b_sp, b) = judge.prompts.turing_choices
    vocab = judge.lm.model.config.vocab_size
    crafted_letters["suffixes"] = judge.prompts.turing_suffixes
    crafted_letters["logits"] = [letters(vocab, {a_sp: 0.36, a: 0.12, b_sp: 0.12, 0: 0.4}),  # A = human: 0.48 v 0.12
                                 letters(vocab, {a: 0.12, b_sp: 0.24, b: 0.24, 0: 0.4})]  # B = human: 0.48 v 0.12
    judge.lm.model.register_forward_hook(crafted_letters["hook"], with_kwargs=True)
    got = judge.rate(ITEMS)
    for j in got:
        cs = j.categories["human_expert_likeness"]
        assert cs.p_human == pytest.approx(0.8, abs=1e-5) and cs.mass == pytest.approx(0.6, abs=1e-5)
        assert j.score == pytest.approx(8.2, abs=1e-4)
    pr, calls = judge.prompts, crafted_letters["calls"]
    longest = max(len(pr.prefix(pr.context_ids(it.context), pr.answer_ids(it.answer))[0]) for it in ITEMS)
    assert calls[-2:] == [len(s) for s in pr.turing_suffixes] and sum(calls[:-2]) == longest  # prefix: once


def test_turing_cancels_a_judge_that_always_answers_a(smol_tokenizer, crafted_letters):
    """A judge that answers A 90% of the time whatever A means: 0.9 and 0.1 average to p = 0.5 (score 5.5)."""
    judge = tiny_judge(smol_tokenizer, rubric=TURING, wim=False)
    (a_sp, _), (b_sp, _) = judge.prompts.turing_choices
    always_a = letters(judge.lm.model.config.vocab_size, {a_sp: 0.9, b_sp: 0.1})
    crafted_letters["suffixes"], crafted_letters["logits"] = judge.prompts.turing_suffixes, [always_a, always_a]
    judge.lm.model.register_forward_hook(crafted_letters["hook"], with_kwargs=True)
    [m] = judge.measure(ITEMS[:1], calibrate=False)
    assert [p for p, _ in m.turing] == pytest.approx([0.9, 0.1], abs=1e-5)
    [j] = judge.rate(ITEMS[:1])
    assert j.categories["human_expert_likeness"].p_human == pytest.approx(0.5, abs=1e-5) and j.score == pytest.approx(
        5.5, abs=1e-4)


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

    monkeypatch.setattr("expertchat.engine.generation.generate", generate)
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
    judge = tiny_judge(smol_tokenizer, mode="parse", rubric=PARSE_RUBRIC,
                       parse=ParseConfig(max_new_tokens=4, strategy="sample"))
    res = judge.rate(ITEMS[:2], wim=False)
    assert judge.counts["parse_failures"] == 4 and all(j.score is None for j in res)


# --------------------------------------------------------------------------------------- embedded SmolLM2


def _binom_p(wins: int, n: int) -> float:
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


@pytest.mark.e2e
def test_default_judge_prefers_good_answers_on_labelled_pairs(smollm2):
    """The key real-model check: the default judge (SmolLM2-135M) prefers the good answer of >= 75% of the
    labelled pairs, off-topic pairs included, far beyond chance. (The naive rubric score: 44%; the default: 90%.)"""
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(pairs) >= 40 and {p["kind"] for p in pairs} == {"off_topic", "vague", "wrong", "truncated"}
    items = [RatingItem(p["question"], p[k]) for p in pairs for k in ("good", "poor")]
    judging = compose_cfg().judging  # the configuration users run, as composed from conf/
    res = Judge(smollm2, judging).rate(items, wim=False)
    wins = [g.score > p.score for g, p in zip(res[0::2], res[1::2])]
    rate = sum(wins) / len(wins)
    off = [w for w, p in zip(wins, pairs) if p["kind"] == "off_topic"]
    assert rate >= 0.75, f"win rate {rate:.0%}"
    assert sum(off) / len(off) >= 0.75
    assert _binom_p(sum(wins), len(wins)) < 1e-3


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
