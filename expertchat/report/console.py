"""What the user sees: the run's key choices at start, progress of the long stages, one summary block at the end.

:func:`progress_bar` is a tqdm bar where stderr is a terminal, and plain log lines (at most ``lines`` per bar,
with the rate) where it is not, e.g. in a Slurm job's log file, where a redrawn bar would be thousands of
carriage returns.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from expertchat.report import timing
from expertchat.stats import fmt

log = logging.getLogger("expertchat")


class _LogProgress:
    """A progress counter that logs ``desc: n/total unit (rate/s, ETA)`` every ``total / lines`` units, and at an
    update at least ``every_s`` seconds after its last line (a long stage in a Slurm log shows it is alive)."""

    def __init__(self, total: int, desc: str, unit: str, lines: int, every_s: float = 300.0) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self.every = max(1, -(-total // max(lines, 1)))
        self.next_at = self.every
        self.start = self.last = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n >= self.next_at or self.n >= self.total or now - self.last >= self.every_s:
            rate = self.n / max(now - self.start, 1e-9)
            eta = f", {(self.total - self.n) / rate:.0f} s left" if 0 < self.n < self.total else ""
            log.info("%s: %d/%d %ss (%.2f/s%s)%s", self.desc, self.n, self.total, self.unit, rate, eta,
                     f"; {self.postfix}" if self.postfix else "")
            self.last = now
            while self.next_at <= self.n:
                self.next_at += self.every

    def set_postfix(self, **values: object) -> None:
        """Figures shown beside the count (e.g. loss, reward): appended to the next logged line."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


class _NoProgress:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: object) -> None:
        pass

    def close(self) -> None:
        pass


def open_progress(total: int, enabled: bool, desc: str, unit: str = "it", lines: int = 10) -> Any:
    """A progress counter with ``update(n)``, ``set_postfix(**values)`` and ``close()``: a tqdm bar where stderr
    is a terminal; where it is not (a Slurm log), a log line every ``total / lines`` units and at an update at
    least 5 minutes after the last line; nothing when not ``enabled`` or ``total <= 0``.

    Args:
        total: units of work expected.
        enabled: False (``progress=false``) shows nothing.
        desc: what is counted, e.g. ``"round 0 dialogues"``.
        unit: the unit's name, e.g. ``"turn"``.
        lines: without a terminal, the most log lines one counter writes.
    """
    if not enabled or total <= 0:
        return _NoProgress()
    if not sys.stderr.isatty():
        return _LogProgress(total, desc, unit, lines)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, desc: str, unit: str = "it", lines: int = 10) -> Iterator[Any]:
    """:func:`open_progress` as a context manager that closes the counter on exit."""
    bar = open_progress(total, enabled, desc, unit, lines)
    try:
        yield bar
    finally:
        bar.close()


def quiet_libraries(progress: bool) -> None:
    """Libraries' own progress bars (transformers' "Loading weights", datasets' "Map") only where ours show too:
    with ``progress=false`` or without a terminal they are noise in a log file."""
    if progress and sys.stderr.isatty():
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a core dependency
        pass


def config_lines(cfg: Any, choices: dict[str, str]) -> list[str]:
    """The run's key choices, a short tree (``choices``: Hydra's group -> option, empty outside Hydra)."""
    def pick(group: str, default: str = "") -> str:
        return str(choices.get(group) or default)

    j, r, t = cfg.judging, cfg.reward, cfg.training
    signals = ", ".join(f"{name} {c.signal}" for name, c in j.rubric.items() if c.weight > 0)
    head = f"ExpertChat mode={cfg.mode} in {cfg.run_dir}" + (
        f" (+experiment={pick('experiment')})" if pick("experiment") else "")
    judging = f"  judging     {pick('judging', 'custom')}: {signals}; mode {j.mode}"
    reward = f"  reward      {pick('reward', 'custom')}: zeta {r.zeta}, embedder {r.embedder.name}"
    if cfg.mode == "rate":
        return [head, f"  judge       {cfg.judge.name}, input {cfg.rate.input}", judging, reward,
                f"  tracker     {cfg.tracker.backend}"]
    g = cfg.generation
    decoding = (f"T {g.temperature}, top-p {g.top_p}, top-k {g.top_k}" if g.strategy == "sample"
                else f"k {g.top_k}, alpha {g.penalty_alpha}")
    trained = "both models" if t.bidirectional else "the actor only"
    return [
        head + f": {cfg.rounds} round{'s' * (cfg.rounds != 1)}, seed {cfg.seed}",
        f"  models      actor {cfg.actor.name}, judge {cfg.judge.name}",
        f"  dialogue    {cfg.topics.n} dialogues x {cfg.dialogue.turns} turns per round, topics={pick('topics')}, "
        f"generation={pick('generation', g.strategy)} ({g.strategy}: {decoding}, {g.max_new_tokens} new tokens)",
        judging, reward,
        f"  training    {pick('training', 'online_dpo')}: {t.steps} steps per model per round ({trained}), "
        f"lr {t.learning_rate}, beta {t.beta}, {t.method}" + (f" r={t.lora.r}" if t.method == "lora" else ""),
        f"  tracker     {cfg.tracker.backend}",
    ]


def summary_lines(run_dir: Any, rounds: int, summary: dict[str, Any], seconds: float | None) -> list[str]:
    """The block a run ends on: what ran, the last round's headline figures and timing split (its stages' summed
    :mod:`~expertchat.report.timing`), where the results are."""
    root = str(run_dir)
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    out = [f"Done: {rounds} round{'s' * (rounds != 1)}{took}. Round {rounds - 1}:"]
    d = summary.get("dialogue") or {}
    if d:
        out.append(f"  dialogue    {d.get('turns')} turns, {d.get('tok_per_s')} tok/s, "
                   f"{d.get('cut_at_max_new_tokens')} cut at max_new_tokens")
    rated = (summary.get("rating") or {}).get("models", {})
    if rated:
        out.append("  rating      " + "; ".join(
            f"{role} score {fmt(m['score_mean'], 2)} reward {fmt(m['reward_mean'])} (by {m['rater']})"
            for role, m in rated.items()))
    speakers = (summary.get("interaction") or {}).get("speakers", {})
    if speakers:
        out.append("  interaction " + "; ".join(
            f"{role} echo {fmt(m.get('echo'), 2)}, agrees {fmt(m.get('agreement'), 2)}, topic adherence "
            f"{fmt(m.get('adherence'), 2)} (drift {fmt(m.get('drift'), 2)})" for role, m in speakers.items()))
    roles = (summary.get("training") or {}).get("roles", {})
    trained = {role: m for role, m in roles.items() if "steps" in m}
    if trained:
        out.append("  training    " + "; ".join(
            f"{role} reward {fmt(m['reward_first_batch'])} -> {fmt(m['reward_last_batch'])} over {m['steps']} steps"
            for role, m in trained.items()))
    evaluated = (summary.get("evaluation") or {}).get("models", {})
    if evaluated:
        out.append("  evaluation  " + "; ".join(
            f"{role} held-out reward {fmt(m['reward_mean'])}, vs base {fmt((m['delta_vs_base'] or {}).get('mean'))} "
            f"(win-rate {fmt(m['win_rate'], 2)})" for role, m in evaluated.items()))
    pairwise = (summary.get("evaluation") or {}).get("pairwise") or {}
    if pairwise:
        out.append("  pairwise    " + "; ".join(
            f"{role} vs base: preference {fmt(p.get('preference'), 2)}, length-controlled {fmt(p['lc_win_rate'], 2)}, "
            f"position-consistent {fmt(p['consistency']['value'], 2)}" for role, p in pairwise.items()))
    audit = (summary.get("evaluation") or {}).get("audit") or {}
    flat = sorted({n for f in (audit.get("flat") or {}).values() for n, x in f.items() if x["flat"]})
    if audit:
        out.append(f"  judge audit self-preference {fmt(audit['self_preference']['index'], 2)}, mutual rho "
                   f"{fmt(audit['agreement']['mutual']['rho'], 2)}, flat categories: {', '.join(flat) or 'none'} "
                   f"(report.md: Judge audit)")
    timings = [s["timing"] for name, s in summary.items()
               if name != "base" and isinstance(s, dict) and isinstance(s.get("timing"), dict)]
    if timings:
        out.append("  timing      " + timing.summary_line(timing.merge(timings)))
    out.append(f"  run folder  {root} (report.md, turns.jsonl, ratings.jsonl, interaction.jsonl, train_metrics.jsonl, "
               f"rewards_by_round.json, eval.jsonl, pairwise.jsonl, audit.jsonl, expertchat.log)")
    if trained:
        out.append(f"  adapters    {root}/adapters/round_{rounds - 1}/{{{','.join(trained)}}}")
    return out
