"""The training stage: online DPO for each dialogue model, rewarded by its partner as judge.

For model M in round r, every turn M spoke in the round's dialogues gives one prompt: M's view of the
dialogue before that turn, as chat messages (persona as system message), cut from the left to fit. TRL's
``OnlineDPOTrainer`` samples 2 completions per prompt from M's policy; the partner, frozen as it was at the
start of the round, scores them through the reward callable the pipeline builds (``reward_for(judge)``, any
``f(prompts, completions, **kwargs) -> list[float | None]``); the higher-scored completion is "chosen".

Decisions (see also the TRL notes in DESIGN.md):

* **Ties carry no preference.** TRL makes the first sample "chosen" whenever ``r1 >= r2`` and scores ``None``
  as 0. :class:`expertchat.stages.dpo.PairedReward` marks a pair as masked when ``|r1 - r2| <= training.tie_tolerance``
  (default 0.01 on a reward in [-1, 1]: below the resolution of a bf16 judge's expected score) or when either
  sample has no finite reward; :class:`expertchat.stages.dpo.MaskedOnlineDPOTrainer` zeroes the gradient of masked
  pairs and skips the optimizer step when a whole batch is masked, so a batch of ties changes nothing. Both
  are counted in the train metrics (``pairs/*``, ``skipped_steps``).
* **Reference and judge = the round-start policies**, one base with an adapter per role, reached through
  views: see :mod:`expertchat.policies.adapters` (:class:`~expertchat.policies.adapters.Policies`).
* ``training.steps=0`` is valid: the stage logs that it trains nothing and records ``skipped``.
* ``gradient_checkpointing`` is off by default: TRL turns the KV cache off while sampling when it is on.

TRL is reached through :mod:`expertchat.stages.dpo` only, imported when a model trains (importing TRL takes seconds).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

from expertchat.config.schema import DialogueConfig
from expertchat.engine.models import LoadedModel, base_name, chat_messages, is_quantized
from expertchat.errors import ExpertChatError, first_line
from expertchat.judging.rewards import RewardFactory
from expertchat.policies.adapters import Policies, partner, quiet
from expertchat.report.timing import Split
from expertchat.report.tracking import Tracker
from expertchat.runs.store import RunStore
from expertchat.stages.dialogue import ROLES, Dialogue, context, load_dialogues

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from expertchat.stages.context import Run
    from expertchat.stages.dpo import MaskedOnlineDPOTrainer, PairedReward

log = logging.getLogger(__name__)

TRAIN_METRICS_FILE = "train_metrics.jsonl"
REWARDS_FILE = "rewards_by_round.json"



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


# ----------------------------------------------------------------------------------------------- the stage


def train_round(policies: Policies, round_idx: int, dialogues: list[Dialogue], reward_for: RewardFactory,
                dialogue_cfg: DialogueConfig, store: RunStore, tracker: Tracker | None = None, *,
                seed: int = 0, progress: bool = False, about: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train each model of the round (actor, then judge unless ``bidirectional=false``) for
    ``training.steps`` online DPO steps on the round's dialogue contexts, the partner (as it was at the
    start of the stage) judging; save each policy to ``adapters/round_<r>/<role>/``, with a model card that
    also gives ``about``'s facts (e.g. ``{"reward": "zeta 0.4, ..."}``).

    Returns the stage summary: per role prompts, steps, seconds, pair counts, mean rewards; ``timing``: each
    role's sampling (``generation``), the partner's judging of its samples (``judging`` of the partner) and the
    rest of its steps (``training``: forwards, backward, optimizer), as a :class:`~expertchat.report.timing.Split`.

    Raises:
        ExpertChatError: the judge failed mid-training, or training failed; nothing of this round is marked
            done, and files of earlier stages are untouched.
    """
    cfg = policies.cfg
    summary: dict[str, Any] = {
        "method": cfg.method, "reference": cfg.reference, "tie_tolerance": cfg.tie_tolerance,
        # nothing is ever merged into a base (the reference is a frozen adapter copy), so a 4-bit base is exact
        "quantized_base": sorted({role for role, lm in policies.base.items() if is_quantized(lm.model)}),
        "merged_into_base": False, "roles": {}}
    if cfg.steps == 0:
        log.info("round %d training: training.steps=0, no model is trained (dialogue and rating only)",
                 round_idx)
        return {**summary, "skipped": "training.steps=0"}
    roles = list(ROLES) if cfg.bidirectional else ["actor"]
    split = Split()
    with policies.round_start():
        for role in roles:
            summary["roles"][role] = _train_one(policies, round_idx, role, dialogues, reward_for, dialogue_cfg,
                                                store, tracker, seed=seed, progress=progress, about=about or {},
                                                split=split)
    summary["timing"] = split.to_json()
    if tracker is not None:
        tracker.log({f"rounds/{role}_reward_mean": s["reward_mean"] for role, s in summary["roles"].items()
                     if s.get("reward_mean") is not None}, step=round_idx)
    return summary


def _train_one(policies: Policies, round_idx: int, role: str, dialogues: list[Dialogue],
               reward_for: RewardFactory, dialogue_cfg: DialogueConfig, store: RunStore, tracker: Tracker | None,
               *, seed: int, progress: bool, about: dict[str, Any], split: Split) -> dict[str, Any]:
    """Train ``role`` for one round and save its policy; returns its part of the stage summary. Its seconds go
    to ``split``."""
    cfg = policies.cfg
    lm = policies.base[role]
    budget = min(cfg.max_prompt_tokens, lm.cfg.max_length - cfg.max_new_tokens)
    if budget <= 0:
        raise ExpertChatError(f"{role}.max_length ({lm.cfg.max_length}) must exceed training.max_new_tokens "
                              f"({cfg.max_new_tokens})")
    rows = build_prompts(dialogues, role, lm, dialogue_cfg, budget)
    if not rows:
        log.warning("round %d training: %s spoke no turn in this round's dialogues; not trained", round_idx, role)
        return {"skipped": "no turns of this model in the round's dialogues"}
    seed = seed + 1000 * round_idx + ROLES.index(role)
    # The Trainer's output_dir (nothing is saved there), inside the run folder: a killed run's is removed by the
    # next run into the folder (RunStore.clean_leftovers), never left in the system's temp dir.
    scratch = tempfile.mkdtemp(prefix=f"{role}-", dir=store.scratch())
    try:
        trainer, reward = _make_trainer(policies, round_idx, role, rows, reward_for, store, tracker,
                                        output_dir=scratch, budget=budget, seed=seed, progress=progress)
        seconds, steps = _run_trainer(policies, trainer, round_idx, role)
        t = trainer.timing
        split.add("generation", role, t["generation_seconds"], tokens=t["generated_tokens"])
        split.add("judging", partner(role), reward.seconds, ratings=reward.rated)
        split.add("training", role, max(0.0, seconds - t["generation_seconds"] - reward.seconds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):  # the scratch folder itself, once empty
            os.rmdir(os.path.dirname(scratch))
    # The trainer, its optimizer and TRL's buffers sit in reference cycles: free them now, not at some later
    # collection, so that the next stage (or the partner's training) gets the memory back (GPU memory too).
    del trainer
    _release_memory()
    policies.mark_trained(role)
    result = {"prompts": len(rows), "steps": steps, "seconds": round(seconds, 2),
              "seconds_per_step": round(seconds / max(steps, 1), 2),
              "reference_seconds": round(t["reference_seconds"], 3), **reward.summary(),
              "judge": policies.describe(partner(role), "judge"), "reference": policies.describe(role, "reference")}
    card = {"role": role, "round": round_idx, "judge": f"{policies.base[partner(role)].name}: {result['judge']}",
            "reference": result["reference"], "reward": about.get("reward", "?"), "steps": steps,
            "learning rate": cfg.learning_rate, "beta": cfg.beta, "loss": cfg.loss_type,
            "LoRA": f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, {list(cfg.lora.target_modules)}",
            "mean reward of the samples (first batch -> last)": f"{result['reward_first_batch']} -> "
                                                               f"{result['reward_last_batch']}",
            "pairs masked (ties, unscored)": result["masked_fraction"]}
    result["saved"] = policies.save(store, round_idx, role, model_card(base_name(lm.cfg), card))
    return result


def _make_trainer(policies: Policies, round_idx: int, role: str, rows: list[dict[str, Any]],
                  reward_for: RewardFactory, store: RunStore, tracker: Tracker | None, *, output_dir: str,
                  budget: int, seed: int, progress: bool) -> tuple[MaskedOnlineDPOTrainer, PairedReward]:
    """The trainer for ``role`` on ``rows``, judged by its partner's frozen view, and the reward it calls.

    Raises:
        ExpertChatError: the judge or the trainer could not be set up (TRL / PEFT errors as one line).
    """
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    cfg, lm = policies.cfg, policies.base[role]
    judge = policies.frozen(partner(role))
    try:
        from expertchat.stages import dpo  # imports TRL (seconds): only when a model trains

        reward = dpo.PairedReward(reward_for(judge), cfg.tie_tolerance, judge=f"{judge.name} as {partner(role)}")
        torch.manual_seed(seed)  # a new adapter's initialisation
        model, ref = policies.policy(role)
        trainer = dpo.MaskedOnlineDPOTrainer(
            model=model, ref_model=ref, paired_reward=reward,
            args=dpo.online_dpo_args(cfg, output_dir, budget, seed, model, amp=policies.amp(role)),
            train_dataset=Dataset.from_list(rows), processing_class=lm.tokenizer,
            callbacks=[dpo.MetricsCallback(store, tracker, round_idx, role, step_offset=round_idx * cfg.steps,
                                           path=TRAIN_METRICS_FILE),
                       dpo.StepProgress(f"round {round_idx} training {role}", progress)],
        )
    except ExpertChatError:
        raise
    except Exception as exc:  # noqa: BLE001 - TRL / PEFT set-up errors as one line
        first = first_line(exc, 200)
        raise ExpertChatError(f"training round {round_idx} ({role}) could not start: {type(exc).__name__}: "
                              f"{first}") from exc
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; ours go to the tracker
    log.info("round %d training %s: %d prompts, %d steps x %d prompts x 2 samples; judge: %s; reference: %s",
             round_idx, role, len(rows), cfg.steps, cfg.batch_size * cfg.gradient_accumulation_steps,
             policies.describe(partner(role), "judge"), policies.describe(role, "reference"))
    return trainer, reward


def _run_trainer(policies: Policies, trainer: MaskedOnlineDPOTrainer, round_idx: int,
                 role: str) -> tuple[float, int]:
    """Run ``trainer``; returns (seconds, optimizer steps taken). The base goes back to inference either way.

    Raises:
        ExpertChatError: the judge or training failed, naming the round, the role and the step.
    """
    steps = policies.cfg.steps
    start = time.perf_counter()
    try:
        with quiet():
            trainer.train()
    except ExpertChatError as exc:
        raise ExpertChatError(f"training round {round_idx} ({role}) stopped at step "
                              f"{trainer.state.global_step + 1}/{steps}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - report one line; HYDRA_FULL_ERROR=1 shows the traceback
        first = first_line(exc, 200)
        raise ExpertChatError(f"training round {round_idx} ({role}) failed at step "
                              f"{trainer.state.global_step + 1}/{steps}: {type(exc).__name__}: {first}") from exc
    finally:
        policies.after_training(role, trainer.ref_model)
    return time.perf_counter() - start, trainer.state.global_step


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


def model_card(base: str, facts: dict[str, Any]) -> str:
    """A model card for a saved policy: what it is, how to load it, and ``facts`` (what trained it) as a table."""
    rows = "\n".join(f"| {key} | {value} |" for key, value in facts.items())
    return (f"---\nbase_model: {base}\nlibrary_name: peft\ntags: [expertchat, online-dpo, self-play]\n---\n\n"
            f"# ExpertChat policy: {facts.get('role', '?')} after round {facts.get('round', '?')}\n\n"
            f"A LoRA adapter on `{base}`, trained by ExpertChat's bidirectional online DPO: the model held expert "
            f"dialogues with a partner, and the partner, frozen at the round's start, judged its samples.\n\n"
            f"```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
            f"policy = PeftModel.from_pretrained(base, \"<this folder>\")\n```\n\n"
            f"| what | value |\n|---|---|\n{rows}\n")


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


def stage(run: Run, r: int) -> dict[str, Any]:
    """The training stage of round ``r``: online DPO of each model, its partner (frozen at round start) judging
    -> ``adapters/round_<r>/<role>/``."""
    cfg = run.cfg
    reward_for = run.reward_for() if cfg.training.steps > 0 else None
    about = {"reward": f"(1 - zeta) (score - 5) / 5 + zeta cos(turn, WIM), zeta {cfg.reward.zeta}, judging "
                       f"{', '.join(f'{n} {c.signal}' for n, c in cfg.judging.active().items())}"}
    return train_round(run.policies, r, load_dialogues(run.store, r), reward_for, cfg.dialogue, run.store,
                       run.tracker, seed=cfg.seed, progress=cfg.progress, about=about)
