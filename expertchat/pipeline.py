"""The ExpertChat loop, top to bottom: topics -> (dialogue -> rating -> training) x rounds.

Every stage writes into the run folder and marks itself done; rerunning into the same folder continues from
the last completed stage.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

from expertchat import dialogue, judging, tracking, training
from expertchat.config import ExpertChatConfig
from expertchat.models import load_pair
from expertchat.store import RunStore
from expertchat.topics import load_topics

log = logging.getLogger(__name__)


def run(cfg: ExpertChatConfig) -> dict[str, Any]:
    """Run the experiment described by ``cfg`` in ``cfg.run_dir``; return the last round's summaries.

    One tracker per job (``tracker=none|wandb``), finished in every case; a failed job marks its run failed.
    ``mode=rate`` rates a JSONL file of (question, answer) records instead (``expertchat/rate.py``).
    """
    if cfg.mode == "rate":
        from expertchat import rate

        return rate.run(cfg)
    tracker = tracking.make_tracker(cfg.tracker, cfg.run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    try:
        summary = _run(cfg, tracker)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return summary


def _run(cfg: ExpertChatConfig, tracker: tracking.Tracker) -> dict[str, Any]:
    store = RunStore(cfg.run_dir)
    n = cfg.topics.n
    topics = None  # chosen once and kept in topics.json, so a resumed run holds the same dialogues
    if not store.path("topics.json").exists() and cfg.topics.source != "generated":
        topics = load_topics(cfg.topics, n * cfg.rounds, seed=cfg.seed)  # bad input fails before any write
    actor, judge = load_pair(cfg.actor, cfg.judge)
    models = {"actor": actor, "judge": judge}
    if not store.path("config.yaml").exists():
        store.write_text("config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if not store.path("topics.json").exists():
        topics = topics or load_topics(cfg.topics, n * cfg.rounds, model=actor, generation=cfg.generation,
                                       seed=cfg.seed)
        store.write_json("topics.json", topics)
    topics = store.read_json("topics.json")
    if len(topics) < n * cfg.rounds:  # resumed with more rounds (or dialogues): keep the topics used, add new ones
        more = load_topics(cfg.topics, n * cfg.rounds, model=actor, generation=cfg.generation, seed=cfg.seed)
        topics += more[len(topics):]
        store.write_json("topics.json", topics)
        log.info("topics.json extended to %d topics for %d rounds x %d dialogues", len(topics), cfg.rounds, n)
    # Each role's policy: a LoRA adapter per role (one base + two adapters when both roles share the weights).
    # From here on every stage sees the models through these views; a resumed run reloads the last adapters.
    policies = training.Policies(models, cfg.training)
    policies.restore(store, cfg.rounds)
    models = policies.models
    reward_for = None  # the partner-as-judge reward factory, built once when a training stage first needs it

    summary: dict[str, Any] = {}
    for r in range(cfg.rounds):
        if not store.done(r, "dialogue"):
            store.begin(r, "dialogue", [dialogue.TURNS_FILE])
            dialogues = dialogue.run_dialogues(models, topics[r * n:(r + 1) * n], cfg.dialogue, cfg.generation,
                                               store, round_idx=r, seed=cfg.seed, progress=cfg.progress)
            store.finish(r, "dialogue", dialogue.summarize(dialogues))
        summary["dialogue"] = store.stage_summary(r, "dialogue")
        log.info("round %d dialogue: %s", r, summary["dialogue"])

        if not store.done(r, "rating"):  # each model rates every turn of the other -> ratings.jsonl
            store.begin(r, "rating", [judging.RATINGS_FILE])
            rated = judging.run_rating(models, dialogue.load_dialogues(store, r), cfg.dialogue, cfg.judging,
                                       cfg.reward, store, round_idx=r, progress=cfg.progress)
            store.finish(r, "rating", rated)
            tracker.log({f"rating/{role}_{k}": s[k] for role, s in rated["models"].items()
                         for k in ("score_mean", "reward_mean") if s[k] is not None}, step=r)
        summary["rating"] = store.stage_summary(r, "rating")
        for role, s in summary["rating"]["models"].items():
            log.info("round %d rating of %s by %s: score %s, reward %s (%d/%d scored)", r, role, s["rater"],
                     s["score_mean"], s["reward_mean"], s["scored"], s["rated"])

        if not store.done(r, "training"):
            store.begin(r, "training", [training.TRAIN_METRICS_FILE])
            if reward_for is None and cfg.training.steps > 0:
                from expertchat.rewards import reward_for as make_reward_for

                reward_for = make_reward_for(cfg.judging, cfg.reward)
            result = policies.train_round(r, dialogue.load_dialogues(store, r), reward_for, cfg.dialogue, store,
                                          tracker, seed=cfg.seed, progress=cfg.progress)
            store.finish(r, "training", result)
            training.write_rewards_by_round(store, cfg.rounds)
        summary["training"] = store.stage_summary(r, "training")
        log.info("round %d training: %s", r, {role: {k: s.get(k) for k in ("steps", "reward_mean", "masked_fraction")}
                                              for role, s in summary["training"].get("roles", {}).items()})
    return summary
