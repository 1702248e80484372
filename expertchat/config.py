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

from expertchat.errors import ExpertChatError


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
class ExpertChatConfig:
    """The whole experiment."""

    actor: ModelConfig = field(default_factory=ModelConfig)
    judge: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)
    mode: str = "run"  # run: the dialogue -> rate -> train loop
    rounds: int = 1
    seed: int = 0
    run_dir: str = "."  # set to the Hydra job's output folder by conf/config.yaml
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        _check(self.mode in {"run"}, "mode", f"is '{self.mode}'; use run")
        _check(self.rounds > 0, "rounds", "must be > 0")


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
        first = str(exc).strip().splitlines()[0]
        raise ExpertChatError(f"config error: {key + ': ' if key else ''}{first}") from exc
