"""The judging part of the typed schema (``judging.*``: the rubric, the judge's prompts, parse mode), kept apart
from ``schema.py`` for its length; ``expertchat.config`` re-exports it: ``from expertchat.config import
JudgingConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

from expertchat.errors import check, check_placeholders

# The signals a category can name: the configurable entries of expertchat/judging/signals.py's registry (a test
# keeps the two equal; parse mode's ``parse`` is chosen by ``judging.mode``, not named).
SIGNALS = ("rubric", "likelihood", "blend", "turing")
# Signals that do not read the category's wording: two weighted categories of one of them always score the same.
CATEGORY_BLIND = ("likelihood", "turing")


@dataclass
class RubricCategory:
    """One rubric category (``judging.rubric.<name>``): what the judge is asked, its weight, its signal.

    ``signal``: ``rubric`` = the judge's rating of the category (the expected score from token probabilities in
    ``expected`` mode, the parsed ``[[N]]`` in ``parse`` mode); ``likelihood`` = GPTScore-style relevance: the
    judge's log-probability of the answer given the context minus without it, mapped to [1, 10];
    ``blend`` = the mean of both; ``turing`` = the judge's forced choice "a human expert or an AI?" read from
    token probabilities (``judging.turing``), 1 + 9 p(human expert). See ``expertchat/judging/judge.py``.
    """

    description: str = ""
    weight: float = 1.0
    signal: str = "rubric"  # rubric | likelihood | blend | turing


def _default_rubric() -> dict[str, RubricCategory]:
    # The default for small judges (measured in experiments/judge_sanity): a 135M judge's rubric score cannot
    # tell a good answer from a poor one (44% of labelled pairs), its likelihood can (90%). Depth has no signal of
    # its own such a judge can give: its likelihood is the same number as knowledge's (the PMI does not read the
    # category), and its rubric score is chance; so it weighs 0 here (not computed) and 1 for large judges.
    # Human-expert likeness keeps the rubric score: the turing signal (the forced choice "a human expert or an
    # AI?") separates nothing for such a judge either (35% of the pairs, mean p(human expert) 0.496 vs 0.498).
    return {
        "knowledge": RubricCategory("Is the response correct, relevant to what was asked, and does it show "
                                    "real knowledge of the topic?", 1.0, "likelihood"),
        "depth": RubricCategory("Does the response go into specific, concrete detail rather than generalities?",
                                0.0, "rubric"),
        "human_expert_likeness": RubricCategory("Does the response read like a human expert talking, not an AI?",
                                                1.0, "rubric"),
    }


@dataclass
class ParseConfig:
    """``judging.mode=parse`` (``judging.parse.*``): the judge generates an explanation, ``[[N]]`` and
    ``[[[WIM]]]`` in reply to ``instruction`` (the original's wording, with ``{category}`` and ``{description}``),
    decoded as the original did (contrastive search, k=4, alpha=0.6, up to 256 new tokens)."""

    instruction: str = (
        "Rate the {category} of the response: {description} Begin your evaluation by providing a short "
        "explanation. Be as objective as possible. After providing your explanation, please rate the response on "
        'a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]". Next '
        "you will provide a 1-2 sentence summary of what is missing (WIM) in the response. This should focus on "
        "the specific content and precise information it did not include. Please give this summary by strictly "
        'following this format: "[[[wim]]]", for example: "WIM: [[[The response does not detail ...]]]". If you '
        "don't have any feedback don't include the wim brackets.")
    strategy: str = "contrastive"  # decoding of parse mode (the original: contrastive, k=4, alpha=0.6)
    max_new_tokens: int = 256
    top_k: int = 4
    penalty_alpha: float = 0.6
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_placeholders(self.instruction, "judging.parse.instruction", ("category", "description"))
        check(self.strategy in {"sample", "contrastive"}, "judging.parse.strategy",
               f"is '{self.strategy}'; use sample or contrastive")
        check(self.max_new_tokens > 0, "judging.parse.max_new_tokens", "must be > 0")
        check(self.top_k >= 1, "judging.parse.top_k", "must be >= 1")
        check(0 <= self.penalty_alpha <= 1, "judging.parse.penalty_alpha", "must be in [0, 1]")
        check(self.temperature > 0, "judging.parse.temperature", "must be > 0")


@dataclass
class TuringConfig:
    """The ``turing`` signal's forced choice (``judging.turing.*``): the seed's game asked of the judge.

    After the rated turn the judge reads ``question`` with ``{a}`` = ``human`` and ``{b}`` = ``ai`` (the letter A
    names a human expert), its reply forced to start with ``prefix``; then the same with the two swapped. The
    letters A and B are read off its next token (see ``expertchat/judging/judge.py``); ``prefix``'s trailing
    whitespace belongs to the letter's token, so it is dropped from the prompt.
    """

    question: str = "Was this response written by {a} or by {b}? Answer A for {a}, B for {b}."
    human: str = "a human expert"
    ai: str = "an AI"
    prefix: str = "Answer:"

    def __post_init__(self) -> None:
        check_placeholders(self.question, "judging.turing.question", ("a", "b"))
        check("{a}" in self.question and "{b}" in self.question, "judging.turing.question",
              "must contain {a} and {b} (the two answers, in the order of the letters A and B)")
        check(bool(self.human.strip()) and bool(self.ai.strip()), "judging.turing.human",
              "and judging.turing.ai must not be empty")
        check(self.human.strip() != self.ai.strip(), "judging.turing.human", f"and judging.turing.ai are both "
              f"'{self.human}'; they name the two choices")
        check(bool(self.prefix.strip()), "judging.turing.prefix", "is empty; e.g. 'Answer:'")


@dataclass
class JudgingConfig:
    """How a judge rates a turn (``expertchat/judging/judge.py``); the judge *model* is ``judge`` (``model@judge``).

    Templates: ``prompt`` holds ``{context}`` and ``{answer}``; each of ``instructions`` holds ``{category}``
    and ``{description}`` and follows the prompt in the same user message (several phrasings are averaged);
    the judge's reply is forced to start with ``rating_prefix``. ``wim_instruction`` asks what is missing, the
    reply starts with ``wim_prefix``. ``parse`` holds the original's wording and decoding for ``mode=parse``;
    ``turing`` the forced-choice question of the ``turing`` signal.
    """

    mode: str = "expected"  # expected: expected score from token probabilities | parse: generate and parse [[N]]
    rubric: dict[str, RubricCategory] = field(default_factory=_default_rubric)
    system: str = "You are an impartial expert judge."
    prompt: str = ("Please act as an impartial judge and evaluate the response below.\n\n[Question]\n{context}\n\n"
                   "[The Start of the Response]\n{answer}\n[The End of the Response]\n\n")
    instructions: list[str] = field(default_factory=lambda: [
        'Rate the {category} of the response: {description} Rate it on a scale of 1 to 10 by strictly following '
        'this format: "[[rating]]", for example: "Rating: [[5]]".'])
    rating_prefix: str = "Rating: [["
    calibrate: bool = False  # contextual calibration: divide by the score distribution of a content-free answer
    content_free: str = "N/A"  # the content-free answer (calibration) / question (likelihood baseline)
    likelihood_center: float = 20.0  # summed PMI (nats) that maps to the middle of the scale (5.5)
    likelihood_scale: float = 10.0  # nats of PMI per unit of logistic slope
    likelihood_per_token: bool = False  # average the PMI per token instead of summing it
    likelihood_copy_ngram: int = 3  # answer tokens inside an n-gram copied from the context count 0 (0: off)
    wim: bool = True  # write a "what is missing" critique (skipped when reward.zeta == 0)
    wim_instruction: str = ("In one or two sentences, say what specific content or precise information is missing "
                            "from the response. If nothing is missing, say: Nothing.")
    wim_prefix: str = "What is missing:"
    wim_max_new_tokens: int = 48
    wim_max_chars: int = 400
    parse: ParseConfig = field(default_factory=ParseConfig)  # mode=parse: the judge's generation and its wording
    turing: TuringConfig = field(default_factory=TuringConfig)  # the turing signal's question (human expert or AI?)
    on_parse_failure: str = "skip"  # skip: the turn gets no reward | neutral: the category scores neutral_score
    neutral_score: float = 5.0
    context_turns: int = 2  # preceding dialogue turns the judge sees
    max_context_tokens: int = 384  # longer contexts keep their end
    max_answer_tokens: int = 384  # longer answers keep their first and last halves (each row says so)
    batch_size: int = 16  # rated turns per forward pass (fewer where the likelihood's logits would not fit)

    def active(self) -> dict[str, RubricCategory]:
        """The categories that count: weight > 0 (a category of weight 0 is neither computed nor recorded)."""
        return {name: cat for name, cat in self.rubric.items() if cat.weight > 0}

    def same_signal_warning(self) -> str | None:
        """A warning when two weighted categories would always score the same: every ``likelihood`` category
        reads one PMI of the turn with its context, every ``turing`` category one forced choice, whatever the
        category asks (:data:`CATEGORY_BLIND`); ``None`` otherwise."""
        for signal in CATEGORY_BLIND:
            names = [name for name, cat in self.active().items() if cat.signal == signal]
            if len(names) >= 2:
                share = sum(self.rubric[n].weight for n in names) / sum(c.weight for c in self.active().values())
                return (f"judging.rubric: {' and '.join(names)} all read the {signal} signal, so they always score "
                        f"the same and together weigh {share:.0%} of the score; give one a rubric signal or weight 0")
        return None

    def __post_init__(self) -> None:
        check(self.mode in {"expected", "parse"}, "judging.mode", f"is '{self.mode}'; use expected or parse")
        check(len(self.rubric) > 0, "judging.rubric", "is empty; give at least one category")
        for name, cat in self.rubric.items():
            check(cat.weight >= 0, f"judging.rubric.{name}.weight", f"is {cat.weight}; it must be >= 0")
            check(cat.signal in SIGNALS, f"judging.rubric.{name}.signal",
                  f"is '{cat.signal}'; use {', '.join(SIGNALS)}")
        check(sum(c.weight for c in self.rubric.values()) > 0, "judging.rubric",
               "weights sum to 0; give at least one category a positive weight")
        check(len(self.instructions) > 0, "judging.instructions", "is empty; give at least one phrasing")
        for key, text, names in [("prompt", self.prompt, {"context", "answer"}),
                                 *[(f"instructions[{i}]", t, {"category", "description"})
                                   for i, t in enumerate(self.instructions)]]:
            check_placeholders(text, f"judging.{key}", tuple(sorted(names)))
        check("{answer}" in self.prompt and "{context}" in self.prompt, "judging.prompt",
               "must contain {context} and {answer}")
        check(bool(self.rating_prefix.strip()), "judging.rating_prefix", "is empty; e.g. 'Rating: [['")
        check(self.likelihood_scale > 0, "judging.likelihood_scale", "must be > 0")
        check(self.wim_max_new_tokens > 0, "judging.wim_max_new_tokens", "must be > 0")
        check(self.wim_max_chars > 0, "judging.wim_max_chars", "must be > 0")
        check(self.on_parse_failure in {"skip", "neutral"}, "judging.on_parse_failure",
               f"is '{self.on_parse_failure}'; use skip or neutral")
        check(1 <= self.neutral_score <= 10, "judging.neutral_score", "must be in [1, 10]")
        check(self.context_turns >= 1, "judging.context_turns", "must be >= 1")
        check(self.max_context_tokens > 0, "judging.max_context_tokens", "must be > 0")
        check(self.max_answer_tokens > 0, "judging.max_answer_tokens", "must be > 0")
        check(self.batch_size > 0, "judging.batch_size", "must be > 0")
