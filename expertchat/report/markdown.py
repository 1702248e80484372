"""``report.md`` and its plots for a run folder; ``python -m expertchat.report PATH`` (re)builds them.

    python -m expertchat.report outputs/2026-11-30/19-15-53     # a run folder -> report.md, plots/*.png
    python -m expertchat.report multirun/2026-11-30/20-00-00    # a sweep folder -> sweep.md, sweep.png (sweep.py)

The report says what was run (the command from Hydra's record, the key choices of the recorded config), what the
folder holds and what it lacks, the dialogue statistics, the best and worst rated dialogues, the ratings per round
and model, the training curves, and the held-out evaluation with its 95% CIs (contract A files; "no evaluation in
this run" when there are none). The hacking guards (answer length, distinct-2, cut and copied fractions) stand
beside the reward in every table. Nothing is estimated for what is missing: a cell without a number says ``n/a``.
Every run ends with :func:`after_run` (``modes.run``): the report is written and, with a tracker, its tables,
plots and the evaluation summary go to the tracked run; a failure there is one warning line, never a failed run.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertchat.errors import ExpertChatError
from expertchat.report import audit, interaction, plots, timing
from expertchat.runs.reader import RunData, ci, get, groups, load, mean, table, turn_guards
from expertchat.stats import fmt

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.report.tracking import Tracker

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
_KEYS = ("mode", "rounds", "seed", "actor.name", "judge.name", "topics.n", "dialogue.turns", "generation.strategy",
         "generation.temperature", "generation.max_new_tokens", "judging.mode", "reward.zeta", "training.steps",
         "training.batch_size", "training.learning_rate", "training.beta", "training.method", "training.reference",
         "training.bidirectional", "evaluation", "tracker.backend")
_RATE_KEYS = ("mode", "seed", "judge.name", "rate", "judging.mode", "reward.zeta", "tracker.backend")


# ------------------------------------------------------------------------------------------------ the sections


def header_section(data: RunData) -> list[str]:
    state, how = data.state()
    found = [f"{name} ({len(rows)} rows)" for name, rows in (
        ("turns.jsonl", data.turns), ("ratings.jsonl", data.ratings), ("train_metrics.jsonl", data.train),
        ("eval.jsonl", data.eval_rows)) if rows]
    found += [f"{len(data.markers)} stage markers"] if data.markers else []
    found += [f"evaluation points: {', '.join(str(e.get('round')) for e in data.evals)}"] if data.evals else []
    found += ["rate_summary.json"] if data.rate_summary is not None else []
    out = [f"# ExpertChat report: {data.root.name}", "", f"Run folder `{data.root}`.", "",
           f"**State: {state}** ({how}).", "", "Found: " + ("; ".join(found) or "nothing to report") + "."]
    if data.missing():
        out += ["", "Missing: " + "; ".join(data.missing()) + "."]
    if data.bad_lines:
        out += ["", "Skipped lines that were not JSON (cut by a kill?): " +
                ", ".join(f"{k}: {n}" for k, n in data.bad_lines.items()) + "."]
    return out


def run_section(data: RunData) -> list[str]:
    out = ["", "## What was run", ""]
    if data.overrides is not None:
        out.append("`python -m expertchat " + " ".join(shlex.quote(o) for o in data.overrides) + "`")
    else:
        out.append("The command is not recorded (no `.hydra/overrides.yaml`).")
    if data.sweep is not None:
        out += ["", f"Job {data.sweep['job']} of the multirun in `{data.sweep['dir']}` (its table: "
                    f"`python -m expertchat.report {data.sweep['dir']}`)."]
    if data.choices:
        out += ["", "Config groups: " + ", ".join(f"{k}={v}" for k, v in sorted(data.choices.items())) + "."]
    if data.config is None:
        return out + ["", "No recorded config (`config.yaml`)."]
    rows = []
    for key in _RATE_KEYS if data.mode == "rate" else _KEYS:  # a group of keys (evaluation, rate) as its leaves
        value = get(data.config, key)
        leaves = value.items() if isinstance(value, dict) else [("", value)]
        rows += [[f"{key}.{k}" if k else key, v] for k, v in leaves if v is not None and not isinstance(v, dict)]
    rubric = get(data.config, "judging.rubric") or {}
    if isinstance(rubric, dict):
        rows.append(["judging.rubric", ", ".join(f"{n} ({c.get('signal')}, weight {c.get('weight')})"
                                                 for n, c in rubric.items() if isinstance(c, dict))])
    return out + [""] + table(["key", "value"], rows)


def dialogue_section(data: RunData) -> list[str]:
    if not data.turns:
        return []
    guards = turn_guards(data.turns)
    rows = []
    for (rnd, role), ts in groups(data.turns, "round", "role").items():
        g = [guards[(str(t.get("dialogue_id")), t.get("turn", 0))] for t in ts]
        marker = data.markers.get((rnd, "dialogue"), {})
        rows.append([rnd, role, len({t.get("dialogue_id") for t in ts}), len(ts),
                     fmt(mean([x["tokens"] for x in g]), 1),
                     fmt(mean([x["distinct_2"] for x in g])), fmt(mean([x["cut"] for x in g]), 2),
                     fmt(mean([x["copied_fraction"] for x in g]), 2),
                     sum(not str(t.get("text", "")).strip() for t in ts), fmt(marker.get("tok_per_s"), 1)])
    return ["", "## Dialogues", ""] + table(
        ["round", "speaker", "dialogues", "turns", "tokens", "distinct-2", "cut", "copied", "empty", "tok/s"], rows)


def rating_section(data: RunData) -> list[str]:
    if data.rate_summary is not None:
        return _rate_summary_section(data.rate_summary)
    if not data.ratings:
        return []
    guards = turn_guards(data.turns)
    cats = list(dict.fromkeys(c for r in data.ratings for c in (r.get("categories") or {})))
    rows = []
    for (rnd, ratee), rs in groups(data.ratings, "round", "ratee").items():
        g = [guards.get((str(r.get("dialogue_id")), r.get("turn")), {}) for r in rs]
        rows.append([rnd, ratee, rs[0].get("rater", "n/a"), len(rs), sum(r.get("status") == "ok" for r in rs),
                     fmt(mean([r.get("score") for r in rs]), 2),
                     *[fmt(mean([get(r, f"categories.{c}.score") for r in rs]), 2) for c in cats],
                     fmt(mean([r.get("similarity") for r in rs])), fmt(mean([r.get("reward") for r in rs])),
                     *_guard_cells(g)])
    return ["", "## Ratings per round and model", "",
            "Each model's turns as its partner rated them (the judge of round r is the partner as it was in round "
            "r, so the scale moves between rounds; the held-out evaluation has a frozen judge).", ""] + table(
        ["round", "model", "rated by", "rated", "scored", "score", *cats, "similarity", "reward", "tokens",
         "distinct-2", "cut", "copied"], rows)


def _guard_cells(g: list[dict[str, Any]]) -> list[str]:
    return [fmt(mean([x.get("tokens") for x in g]), 1), fmt(mean([x.get("distinct_2") for x in g])),
            fmt(mean([x.get("cut") for x in g]), 2), fmt(mean([x.get("copied_fraction") for x in g]), 2)]


def _rate_summary_section(s: dict[str, Any]) -> list[str]:
    rows = [[name, m.get("n"), ci(m.get("mean"), m.get("ci95"))] for name, m in (
        *((f"category {n}", m) for n, m in (s.get("categories") or {}).items()),
        ("score (weighted)", s.get("score") or {}), ("similarity", s.get("similarity") or {}),
        ("reward", s.get("reward") or {}))]
    return ["", "## Ratings (mode=rate)", "",
            f"Rated {s.get('rated')} of {s.get('records')} records of `{s.get('input')}` with {s.get('judge')} "
            f"({s.get('bad_records')} bad, {s.get('skipped')} skipped; judge saw {s.get('judge_cut')} answers "
            f"cut). Means with 95% bootstrap CIs:", ""] + table(["what", "n", "mean [95% CI]"], rows)


def samples_section(data: RunData, width: int = 600) -> list[str]:
    """The best and worst rated dialogues (mean reward of their rated turns), each turn with its rating."""
    if not data.turns or not data.ratings:
        return []
    by_turn = {(str(r.get("dialogue_id")), r.get("turn")): r for r in data.ratings}
    scored = {d: mean([by_turn.get((d, t.get("turn")), {}).get("reward") for t in ts])
              for (d,), ts in groups(data.turns, "dialogue_id").items()}
    ranked = sorted((d for d, v in scored.items() if v is not None), key=lambda d: scored[d])
    if not ranked:
        return []
    out = ["", "## Sample dialogues", ""]
    for label, did in (("Best", ranked[-1]), ("Worst", ranked[0]))[:1 if len(ranked) == 1 else 2]:
        ts = sorted((t for t in data.turns if str(t.get("dialogue_id")) == did), key=lambda t: t.get("turn", 0))
        out += [f"### {label} rated: {did} (round {ts[0].get('round')}, mean reward {fmt(scored[did])})", "",
                f"Topic: {ts[0].get('topic')}", ""]
        for t in ts:
            r = by_turn.get((did, t.get("turn")))
            text = str(t.get("text", "")).strip().replace("\n", " ")
            text = text if len(text) <= width else text[:width] + " [...]"
            wim = str((r or {}).get("wim") or "").strip()[:200]
            rating = (f"reward {fmt(r.get('reward'))}, score {fmt(r.get('score'), 2)}, similarity "
                      f"{fmt(r.get('similarity'))}; " + (f"WIM: \"{wim}\"" if wim else "no WIM")) if r else "not rated"
            out += [f"- **{t.get('role')}** (turn {t.get('turn')}, {t.get('new_tokens')} tokens"
                    f"{', cut' if t.get('finished') is False else ''}): {text or '(empty)'}",
                    f"  - *{rating}*"]
        out.append("")
    return out


def training_section(data: RunData) -> list[str]:
    if not data.train:
        return []
    rows = []
    for (rnd, role), rs in groups(data.train, "round", "role").items():
        rs = sorted(rs, key=lambda r: r.get("step", 0))
        marker = get(data.markers.get((rnd, "training")), f"roles.{role}") or {}
        rows.append([rnd, role, rs[-1].get("step"), f"{fmt(rs[0].get('loss'), 4)} -> {fmt(rs[-1].get('loss'), 4)}",
                     f"{fmt(rs[0].get('objective/scores'))} -> {fmt(rs[-1].get('objective/scores'))}",
                     fmt(rs[-1].get("rewards/margins"), 4), fmt(rs[-1].get("objective/kl"), 4),
                     fmt(1 - (mean([r.get("pairs/kept") for r in rs]) or 1.0), 2),
                     fmt(marker.get("seconds_per_step"), 1)])
    return ["", "## Training (online DPO)", "",
            "Per round and model: the first and last step's DPO loss and the partner's mean reward of the sampled "
            "answers; the last step's reward margin and KL; the fraction of pairs masked as ties.", ""] + table(
        ["round", "model", "steps", "loss", "reward of samples", "margin", "KL", "masked", "s/step"], rows)


def evaluation_section(data: RunData) -> list[str]:
    if data.mode == "rate":
        return []
    out = ["", "## Held-out evaluation", ""]
    if not data.evals:
        more = f" (eval.jsonl holds {len(data.eval_rows)} answers but no summary)" if data.eval_rows else ""
        return out + [f"No evaluation in this run{more}."]
    e0 = data.evals[-1]
    out += [f"Frozen judge {e0.get('judge')}, {e0.get('prompts')} held-out prompts x {e0.get('samples')} "
            f"sample(s). Means with 95% bootstrap CIs; the change vs base is paired (same prompt and sample); "
            f"win/tie/loss against the base answer by reward.", ""]
    rows, cat_rows = [], []
    for e in data.evals:
        for role, m in (e.get("models") or {}).items():
            d = m.get("delta_vs_base") or {}
            rows.append([e.get("round"), role, m.get("n"), ci(m.get("reward_mean"), m.get("reward_ci")),
                         ci(d.get("mean"), d.get("ci")) if d else "base",
                         f"{m.get('win')}/{m.get('tie')}/{m.get('loss')}" if d else "", fmt(m.get("win_rate"), 2),
                         fmt(m.get("tokens_mean"), 1), fmt(m.get("length_ratio"), 2), fmt(m.get("distinct_2")),
                         fmt(m.get("distinct_2_ratio"), 2), fmt(m.get("cut_fraction"), 2),
                         fmt(m.get("copied_fraction"), 2)])
            cat_rows.append([e.get("round"), role, *[ci(s.get("mean"), s.get("ci"), 2)
                                                     for s in (m.get("scores") or {}).values()]])
    cats = list(next((m.get("scores") or {} for e in data.evals for m in (e.get("models") or {}).values()), {}))
    return out + table(["point", "model", "n", "reward [95% CI]", "change vs base [95% CI]", "W/T/L", "win rate",
                        "tokens", "length ratio", "distinct-2", "distinct-2 ratio", "cut", "copied"], rows) + [
        "", "Per-category scores (1-10, 95% CI):", ""] + table(["point", "model", *cats], cat_rows)


# --------------------------------------------------------------------------------------------- plots, report


def build(data: RunData, figures: dict[str, Path]) -> str:
    """The text of ``report.md`` for ``data`` with ``figures`` (paths inside the run folder) linked."""
    def fig(*names: str) -> list[str]:
        return [line for n in names if n in figures
                for line in ("", f"![{n}]({figures[n].relative_to(data.root).as_posix()})")]

    lines = header_section(data) + run_section(data) + evaluation_section(data) + fig("eval_reward", "eval_categories")
    lines += audit.pairwise_section(data) + audit.audit_section(data)
    lines += dialogue_section(data) + fig("length") + rating_section(data)
    lines += fig("rating_categories", "similarity_vs_score") + interaction.section(data, fig)
    lines += training_section(data) + fig("training")
    lines += timing.section({**data.markers, **{(e.get("round"), "evaluation"): e for e in data.evals}}, table)
    lines += samples_section(data)
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | Path, just_finished: bool = False) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``run_dir``; return the report's path. ``just_finished``: the
    run itself calls it as it ends (its state is done, whatever its status file says yet).

    Raises:
        ExpertChatError: ``run_dir`` is missing, or holds nothing to report (no records, markers, evaluation).
    """
    data = load(run_dir)
    data.just_finished = just_finished
    if data.empty():
        raise ExpertChatError(f"nothing to report in {data.root}: no turns.jsonl, ratings.jsonl, stage markers or "
                              f"evaluation (is it a run folder? a sweep folder has multirun.yaml)")
    path = data.root / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp{os.getpid()}")  # the run folder's temporary name (store.py)
    figures = plots.draw(data)
    for name, draw in (("interaction_turns", interaction.figure), ("league", interaction.league_figure)):
        drawn = draw(data, data.root / plots.PLOTS_DIR / f"{name}.png")
        if drawn is not None:
            figures[name] = drawn
    tmp.write_text(build(data, figures), encoding="utf-8")
    tmp.replace(path)
    return path


def after_run(run_dir: str | Path, tracker: Tracker | None = None, just_finished: bool = False) -> Path | None:
    """The end of every run (``modes.run``, ``just_finished``): :func:`write_report`, then the tables, plots and
    evaluation summary to ``tracker``. Never raises: a failure is one warning line (the run's own results are
    complete without the report); a folder with nothing to report gets no report."""
    try:
        if load(run_dir).empty():
            return None
        path = write_report(run_dir, just_finished=just_finished)
        log.debug("report: %s", path)  # the closing summary names report.md
    except Exception as exc:  # noqa: BLE001 - a report must not fail a finished run
        log.warning("the report of %s failed (%s: %s); rebuild it with python -m expertchat.report %s", run_dir,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", run_dir)
        return None
    if tracker is not None:
        try:
            track(tracker, load(run_dir), sorted((Path(run_dir) / plots.PLOTS_DIR).glob("*.png")))
        except Exception as exc:  # noqa: BLE001 - the run folder holds everything; only the tracked copy lacks it
            log.warning("the tracked run lacks the tables, plots and evaluation summary of %s (%s: %s); report.md "
                        "and plots/ are complete", run_dir, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
    return path


def track(tracker: Tracker, data: RunData, images: list[Path]) -> None:
    """To ``tracker``: a table of every turn with its rating (``tables/dialogues``; in ``mode=rate`` of every
    rated record, ``tables/ratings``), a table of the evaluation answers (``tables/evaluation``), the evaluation
    summary (``evaluation/<point>/<model>/<figure>``, CIs as ``_lo`` / ``_hi``) and the plots (``plots/<name>``)."""
    cats = list(dict.fromkeys(c for r in data.ratings for c in (r.get("categories") or {})))
    rated = {(str(r.get("dialogue_id")), r.get("turn")): r for r in data.ratings}
    guards = turn_guards(data.turns)
    rating_cols = ["rater", "score", *cats, "wim", "similarity", "reward", "status"]

    def rating_cells(r: dict[str, Any]) -> list[Any]:
        return [r.get("rater") or r.get("rater_model"), r.get("score"),
                *[get(r, f"categories.{c}.score") for c in cats], r.get("wim"), r.get("similarity"), r.get("reward"),
                r.get("status")]
    if data.turns:
        cols = ["round", "dialogue_id", "turn", "role", "model", "topic", "text", "tokens", "cut", "distinct_2",
                "copied_fraction"]
        rows = [[t.get(k) for k in cols[:7]] + [g[k] for k in ("tokens", "cut", "distinct_2", "copied_fraction")]
                + rating_cells(rated.get((str(t.get("dialogue_id")), t.get("turn")), {}))
                for t in data.turns for g in [guards[(str(t.get("dialogue_id")), t.get("turn", 0))]]]
        tracker.log_table("dialogues", cols + rating_cols, rows)
    if data.interaction:  # what the speakers did to each other, per turn (interaction.jsonl)
        cols = list(dict.fromkeys(k for r in data.interaction for k in r))
        tracker.log_table("interaction", cols, [[r.get(k) for k in cols] for r in data.interaction])
    if not data.turns and data.ratings:
        tracker.log_table("ratings", ["id", "answer_tokens", *rating_cols],
                          [[str(r.get("id")), r.get("answer_tokens"), *rating_cells(r)] for r in data.ratings])
    if data.eval_rows:
        ecats = list(dict.fromkeys(c for r in data.eval_rows for c in (r.get("scores") or {})))
        cols = ["round", "role", "model", "prompt_id", "sample", "prompt", "answer", "tokens", "cut",
                "copied_fraction", "distinct_1", "distinct_2", "score", "rating", "wim", "similarity", "reward"]
        tracker.log_table("evaluation", cols + ecats, [
            [str(r.get("round")), *[r.get(k) for k in cols[1:]], *[get(r, f"scores.{c}") for c in ecats]]
            for r in data.eval_rows])
    if data.evals:  # every point under evaluation/<round>/, the last one also under final/ (what dashboards compare)
        last = data.evals[-1]
        tracker.log_summary({"evaluation": {str(e.get("round")): {
            role: _flat_cis(m) for role, m in (e.get("models") or {}).items()} for e in data.evals},
            "final": {"round": str(last.get("round")),
                      **{role: _flat_cis(m) for role, m in (last.get("models") or {}).items()}}})
    tracker.log_images({p.stem: p for p in images})


def _flat_cis(m: dict[str, Any]) -> dict[str, Any]:
    """An evaluation summary's figures with each ``[lo, hi]`` CI as two numbers (summaries hold scalars).

    >>> _flat_cis({"reward_mean": 0.1, "reward_ci": [0.0, 0.2], "delta_vs_base": None})
    {'reward_mean': 0.1, 'reward_ci_lo': 0.0, 'reward_ci_hi': 0.2}
    """
    out: dict[str, Any] = {}
    for k, v in m.items():
        if isinstance(v, dict):
            out[k] = _flat_cis(v)
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            out[f"{k}_lo"], out[f"{k}_hi"] = v
        elif v is not None:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m expertchat.report PATH``: a run folder's report, or a sweep folder's (with ``multirun.yaml``);
    with ``--wandb-workspace`` also the sweep's W&B dashboard (``report/dashboard.py``: its spec offline, saved with
    ``--save``). Exit 0 when something was reported, 2 with one error line when there was nothing to report."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m expertchat.report", description=main.__doc__)
    parser.add_argument("path", metavar="RUN_OR_SWEEP_FOLDER")
    parser.add_argument("--wandb-workspace", action="store_true",
                        help="a sweep's W&B view and report (wandb-workspaces): written as a spec offline")
    parser.add_argument("--save", action="store_true", help="with --wandb-workspace: save them to W&B (online)")
    parser.add_argument("--entity", help="the W&B entity to save to (default: the sweep's tracker.entity, WANDB_ENTITY)")
    parser.add_argument("--project", help="the W&B project (default: the sweep's tracker.project)")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # usage errors (2, with the usage line) and --help (0): a code, not an exit
        return int(exc.code or 0)
    try:
        root = Path(args.path)
        if (root / "multirun.yaml").is_file():
            from expertchat.report import sweep

            for job in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
                if not load(job).empty():
                    after_run(job)  # each job's own report.md (a failure there is one warning line)
            print(sweep.write_sweep_report(root))
        elif args.wandb_workspace:
            raise ExpertChatError(f"--wandb-workspace needs a sweep folder (with multirun.yaml); {root} is not one")
        else:
            print(write_report(root))
        if args.wandb_workspace:
            from expertchat.report import dashboard

            spec = dashboard.write(root, save=args.save, entity=args.entity, project=args.project)
            print(f"W&B dashboard spec: {spec}")
            print(f"saved: {json.loads(spec.read_text())['workspace_url']}" if args.save else dashboard.how_to_save(root))
    except ExpertChatError as exc:
        print(f"expertchat.report.markdown: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
