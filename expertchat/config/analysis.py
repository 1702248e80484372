"""The analysis modes' settings: ``mode=analyze`` (the interaction of a run folder) and ``mode=league`` (cross-play
of a trained run's checkpoints). Part of the schema (:mod:`expertchat.config.schema`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from expertchat.errors import check


@dataclass
class AnalysisConfig:
    """``mode=analyze``: measure what the two speakers did to each other (``expertchat/stages/interaction.py``) in
    an existing run folder, without any model of the run (the reward's embedder only)."""

    run: Optional[str] = None  # the run folder to measure (None: run_dir); interaction.jsonl and markers go there


@dataclass
class LeagueConfig:
    """``mode=league``: cross-play after training (``expertchat/modes/league.py``): every actor checkpoint (base,
    round 0..R-1) holds short dialogues with every judge checkpoint on the run's held-out topics; the frozen judge
    rates the actor's turns; Bradley-Terry ratings of the actor checkpoints with bootstrap CIs."""

    run: Optional[str] = None  # the run folder (None: run_dir); league/ and league.json are written there
    topics: int = 4  # held-out topics (the first of eval_prompts.json), one dialogue each per pairing
    turns: int = 4  # turns per league dialogue (>= 3: the actor answers the judge at least once)
    bootstrap: int = 1000  # resamples (over topics) of the rating CIs

    def __post_init__(self) -> None:
        check(self.topics > 0, "league.topics", "must be > 0")
        check(self.turns >= 3, "league.turns", "must be >= 3: the actor speaks first and only its answers to the "
              "judge checkpoint (turn 2 on) depend on it")
        check(self.bootstrap >= 0, "league.bootstrap", "must be >= 0")
