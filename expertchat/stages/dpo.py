"""The coupling to TRL's online DPO: the tie-aware reward, the masked trainer, its arguments and its logs.

TRL's ``OnlineDPOTrainer`` samples 2 completions per prompt from the policy and makes the first "chosen"
whenever ``r1 >= r2``, scoring ``None`` as 0. :class:`PairedReward` finds the pairs that carry no preference
(ties within ``training.tie_tolerance``, or a sample without a finite reward) and
:class:`MaskedOnlineDPOTrainer` gives them no gradient, skipping the optimizer step when a whole accumulation
window is masked. :class:`MetricsCallback` sends TRL's logs to the run folder and the pipeline's tracker.

Keep the unstable ``trl.experimental.online_dpo`` import in this module only. Importing it takes seconds, so
``expertchat.stages.training`` imports this module only when a model trains.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import TrainerCallback
from trl.data_utils import maybe_apply_chat_template
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from expertchat.config.schema import GenerationConfig, TrainingConfig
from expertchat.engine.generation import generate
from expertchat.engine.logprobs import completion_logprobs
from expertchat.engine.models import is_quantized, require
from expertchat.errors import ExpertChatError, first_line
from expertchat.report.console import open_progress
from expertchat.report.tracking import Tracker
from expertchat.runs.store import RunStore

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.judging.rewards import RewardFn


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
        self.seconds, self.rated = 0.0, 0  # wall seconds in the judge, completions it was given (the timing split)

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        """Score 2 x B completions; sets ``keep`` (B flags) and ``last`` and adds to the totals.

        Raises:
            ExpertChatError: the judge failed (one line naming it and the batch), or returned a wrong number
                of rewards.
        """
        self.calls += 1
        start = time.perf_counter()
        try:
            values = [_finite(x) for x in self._score(prompts, completions, **kwargs)]
        finally:
            self.seconds += time.perf_counter() - start
        self.rated += len(values)
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

    def _score(self, prompts: list, completions: list, **kwargs: Any) -> list:
        """The judge's raw rewards, one per completion (an even number)."""
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
        return raw

    def summary(self) -> dict[str, Any]:
        """Over every call so far: ``pairs``, ``tied_pairs``, ``unscored_pairs`` (counts), ``masked_fraction`` (of
        the pairs), ``skipped_steps`` (optimizer steps with no kept pair), and the mean reward of the scored
        samples (``reward_mean``; of the first and the last call: ``reward_first_batch``, ``reward_last_batch``),
        in the reward's units ([-1, 1])."""
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
    averages over all pairs; ``pairs/*`` count what was masked. Sampling (:meth:`_sample`) and both forwards
    (:meth:`_forward`: each prompt encoded once for its two samples) are the project's faster equivalents.
    """

    def __init__(self, *args: Any, paired_reward: PairedReward, **kwargs: Any) -> None:
        super().__init__(*args, reward_funcs=paired_reward, **kwargs)
        self.paired_reward = paired_reward
        self._policy_logprobs: torch.Tensor | None = None
        self._window_kept = 0  # pairs kept since the last optimizer step (over gradient accumulation)
        # the timing split: seconds sampling (and tokens sampled), seconds in the reference's forwards
        self.timing = {"generation_seconds": 0.0, "generated_tokens": 0, "reference_seconds": 0.0}
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

    def _generate(self, model, prompts, images=None):
        """:meth:`_sample`, timed: its seconds and the completion tokens it sampled go to ``timing``."""
        start = time.perf_counter()
        out = self._sample(model, prompts, images)
        self.timing["generation_seconds"] += time.perf_counter() - start
        self.timing["generated_tokens"] += int(out[3].sum())
        return out

    def _sample(self, model, prompts, images=None):
        """TRL's completion sampling through ExpertChat's decode loop (:func:`expertchat.engine.generation.generate`)
        instead of ``model.generate``: the same prompt tensors (left-padded, each prompt twice), settings
        (temperature, top_k, top_p, max_new_tokens, every eos id), torch's global RNG (seeded by the trainer) and
        returned tensors (completions padded after their first stop token, which the mask includes). TRL's own
        path serves what the loop does not do: images, repetition penalty, min_p, extra generation kwargs,
        gradient checkpointing (no KV cache), several processes.

        Returns:
            ``prompt_ids, prompt_mask`` ``[2B, P]``, ``completion_ids, completion_mask`` ``[2B, C]``, None.
        """
        args = self.args
        if (images is not None or self.repetition_penalty not in (None, 1.0) or self.min_p is not None
                or args.generation_kwargs or args.gradient_checkpointing or self.accelerator.num_processes > 1):
            return super()._generate(model, prompts, images)
        texts = [maybe_apply_chat_template({"prompt": p}, self.processing_class)["prompt"] for p in prompts]
        enc = self.processing_class(text=texts, return_tensors="pt", padding=True, padding_side="left",
                                    add_special_tokens=False)
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = enc["input_ids"].to(device).repeat(2, 1), enc["attention_mask"].to(device).repeat(2, 1)
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=self.temperature,
                               top_k=self.top_k or 0, top_p=self.top_p, batch_size=2 * len(texts))
        with torch.no_grad():
            out = generate(self.accelerator.unwrap_model(model), self._tokenizer, texts + texts, cfg,
                           stop_token_ids=self.eos_token_ids)
        rows = [torch.tensor(g.token_ids + ([g.stop_token] if g.finished else []), dtype=torch.long) for g in out]
        completion_ids = pad_sequence(rows, batch_first=True, padding_value=self._tokenizer.pad_token_id)
        completion_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
        return prompt_ids, prompt_mask, completion_ids.to(device), completion_mask.to(device), None

    def _forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
        """TRL's completion log-probs (``[2B, C]``), each prompt encoded once for its two samples
        (:func:`expertchat.engine.logprobs.completion_logprobs`: the same values up to float rounding, ~0.6x the
        work). TRL's own forward serves images, vision-language models (positions of their own), gradient
        checkpointing (no KV cache) and data-parallel wrappers (a cache split across replicas)."""
        start = time.perf_counter()
        cut = max(prompt_ids.size(1) + completion_ids.size(1) - self.max_length, 0)  # TRL's left truncation
        parallel = (self.accelerator.num_processes > 1 or getattr(self.args, "n_gpu", 1) > 1
                    or isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)))
        vision = getattr(getattr(model, "config", None), "vision_config", None) is not None
        if (vision_inputs is None and not vision and not parallel and not self.args.gradient_checkpointing
                and cut < prompt_ids.size(1)):
            logprobs = completion_logprobs(model, prompt_ids[:, cut:], prompt_mask[:, cut:], completion_ids,
                                           completion_mask)
        else:
            logprobs = super()._forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                        vision_inputs)
        if logprobs.requires_grad:
            self._policy_logprobs = logprobs
        else:  # the reference's (no grad): part of the training phase, measured for the timing split
            self.timing["reference_seconds"] += time.perf_counter() - start
        return logprobs

    def _calculate_rewards_from_functions(self, *args, **kwargs):
        """TRL's rewards; on the way, the mask hook on the policy's log-probs and the ``pairs/*`` stats.

        Raises:
            RuntimeError: TRL no longer computes the policy's log-probs before the rewards.
        """
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


class MetricsCallback(TrainerCallback):
    """Appends every TRL log to ``path`` in the run folder (``train_metrics.jsonl``) and forwards it to the
    pipeline's tracker as ``train/<role>/<metric>`` at step ``step_offset + global_step`` (the trainer itself
    reports to nothing: ``report_to="none"``)."""

    def __init__(self, store: RunStore, tracker: Tracker | None, round_idx: int, role: str, step_offset: int,
                 path: str) -> None:
        self.store, self.tracker, self.path = store, tracker, path
        self.round_idx, self.role, self.step_offset = round_idx, role, step_offset

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        final = "train_runtime" in values  # TRL's end-of-training totals, logged at the last step's number
        self.store.append(self.path, {"round": self.round_idx, "role": self.role, "step": state.global_step,
                                      **({"final": True} if final else {}), **values})
        if self.tracker is not None:
            self.tracker.log({f"train/{self.role}/{k}": v for k, v in values.items()},
                             step=self.step_offset + state.global_step)


class StepProgress(TrainerCallback):
    """The training progress of one role: a bar (or log lines without a terminal) over the optimizer steps, with
    the step's loss, mean reward of the samples and fraction of masked pairs beside it. It replaces TRL's own
    bar, which prints every step's whole log dict."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.desc, self.enabled = desc, enabled
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = open_progress(state.max_steps, self.enabled, self.desc, unit="step")

    def on_log(self, args, state, control, logs=None, **kwargs):  # every step (logging_steps=1)
        logs = logs or {}
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", reward=f"{logs.get('objective/scores', math.nan):.3f}",
                                 masked=f"{1 - logs.get('pairs/kept', 1.0):.0%}")
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def optimizer(cfg: TrainingConfig, model: torch.nn.Module, cuda: bool) -> str:
    """The Trainer's ``optim`` for ``training.optimizer``: ``auto`` is bitsandbytes' paged 8-bit AdamW on a GPU
    when the base is 4-bit (the QLoRA recipe: Dettmers et al. 2023, section 3, paged optimizers) or fully
    fine-tuned (Adam's two moments in 8 bit: 2 bytes a parameter instead of 8), else torch's AdamW.

    Raises:
        ExpertChatError: ``paged_adamw_8bit`` without a GPU or without bitsandbytes.
    """
    name = cfg.optimizer
    if name == "auto":
        tight = cuda and (is_quantized(model) or cfg.method == "full")
        name = "paged_adamw_8bit" if tight and importlib.util.find_spec("bitsandbytes") else "adamw_torch"
    if name == "paged_adamw_8bit":
        if not cuda:
            raise ExpertChatError("training.optimizer=paged_adamw_8bit needs a CUDA GPU: use adamw_torch or auto")
        require("bitsandbytes", "gpu", "training.optimizer=paged_adamw_8bit")
    return name


def _checkpointing(cfg: TrainingConfig) -> dict[str, Any]:
    """Gradient checkpointing without re-entrancy, under both of transformers' names (``activation_*`` since 5.23;
    TRL's default is True, so both are set: no warning), or the older names alone on an older transformers (the
    GPU check's preinstalled 5.17)."""
    kwargs = {"use_reentrant": False} if cfg.gradient_checkpointing else None
    if "activation_checkpointing" not in {f.name for f in dataclasses.fields(OnlineDPOConfig)}:
        return {"gradient_checkpointing": cfg.gradient_checkpointing, "gradient_checkpointing_kwargs": kwargs}
    on = cfg.gradient_checkpointing
    return {"activation_checkpointing": on, "gradient_checkpointing": on, "activation_checkpointing_kwargs": kwargs}


def online_dpo_args(cfg: TrainingConfig, output_dir: str, budget: int, seed: int, model: torch.nn.Module,
                    amp: torch.dtype | None = None) -> OnlineDPOConfig:
    """TRL's arguments for one role's training: ``training.*``, prompts of at most ``budget`` tokens, no
    checkpoints (``output_dir`` is scratch), logs every step, mixed precision only on a GPU (``amp``: the
    autocast dtype, default the model's: fp16 on a V100, TRL's ``fp16=True, bf16=False``), gradient
    checkpointing without re-entrancy (``use_reentrant=False``: the variant PyTorch recommends, which works with
    frozen inputs under LoRA), the optimizer of :func:`optimizer`."""
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
        temperature=cfg.temperature, top_p=cfg.top_p, **_checkpointing(cfg), optim=optimizer(cfg, model, cuda),
        bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not cuda, seed=seed,
        disable_tqdm=True, dataloader_num_workers=0,  # StepProgress shows the steps
    )
