"""The held-out evaluation's settings (``conf/evaluation/``): the evaluation stage, ``mode=eval`` and the optional
lm-evaluation-harness run. Part of the schema (:mod:`expertchat.config.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from expertchat.config.model import ModelConfig
from expertchat.errors import check, check_placeholders


@dataclass
class LmEvalConfig:
    """``evaluation.lm_eval.*``: lm-evaluation-harness on each evaluation point's models, when it is installed
    (``pip install lm-eval``); otherwise one line says it was skipped."""

    tasks: list[str] = field(default_factory=list)  # e.g. [ifeval,mmlu]; empty: not run
    limit: Optional[int] = None  # examples per task (None: all)
    num_fewshot: Optional[int] = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        check(self.limit is None or self.limit > 0, "evaluation.lm_eval.limit", "must be > 0")
        check(self.batch_size > 0, "evaluation.lm_eval.batch_size", "must be > 0")


@dataclass
class PairwiseConfig:
    """``evaluation.pairwise.*``: the frozen judge compares a round's answer with the base answer to the same prompt
    in both orders (MT-Bench's pairwise judge, Zheng et al. 2023), reading its verdict from the next-token
    probabilities of the two choice letters after ``verdict_prefix`` (no parse failure)."""

    enabled: bool = True
    system: str = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
                   "assistants to the user question displayed below. Choose the assistant that follows the user's "
                   "instructions and answers the user's question better. Avoid any position biases and ensure "
                   "that the order in which the responses were presented does not influence your decision. Do not "
                   "allow the length of the responses to influence your evaluation.")
    prompt: str = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
                   "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
                   "[The End of Assistant B's Answer]\n\nWhich assistant's answer is better? Output your final "
                   'verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if '
                   "assistant B is better.")
    verdict_prefix: str = "Verdict: [["
    choices: list[str] = field(default_factory=lambda: ["A", "B"])

    def __post_init__(self) -> None:
        check_placeholders(self.prompt, "evaluation.pairwise.prompt", ("question", "answer_a", "answer_b"))
        check(all(f"{{{k}}}" in self.prompt for k in ("question", "answer_a", "answer_b")),
              "evaluation.pairwise.prompt", "must contain {question}, {answer_a} and {answer_b}")
        check(len(self.choices) == 2 and len(set(self.choices)) == 2 and all(c.strip() for c in self.choices),
              "evaluation.pairwise.choices", f"is {list(self.choices)}; give two different letters, e.g. [A,B]")


@dataclass
class AuditConfig:
    """``evaluation.audit.*``: the judge audit at every evaluation point (``expertchat/stages/audit.py``): the two
    training judges (each role's policy at that point) rate both roles' held-out answers and the base answers, and
    compare the two roles' answers pairwise in both orders; the statistics are in ``expertchat/audit.py``."""

    enabled: bool = True
    flat_sd: float = 0.25  # a category whose scores' standard deviation is below this (1-10 scale) carries no signal

    def __post_init__(self) -> None:
        check(self.flat_sd >= 0, "evaluation.audit.flat_sd", "must be >= 0")


@dataclass
class EvaluationConfig:
    """Held-out evaluation (``expertchat/stages/evaluation.py``) of each role's model before round 0 and after every
    round's training, scored by a FROZEN judge with the training rubric and reward; ``mode=eval`` evaluates an
    existing run folder's adapters."""

    enabled: bool = True
    source: str = "topics"  # topics: a held-out split of the topics source | jsonl: questions from ``path``
    holdout: int = 8  # topics held out of the dialogues (source=topics), chosen with the run's seed
    path: Optional[str] = None  # source=jsonl: the questions file
    question_field: str = "turns[0]"  # source=jsonl: the question (dotted path with indices; MT-Bench format)
    limit: Optional[int] = None  # source=jsonl: the first N questions
    strategy: str = "greedy"  # greedy | sample (seeded: the same answers' randomness at every point)
    samples: int = 1  # answers per prompt (sample only)
    temperature: float = 0.7  # sample
    top_p: float = 1.0  # sample
    max_new_tokens: int = 64
    seed: int = 1234
    judge: Optional[ModelConfig] = None  # None: the judge role's round-0 base (adapters disabled)
    tie_tolerance: float = 0.01  # |paired reward difference| <= this: a tie
    bootstrap: int = 2000  # resamples of each 95% bootstrap interval (scipy.stats.bootstrap, BCa)
    rounds: Optional[list[int]] = None  # mode=eval: the rounds to evaluate (None: every trained round)
    run: Optional[str] = None  # mode=eval: the run folder to evaluate (None: run_dir); results are written there
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    pairwise: PairwiseConfig = field(default_factory=PairwiseConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        check(self.source in {"topics", "jsonl"}, "evaluation.source", f"is '{self.source}'; use topics or jsonl")
        check(self.source != "jsonl" or bool(self.path), "evaluation.path", "is not set: evaluation.source=jsonl "
              "needs evaluation.path=FILE.jsonl")
        check(self.holdout > 0, "evaluation.holdout", "must be > 0")
        check(self.limit is None or self.limit > 0, "evaluation.limit", "must be > 0")
        check(self.strategy in {"greedy", "sample"}, "evaluation.strategy",
              f"is '{self.strategy}'; use greedy or sample")
        check(self.samples > 0, "evaluation.samples", "must be > 0")
        check(self.samples == 1 or self.strategy == "sample", "evaluation.samples",
              f"is {self.samples} with greedy decoding, which gives the same answer each time; set "
              f"evaluation.strategy=sample")
        check(self.temperature > 0, "evaluation.temperature", "must be > 0")
        check(0 < self.top_p <= 1, "evaluation.top_p", "must be in (0, 1]")
        check(self.max_new_tokens > 0, "evaluation.max_new_tokens", "must be > 0")
        check(self.tie_tolerance >= 0, "evaluation.tie_tolerance", "must be >= 0")
        check(self.bootstrap >= 100, "evaluation.bootstrap", "must be >= 100")
        check(all(r >= 0 for r in self.rounds or []), "evaluation.rounds", "must hold round numbers >= 0")
