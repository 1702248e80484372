"""The training stage: online DPO for each dialogue model, rewarded by its partner as judge.

For model M in round r, every turn M spoke in the round's dialogues gives one prompt: M's view of the
dialogue before that turn, as chat messages (persona as system message), cut from the left to fit. TRL's
``OnlineDPOTrainer`` samples 2 completions per prompt from M's policy; the partner, frozen as it was at the
start of the round, scores them through the reward callable the pipeline builds (``reward_for(judge)``, any
``f(prompts, completions, **kwargs) -> list[float | None]``); the higher-scored completion is "chosen".

Decisions (see also the TRL notes in DESIGN.md):

* **Ties carry no preference.** TRL makes the first sample "chosen" whenever ``r1 >= r2`` and scores ``None``
  as 0. :class:`PairedReward` marks a pair as masked when ``|r1 - r2| <= training.tie_tolerance`` (default
  0.01 on a reward in [-1, 1]: below the resolution of a bf16 judge's expected score) or when either sample
  has no finite reward; :class:`MaskedOnlineDPOTrainer` zeroes the gradient of masked pairs and skips the
  optimizer step when a whole batch is masked, so a batch of ties changes nothing. Both are counted in the
  train metrics (``pairs/*``, ``skipped_steps``).
* **Reference = the round-start policy** (``training.reference=previous``). Each role keeps ONE adapter that
  continues training across rounds, so ``adapters/round_<r>/<role>/`` alone (on the base) is the policy of
  round r. At the start of a training stage the adapter is copied into a frozen ``<role>_start`` adapter,
  which serves as DPO reference and as the judge that the partner is scored by. Nothing is merged, so this is
  exact also on a quantized (QLoRA) base, and works when both roles share one base. (TRL's own PEFT
  reference, the base with adapters disabled, is ``training.reference=base``.)
* **One base, two adapters** when actor and judge share weights (``models.load_pair``): the base is wrapped
  once by PEFT with adapters ``actor`` and ``judge``. Every stage reaches a model through a
  :class:`ModelView`, which runs the shared base with its role's adapter (or the base, adapters disabled,
  before the role has one) and restores adapter, trainable flags and train/eval mode afterwards. While the
  actor trains, its judge is the judge's ``judge_start`` adapter (the base in round 0): frozen, eval mode,
  no grad; and the other way round.
* ``training.steps=0`` is valid: the stage logs that it trains nothing and records ``skipped``.
* ``gradient_checkpointing`` is off by default: TRL turns the KV cache off while sampling when it is on.

Keep the unstable ``trl.experimental.online_dpo`` import in this module only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from expertchat.config import DialogueConfig, TrainingConfig
from expertchat.dialogue import ROLES, Dialogue, context
from expertchat.errors import ExpertChatError, first_line
from expertchat.models import LoadedModel, chat_messages
from expertchat.store import RunStore
from expertchat.tracking import Tracker

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PEFT 0.21 and TRL 1.16 read ``model.is_gradient_checkpointing``, deprecated by transformers 5: a
    FutureWarning at every wrap and training step that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated.*",
                                category=FutureWarning)
        yield

TRAIN_METRICS_FILE = "train_metrics.jsonl"
REWARDS_FILE = "rewards_by_round.json"

RewardFn = Callable[..., list]  # f(prompts=, completions=, **kwargs) -> list[float | None], 2 x batch items
RewardFactory = Callable[[LoadedModel], RewardFn]  # judge (a frozen view of the partner) -> reward function


def partner(role: str) -> str:
    return "judge" if role == "actor" else "actor"


def adapter_dir(round_idx: int, role: str) -> str:
    """Where a round's adapter (or full weights) of ``role`` is saved, relative to the run folder."""
    return f"adapters/round_{round_idx}/{role}"


# ------------------------------------------------------------------------------------------------- prompts


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> int:
    """Tokens of a chat prompt as TRL feeds it: chat template with generation prompt, no special tokens added."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer: PreTrainedTokenizerBase, system: str, turns: list[tuple[bool, str]],
               max_tokens: int) -> list[dict[str, str]]:
    """Chat messages for one model's view of a dialogue, cut from the left to at most ``max_tokens``.

    Whole exchanges go first, oldest first (the view keeps starting with a partner turn); the persona always
    stays. When only the last partner message is left and it is still too long, its oldest tokens go.

    Raises:
        ExpertChatError: the persona alone does not fit.
    """
    turns = list(turns)
    for _ in range(10_000):
        messages = chat_messages(system, turns, tokenizer.chat_template)
        n = prompt_tokens(tokenizer, messages)
        if n <= max_tokens:
            return messages
        if len(turns) > 1:
            turns.pop(0)
            while len(turns) > 1 and turns[0][0]:  # never start on an own (assistant) turn
                turns.pop(0)
            continue
        own, text = turns[0]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            break
        turns[0] = (own, tokenizer.decode(ids[min(len(ids), n - max_tokens):], skip_special_tokens=True).lstrip())
    raise ExpertChatError(f"the persona alone is longer than the prompt budget of {max_tokens} tokens: raise "
                          f"training.max_prompt_tokens or <role>.max_length, or shorten the persona")


def build_prompts(dialogues: list[Dialogue], role: str, lm: LoadedModel, cfg: DialogueConfig,
                  max_tokens: int) -> list[dict[str, Any]]:
    """One conversational prompt per turn ``role`` spoke: ``{"prompt": [messages], "dialogue_id", "turn",
    "topic", "dialogue_context"}`` (the extra columns reach the reward function as keyword arguments).
    ``dialogue_context`` holds the texts of the messages before the turn, whole and without the persona: the
    judge reads the same context as in the rating stage, whatever the prompt's truncation or chat template."""
    rows = []
    for d in dialogues:
        system = cfg.persona(role, d.topic)
        for t in d.turns:
            if t["role"] == role:
                turns = context(d, role, t["turn"], cfg)
                messages = fit_prompt(lm.tokenizer, system, turns, max_tokens)
                rows.append({"prompt": messages, "dialogue_id": d.id, "turn": t["turn"], "topic": d.topic,
                             "dialogue_context": [text for _, text in turns]})
    return rows


# ------------------------------------------------------------------------------------- rewards and masking


class PairedReward:
    """A reward function for TRL's online DPO that finds the pairs which carry no preference, and counts them.

    TRL calls it with 2 x B items: the B first samples, then the B second samples (pair i = items i and i+B).
    A pair is kept when both rewards are finite and differ by more than ``tie_tolerance``; otherwise it is
    masked (``keep[i]`` False) and :class:`MaskedOnlineDPOTrainer` gives it no gradient. Masked samples still
    return a number (0.0 for an unscored one), which TRL only uses for its logs.

    Args:
        fn: ``fn(prompts=, completions=, **kwargs) -> list[float | None]``.
        tie_tolerance: largest ``|r1 - r2|`` that counts as a tie.
        judge: the judge's display name, for error messages.
    """

    def __init__(self, fn: RewardFn, tie_tolerance: float = 0.0, judge: str = "judge") -> None:
        self.fn = fn
        self.tie_tolerance = tie_tolerance
        self.judge = judge
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)  # TRL's name for the reward in its logs
        self.keep: list[bool] = []
        self.last: dict[str, float] = {}
        self.calls = 0
        self.totals = {"pairs": 0, "tied": 0, "unscored": 0}
        self.call_means: list[float] = []  # mean scored reward of each call (one per micro-batch)
        self.skipped_steps = 0  # optimizer steps skipped because no pair of their window was kept
        self.scored_sum, self.scored_n = 0.0, 0

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        self.calls += 1
        try:
            raw = list(self.fn(prompts=prompts, completions=completions, **kwargs))
        except ExpertChatError:
            raise
        except Exception as exc:  # noqa: BLE001 - any judge failure ends the round with one clear line
            first = first_line(exc, 200)
            raise ExpertChatError(f"the judge ({self.judge}) failed while scoring batch {self.calls}: "
                                  f"{type(exc).__name__}: {first}") from exc
        if len(raw) != len(completions) or len(raw) % 2:
            raise ExpertChatError(f"the judge ({self.judge}) returned {len(raw)} rewards for {len(completions)} "
                                  f"completions")
        values = [_finite(x) for x in raw]
        half = len(values) // 2
        keep, tied, unscored = [], 0, 0
        for a, b in zip(values[:half], values[half:]):
            if a is None or b is None:
                unscored += 1
            elif abs(a - b) <= self.tie_tolerance:
                tied += 1
            keep.append(a is not None and b is not None and abs(a - b) > self.tie_tolerance)
        self.keep = keep
        scored = [v for v in values if v is not None]
        mean = sum(scored) / len(scored) if scored else math.nan
        self.last = {"pairs": half, "tied": tied, "unscored": unscored, "kept": sum(keep), "reward_mean": mean}
        for key, n in (("pairs", half), ("tied", tied), ("unscored", unscored)):
            self.totals[key] += n
        self.call_means.append(mean)
        self.scored_sum += sum(scored)
        self.scored_n += len(scored)
        return [0.0 if v is None else v for v in values]

    def summary(self) -> dict[str, Any]:
        means = [m for m in self.call_means if not math.isnan(m)]
        pairs = max(self.totals["pairs"], 1)
        return {
            "pairs": self.totals["pairs"], "tied_pairs": self.totals["tied"],
            "unscored_pairs": self.totals["unscored"],
            "masked_fraction": round((self.totals["tied"] + self.totals["unscored"]) / pairs, 4),
            "skipped_steps": self.skipped_steps,
            "reward_mean": _round(self.scored_sum / self.scored_n) if self.scored_n else None,
            "reward_first_batch": _round(means[0]) if means else None,
            "reward_last_batch": _round(means[-1]) if means else None,
        }


def _finite(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _round(x: float) -> float:
    return round(float(x), 6)


@functools.lru_cache(maxsize=1)
def trainer_class() -> type:
    """``MaskedOnlineDPOTrainer``, built on first use (importing TRL takes seconds)."""
    from trl.experimental.online_dpo import OnlineDPOTrainer

    class MaskedOnlineDPOTrainer(OnlineDPOTrainer):
        """TRL 1.16's ``OnlineDPOTrainer``, except that the pairs :class:`PairedReward` masks add no gradient.

        TRL averages the DPO loss over all B pairs of a batch. Here the policy's per-token completion log-probs
        get a backward hook that multiplies the gradient rows of masked pairs (items i and i+B) by 0 and of kept
        pairs by B / kept: the gradient is exactly that of the mean loss over the kept pairs of the micro-batch
        (with gradient accumulation, each micro-batch averages over its own kept pairs). When no pair of an
        accumulation window is kept, the optimizer step is skipped: a zero gradient would still move the weights
        through Adam's moments from earlier steps. Skipped steps are counted (``skipped_steps``).
        It relies on ``training_step``'s order in TRL 1.16: policy ``_forward`` (with grad), reference
        ``_forward`` (no grad), rewards, loss (checked: a changed order raises). TRL's logged ``loss`` still
        averages over all pairs; ``pairs/*`` count what was masked.
        """

        def __init__(self, *args: Any, paired_reward: PairedReward, **kwargs: Any) -> None:
            super().__init__(*args, reward_funcs=paired_reward, **kwargs)
            self.paired_reward = paired_reward
            self._policy_logprobs: torch.Tensor | None = None
            self._window_kept = 0  # pairs kept since the last optimizer step (over gradient accumulation)
            for key in ("pairs/kept", "pairs/tied", "pairs/unscored"):  # appended every step (TRL divides by len)
                self.stats[key] = []

        def create_optimizer(self, model=None):
            """The optimizer, whose step is skipped when no pair of its accumulation window was kept: a zero
            gradient alone would still move the weights through Adam's moments (and weight decay)."""
            optimizer = super().create_optimizer(model)
            if getattr(optimizer, "_expertchat_guarded", False):
                return optimizer
            step = optimizer.step

            def guarded_step(*args, **kwargs):
                kept, self._window_kept = self._window_kept, 0
                if kept == 0:
                    self.paired_reward.skipped_steps += 1
                    return None
                return step(*args, **kwargs)

            optimizer.step = guarded_step
            optimizer._expertchat_guarded = True
            return optimizer

        def _forward(self, model, *args, **kwargs):
            logprobs = super()._forward(model, *args, **kwargs)
            if logprobs.requires_grad:
                self._policy_logprobs = logprobs
            return logprobs

        def _calculate_rewards_from_functions(self, *args, **kwargs):
            rewards = super()._calculate_rewards_from_functions(*args, **kwargs)
            keep = torch.tensor(self.paired_reward.keep, dtype=torch.float32)
            pairs, kept = keep.numel(), int(keep.sum())
            logprobs, self._policy_logprobs = self._policy_logprobs, None
            if logprobs is None or logprobs.shape[0] != 2 * pairs:
                raise RuntimeError("OnlineDPOTrainer.training_step no longer computes the policy log-probs before "
                                   "the rewards: the tie mask cannot be applied (is trl pinned to 1.16?)")
            if kept < pairs:
                weight = torch.cat([keep, keep]) * (pairs / max(kept, 1))
                logprobs.register_hook(lambda grad: grad * weight.to(grad)[:, None])
            self._window_kept += kept
            last = self.paired_reward.last
            self.stats["pairs/kept"].append(kept / pairs)
            self.stats["pairs/tied"].append(last["tied"] / pairs)
            self.stats["pairs/unscored"].append(last["unscored"] / pairs)
            return rewards

    return MaskedOnlineDPOTrainer


def metrics_callback(store: RunStore, tracker: Tracker | None, round_idx: int, role: str, step_offset: int):
    """A ``TrainerCallback`` that appends every TRL log to ``train_metrics.jsonl`` and forwards it to the
    pipeline's tracker as ``train/<role>/<metric>`` at step ``step_offset + global_step`` (the trainer itself
    reports to nothing: ``report_to="none"``)."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            values = {k: v for k, v in (logs or {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            store.append(TRAIN_METRICS_FILE, {"round": round_idx, "role": role, "step": state.global_step, **values})
            if tracker is not None:
                tracker.log({f"train/{role}/{k}": v for k, v in values.items()}, step=step_offset + state.global_step)

    return MetricsCallback()


# --------------------------------------------------------------------------------------- adapters and views


class AdapterSwitch:
    """Switches the LoRA adapter a PEFT-wrapped model computes with, fast and reversibly.

    PEFT's ``set_adapter`` / ``disable_adapter`` walk every module (about 2000 in SmolLM2) and toggle
    ``requires_grad``: 16-26 ms per call here, as much as a decode step, and a view is called once per generated
    token. This sets the active adapter (or the disabled flag) on the LoRA layers only, caching the layer list,
    and puts back exactly what was there; trainable flags are never touched (views run without grad). It relies
    on PEFT's ``BaseTunerLayer._active_adapter`` / ``_disable_adapters`` (peft 0.21; a test checks that a view
    computes what ``set_adapter`` gives).
    """

    def __init__(self, peft: Any) -> None:
        self.peft = peft
        self._key: tuple[str, ...] | None = None
        self._layers: list[Any] = []
        self._modules: list[torch.nn.Module] = []

    def _refresh(self) -> None:
        key = tuple(self.peft.peft_config)
        if key != self._key:  # adapters were added or removed: LoRA layers may have appeared
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._modules = list(self.peft.modules())
            self._layers = [m for m in self._modules if isinstance(m, BaseTunerLayer)]
            self._key = key

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        """Compute with ``adapter`` (``None``: the base, adapters disabled), in eval mode, then restore."""
        self._refresh()
        saved = [(m._active_adapter, m._disable_adapters) for m in self._layers]
        # eval mode: gradient checkpointing (active in train mode) would turn the KV cache off
        training = [m for m in self._modules if m.training] if self.peft.training else []
        for m in training:
            m.training = False
        for m in self._layers:
            if adapter is None:
                m._disable_adapters = True
            else:
                m._active_adapter, m._disable_adapters = adapter, False
        try:
            yield
        finally:
            for m, (active, disabled) in zip(self._layers, saved):
                m._active_adapter, m._disable_adapters = active, disabled
            for m in training:
                m.training = True


class ModelView:
    """A model handle that runs a (possibly shared) PEFT-wrapped base with one adapter active, or with the
    adapters disabled, always without grad and in eval mode, and restores the base's state afterwards.
    ``forward``, ``__call__`` and ``generate`` switch; everything else (``config``, ``parameters()``,
    ``generation_config``, ...) is the underlying model's.

    Args:
        model: the underlying transformers model (PEFT injects its LoRA layers into it in place).
        resolve: returns ``(AdapterSwitch or None, adapter name or None)`` at call time: no switch (no PEFT
            wrapper yet) means the plain model; ``None`` as adapter means the base with adapters disabled.
    """

    def __init__(self, model: torch.nn.Module, resolve: Callable[[], tuple[AdapterSwitch | None, str | None]]):
        self._model = model
        self._resolve = resolve

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __repr__(self) -> str:
        switch, adapter = self._resolve()
        return f"ModelView({type(self._model).__name__}, adapter={adapter if switch is not None else 'none'})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self._model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self._model.generate(*args, **kwargs)

    @property
    def forward(self) -> Callable[..., Any]:
        @functools.wraps(self._model.forward)  # keeps the signature (generation code inspects it)
        def forward(*args: Any, **kwargs: Any) -> Any:
            with self.active():
                return self._model.forward(*args, **kwargs)

        return forward

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        switch, adapter = self._resolve()
        with torch.no_grad():
            if switch is None:
                yield
            else:
                with switch.use(adapter):
                    yield


class _Reference(torch.nn.Module):
    """The DPO reference as TRL wants it (a module, not the policy object): a :class:`ModelView` of the
    policy's base with the reference adapter. Holds no parameters; the view is kept out of the module tree."""

    def __init__(self, view: ModelView) -> None:
        super().__init__()
        self._view = [view]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._view[0](*args, **kwargs)


class Policies:
    """The trained models of a run, and the views every stage uses.

    ``models`` (a role -> :class:`LoadedModel` dict) is what the dialogue and rating stages get: each role's
    current policy. With LoRA a base is wrapped by PEFT once, on the first training stage or resume, with one
    adapter per role using it (two adapters when both roles share the base). With ``training.method=full``
    each role owns its weights (a shared base is copied for the judge once, at start).

    Args:
        models: ``{"actor": ..., "judge": ...}`` as ``models.load_pair`` returns them (may share one model).
        cfg: the training config.
    """

    def __init__(self, models: dict[str, LoadedModel], cfg: TrainingConfig) -> None:
        self.cfg = cfg
        self.base = dict(models)
        self._amp: dict[str, torch.dtype] = {}  # full fine-tuning: role -> the half dtype its weights loaded in
        if cfg.method == "full" and models["actor"].model is models["judge"].model:
            judge = models["judge"]
            log.info("full fine-tuning: the judge gets its own copy of the shared weights")
            self.base["judge"] = LoadedModel(judge.name, copy.deepcopy(judge.model), judge.tokenizer, judge.cfg)
        if cfg.method == "full":  # frozen except while a role trains (a judge's forward then builds no graph)
            for role, lm in self.base.items():
                if getattr(lm.model, "is_loaded_in_4bit", False) or getattr(lm.model, "is_loaded_in_8bit", False):
                    raise ExpertChatError(f"training.method=full cannot train the quantized {role} model "
                                          f"'{lm.name}': use training.method=lora (QLoRA) or {role}.load_in_4bit=false")
                if lm.model.dtype in (torch.float16, torch.bfloat16):
                    # AdamW on half-precision weights loses most updates (bf16: 5e-5 vanishes against |w| > 0.01)
                    # and AMP refuses fp16 gradients: train fp32 weights (mixed precision on a GPU).
                    log.warning("full fine-tuning: %s's weights upcast from %s to float32 (half-precision updates "
                                "vanish); set %s.dtype=float32 to load them so", lm.name,
                                str(lm.model.dtype).removeprefix("torch."), role)
                    self._amp[role] = lm.model.dtype  # kept as the autocast dtype on a GPU
                    lm.model.float()
                lm.model.requires_grad_(False)
        self._peft: dict[int, Any] = {}  # id(base model) -> its PEFT wrapper
        self._switch: dict[int, AdapterSwitch] = {}  # id(base model) -> its adapter switch
        self._trained: set[str] = set()  # roles that have an adapter (or trained full weights)
        self._start: dict[str, Any] = {}  # during a training stage: role -> its round-start snapshot
        self.models = {role: self._view(role, self._policy_adapter) for role in ROLES}

    # ---- views
    def _policy_adapter(self, role: str) -> str | None:
        return role if role in self._trained else None

    def _start_adapter(self, role: str) -> str | None:
        return self._start.get(role)

    def _view(self, role: str, adapter: Callable[[str], str | None]) -> LoadedModel:
        lm = self.base[role]
        if self.cfg.method == "full":
            return lm
        raw = lm.model
        view = ModelView(raw, lambda: (self._switch.get(id(raw)), adapter(role)))
        return LoadedModel(lm.name, view, lm.tokenizer, lm.cfg)

    def frozen(self, role: str) -> LoadedModel:
        """``role`` as it was at the start of the current training stage (its ``<role>_start`` adapter, or the
        base before it had one): the judge its partner is scored by."""
        if self.cfg.method == "full":
            lm = self.base[role]
            start = self._start.get(role)
            return lm if start is None else LoadedModel(lm.name, start, lm.tokenizer, lm.cfg)
        return self._view(role, self._start_adapter)

    def describe(self, role: str, what: str) -> str:
        """Which weights serve as ``role``'s judge-view or reference in the current stage, in words."""
        if self.cfg.method == "full":
            return f"{role} full weights at round start"
        if what == "reference" and self.cfg.reference == "base":
            return "base, adapters disabled"
        start = self._start.get(role)
        return f"{role} adapter at round start (frozen copy '{start}')" if start else "base, adapters disabled"

    # ---- adapters
    def _lora_config(self):
        from peft import LoraConfig

        targets = list(self.cfg.lora_target_modules)
        return LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=targets[0] if targets == ["all-linear"] else targets, bias="none",
                          task_type="CAUSAL_LM")

    def _wrap(self, role: str, load_from: str | None = None):
        """The PEFT wrapper of ``role``'s base with an adapter named ``role`` (new, or loaded from a folder)."""
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        raw = self.base[role].model
        peft = self._peft.get(id(raw))
        if peft is None:
            if getattr(raw, "is_loaded_in_4bit", False) or getattr(raw, "is_loaded_in_8bit", False):
                prepare_model_for_kbit_training(raw, use_gradient_checkpointing=self.cfg.gradient_checkpointing)
            with _quiet():
                if load_from:
                    peft = PeftModel.from_pretrained(raw, load_from, adapter_name=role, is_trainable=True)
                else:
                    peft = get_peft_model(raw, self._lora_config(), adapter_name=role)
            self._peft[id(raw)] = peft
            self._switch[id(raw)] = AdapterSwitch(peft)
        elif load_from:
            if role in peft.peft_config:
                peft.delete_adapter(role)
            peft.load_adapter(load_from, adapter_name=role, is_trainable=True)
        elif role not in peft.peft_config:
            peft.add_adapter(role, self._lora_config())
        peft.eval()
        return peft

    def _snapshot(self) -> None:
        """Freeze each role's current policy as its round-start copy (LoRA: adapter ``<role>_start``)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        self._start = {}
        if self.cfg.method == "full":
            return  # the round-start copies are the references TRL makes, kept after each role trains
        for role in sorted(self._trained):
            peft = self._peft[id(self.base[role].model)]
            name = f"{role}_start"
            if name not in peft.peft_config:
                peft.add_adapter(name, copy.deepcopy(peft.peft_config[role]))
            set_peft_model_state_dict(peft, get_peft_model_state_dict(peft, adapter_name=role), adapter_name=name)
            _freeze_adapter(peft, name)
            self._start[role] = name

    def save(self, store: RunStore, round_idx: int, role: str) -> str:
        """Save ``role``'s policy to ``adapters/round_<r>/<role>/`` (a PEFT adapter, or full weights)."""
        folder = store.path(adapter_dir(round_idx, role))
        lm = self.base[role]
        if self.cfg.method == "full":
            lm.model.save_pretrained(folder)
            lm.tokenizer.save_pretrained(folder)
        else:  # PEFT puts a non-default adapter in a sub-folder named after it: adapters/round_<r>/<role>/
            self._peft[id(lm.model)].save_pretrained(str(folder.parent), selected_adapters=[role])
        return adapter_dir(round_idx, role)

    def load(self, store: RunStore, round_idx: int, role: str) -> None:
        """Load ``role``'s policy saved by round ``round_idx``."""
        folder = store.path(adapter_dir(round_idx, role))
        if self.cfg.method == "full":
            from transformers import AutoModelForCausalLM

            raw = self.base[role].model
            saved = AutoModelForCausalLM.from_pretrained(folder, dtype=raw.dtype)
            raw.load_state_dict(saved.state_dict())
        else:
            if not (folder / "adapter_config.json").exists():
                raise ExpertChatError(f"no adapter at {folder} (adapter_config.json missing): a run trained with "
                                      f"training.method=full cannot resume with method=lora")
            self._wrap(role, load_from=str(folder))
        self._trained.add(role)
        log.info("loaded %s's policy from %s", role, folder)

    def restore(self, store: RunStore, rounds: int) -> int | None:
        """On resume: load each role's policy from the last completed training stage that saved it. Returns
        that round (None when no policy was saved yet)."""
        last = None
        for role in ROLES:
            for r in reversed(range(rounds)):
                if store.done(r, "training") and store.path(adapter_dir(r, role)).is_dir():
                    self.load(store, r, role)
                    last = r if last is None else max(last, r)
                    break
        return last

    # ---- the stage
    def train_round(self, round_idx: int, dialogues: list[Dialogue], reward_for: RewardFactory,
                    dialogue_cfg: DialogueConfig, store: RunStore, tracker: Tracker | None = None, *,
                    seed: int = 0, progress: bool = False) -> dict[str, Any]:
        """Train each model of the round (actor, then judge unless ``bidirectional=false``) for
        ``training.steps`` online DPO steps on the round's dialogue contexts, the partner (as it was at the
        start of the stage) judging; save each policy to ``adapters/round_<r>/<role>/``.

        Returns the stage summary: per role prompts, steps, seconds, pair counts, mean rewards.

        Raises:
            ExpertChatError: the judge failed mid-training, or training failed; nothing of this round is marked
                done, and files of earlier stages are untouched.
        """
        cfg = self.cfg
        summary: dict[str, Any] = {
            "method": cfg.method, "reference": cfg.reference, "tie_tolerance": cfg.tie_tolerance,
            # nothing is ever merged into a base (the reference is a frozen adapter copy), so a 4-bit base is exact
            "quantized_base": sorted({role for role, lm in self.base.items()
                                      if getattr(lm.model, "is_loaded_in_4bit", False)}),
            "merged_into_base": False, "roles": {}}
        if cfg.steps == 0:
            log.info("round %d training: training.steps=0, no model is trained (dialogue and rating only)",
                     round_idx)
            return {**summary, "skipped": "training.steps=0"}
        roles = list(ROLES) if cfg.bidirectional else ["actor"]
        self._snapshot()
        try:
            for role in roles:
                summary["roles"][role] = self._train_one(round_idx, role, dialogues, reward_for, dialogue_cfg,
                                                         store, tracker, seed=seed, progress=progress)
        finally:
            self._start = {}
        if tracker is not None:
            tracker.log({f"rounds/{role}_reward_mean": s["reward_mean"] for role, s in summary["roles"].items()
                         if s.get("reward_mean") is not None}, step=round_idx)
        return summary

    def _train_one(self, round_idx: int, role: str, dialogues: list[Dialogue], reward_for: RewardFactory,
                   dialogue_cfg: DialogueConfig, store: RunStore, tracker: Tracker | None, *, seed: int,
                   progress: bool) -> dict[str, Any]:
        from datasets import Dataset

        cfg = self.cfg
        lm = self.base[role]
        budget = min(cfg.max_prompt_tokens, lm.cfg.max_length - cfg.max_new_tokens)
        if budget <= 0:
            raise ExpertChatError(f"{role}.max_length ({lm.cfg.max_length}) must exceed training.max_new_tokens "
                                  f"({cfg.max_new_tokens})")
        rows = build_prompts(dialogues, role, lm, dialogue_cfg, budget)
        if not rows:
            log.warning("round %d training: %s spoke no turn in this round's dialogues; not trained", round_idx, role)
            return {"skipped": "no turns of this model in the round's dialogues"}
        judge = self.frozen(partner(role))
        seed = seed + 1000 * round_idx + ROLES.index(role)
        scratch = tempfile.mkdtemp(prefix=f"expertchat-{role}-")  # the Trainer's output_dir: nothing is saved there
        try:
            reward = PairedReward(reward_for(judge), cfg.tie_tolerance, judge=f"{judge.name} as {partner(role)}")
            torch.manual_seed(seed)  # a new adapter's initialisation
            model, ref = self._policy(role)
            trainer = trainer_class()(
                model=model, ref_model=ref, paired_reward=reward,
                args=self._args(scratch, budget, seed, model, progress, amp=self._amp.get(role)),
                train_dataset=Dataset.from_list(rows), processing_class=lm.tokenizer,
                callbacks=[metrics_callback(store, tracker, round_idx, role, step_offset=round_idx * cfg.steps)],
            )
        except ExpertChatError:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        except Exception as exc:  # noqa: BLE001 - TRL / PEFT set-up errors as one line
            shutil.rmtree(scratch, ignore_errors=True)
            first = first_line(exc, 200)
            raise ExpertChatError(f"training round {round_idx} ({role}) could not start: {type(exc).__name__}: "
                                  f"{first}") from exc
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; ours go to the tracker
        log.info("round %d training %s: %d prompts, %d steps x %d prompts x 2 samples; judge: %s; reference: %s",
                 round_idx, role, len(rows), cfg.steps, cfg.batch_size * cfg.gradient_accumulation_steps,
                 self.describe(partner(role), "judge"), self.describe(role, "reference"))
        start = time.perf_counter()
        try:
            with _quiet():
                trainer.train()
        except ExpertChatError as exc:
            raise ExpertChatError(f"training round {round_idx} ({role}) stopped at step "
                                  f"{trainer.state.global_step + 1}/{cfg.steps}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - report one line; HYDRA_FULL_ERROR=1 shows the traceback
            first = first_line(exc, 200)
            raise ExpertChatError(f"training round {round_idx} ({role}) failed at step "
                                  f"{trainer.state.global_step + 1}/{cfg.steps}: {type(exc).__name__}: {first}") from exc
        finally:
            self._after_training(role, trainer)
            shutil.rmtree(scratch, ignore_errors=True)
        seconds = time.perf_counter() - start
        steps = trainer.state.global_step
        # The trainer, its optimizer and TRL's buffers sit in reference cycles: free them now, not at some later
        # collection, so that the next stage (or the partner's training) gets the memory back (GPU memory too).
        del trainer, model, ref
        _release_memory()
        self._trained.add(role)
        saved = self.save(store, round_idx, role)
        result = {"prompts": len(rows), "steps": steps, "seconds": round(seconds, 2),
                  "seconds_per_step": round(seconds / max(steps, 1), 2), **reward.summary(),
                  "judge": self.describe(partner(role), "judge"), "reference": self.describe(role, "reference"),
                  "saved": saved}
        log.info("round %d training %s: %s", round_idx, role, result)
        return result

    def _policy(self, role: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The module TRL trains for ``role``, and the reference it compares against (None: TRL's own copy)."""
        if self.cfg.method == "full":
            model = self.base[role].model
            for p in model.parameters():
                p.requires_grad_(True)
            return model, None  # TRL deep-copies the model at trainer init: the round-start policy
        peft = self._wrap(role)
        peft.set_adapter(role)  # active and trainable; every other adapter frozen
        for name in self._start.values():
            _freeze_adapter(peft, name)
        raw = self.base[role].model
        ref_adapter = self._start.get(role) if self.cfg.reference == "previous" else None
        return peft, _Reference(ModelView(raw, lambda: (self._switch.get(id(raw)), ref_adapter)))

    def _after_training(self, role: str, trainer: Any) -> None:
        model = self.base[role].model
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.config.use_cache = True
        if self.cfg.method == "full":
            if trainer.ref_model is not None and role not in self._start:
                self._start[role] = trainer.ref_model  # judges the partner for the rest of this stage
            for p in model.parameters():
                p.requires_grad_(False)
        model.eval()

    def _args(self, output_dir: str, budget: int, seed: int, model: torch.nn.Module, progress: bool,
              amp: torch.dtype | None = None):
        from trl.experimental.online_dpo import OnlineDPOConfig

        cfg = self.cfg
        param = next(model.parameters())
        cuda = param.device.type == "cuda"
        # TRL defaults to bf16 autocast, and accelerate then patches the model's forward for good: on a CPU (and
        # for fp32 models) that changes later stages' numerics. Mixed precision only on a GPU, in the base's dtype.
        dtype = amp or getattr(model, "dtype", param.dtype)
        return OnlineDPOConfig(
            output_dir=output_dir,
            max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler, warmup_steps=0, weight_decay=0.0, beta=cfg.beta,
            loss_type=cfg.loss_type, max_new_tokens=cfg.max_new_tokens, max_length=budget + cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, activation_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing=cfg.gradient_checkpointing,  # TRL's default is True: both names, no warning
            bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=not cuda, seed=seed,
            disable_tqdm=not progress, dataloader_num_workers=0,
        )


def _freeze_adapter(peft: Any, name: str) -> None:
    """Make the LoRA weights of adapter ``name`` untrainable (PEFT names them ``...lora_A.<name>.weight``)."""
    for n, p in peft.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


def _release_memory() -> None:
    """Collect the freed trainer and hand its memory back: to the CUDA allocator's pool and, on Linux, glibc's
    free heap to the OS (``malloc_trim``). Without it the next stage's allocations land beside the fragments and
    a multi-round run's peak RSS grows round after round."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


# ----------------------------------------------------------------------------------------------- summaries


def write_rewards_by_round(store: RunStore, rounds: int) -> list[dict[str, Any]]:
    """``rewards_by_round.json``: per completed round and trained model, the mean reward its judge gave the
    sampled completions (all, first and last batch) and how many pairs were masked."""
    rows = []
    for r in range(rounds):
        if not store.done(r, "training"):
            continue
        for role, s in store.stage_summary(r, "training").get("roles", {}).items():
            if "reward_mean" in s:
                rows.append({"round": r, "model": role, **{k: s[k] for k in (
                    "reward_mean", "reward_first_batch", "reward_last_batch", "pairs", "tied_pairs",
                    "unscored_pairs", "masked_fraction", "steps")}})
    store.write_json(REWARDS_FILE, rows)
    return rows
