"""Reading a finished, interrupted or old run folder for the report: what is there, what is missing, never a guess.

A run folder (``store.py`` writes it) may hold ``turns.jsonl``, ``ratings.jsonl``, ``train_metrics.jsonl``, the
stage markers ``stages/round_<r>.<stage>.json``, the evaluation (``eval.jsonl`` and
``stages/{base,round_<r>}.evaluation.json``), ``rate_summary.json`` (``mode=rate``), ``config.yaml`` and Hydra's
``.hydra/`` record, and ``status.json`` (written by every job). Any of them may be missing: :func:`load` reads what
is there and :attr:`RunData.missing` says what is not. The hacking guards of a text (distinct-n, the fraction of
its words copied from its context: :mod:`expertchat.stats`) are computed here, on words, for the dialogue turns
that have no evaluation row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertchat.errors import ExpertChatError
from expertchat.runs.inputs import read_records
from expertchat.runs.store import STAGES_DIR, parse_marker
from expertchat.stats import copied_fraction, distinct_n, fmt

STAGES = ("dialogue", "rating", "training")  # the stages every round of a run has (modes.run.STAGES; interaction is
# newer: a folder without it is complete, and its report says how to measure it)
STATUS_FILE = "status.json"


@dataclass
class RunData:
    """What one run folder holds. ``markers``: ``{(round, stage): summary}``; ``evals``: the evaluation summaries
    in order (``base`` first, then rounds); ``bad_lines``: ``{file: lines that were not JSON (or not UTF-8)}``."""

    root: Path
    config: dict[str, Any] | None = None
    overrides: list[str] | None = None
    choices: dict[str, str] = field(default_factory=dict)
    turns: list[dict[str, Any]] = field(default_factory=list)
    ratings: list[dict[str, Any]] = field(default_factory=list)
    train: list[dict[str, Any]] = field(default_factory=list)
    markers: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    interaction: list[dict[str, Any]] = field(default_factory=list)  # interaction.jsonl: one record per turn
    league: dict[str, Any] | None = None  # league.json: the cross-play league (mode=league)
    rate_summary: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    bad_lines: dict[str, int] = field(default_factory=dict)
    just_finished: bool = False  # read by the run itself as it ends (its status file still says running)
    sweep: dict[str, Any] | None = None  # a multirun's job: {"dir": the sweep folder, "job": its number}

    @property
    def rounds(self) -> int | None:
        """Rounds the recorded config asks for (``None`` without a config)."""
        return (self.config or {}).get("rounds")

    @property
    def mode(self) -> str:
        if self.rate_summary is not None:
            return "rate"
        return str((self.config or {}).get("mode") or "run")

    def empty(self) -> bool:
        """Nothing to report: no records, markers, evaluation or rating summary."""
        return not (self.turns or self.ratings or self.train or self.markers or self.evals or self.eval_rows
                    or self.rate_summary)

    def missing_stages(self) -> list[str]:
        """``round <r> <stage>`` for every stage of the recorded rounds without a marker (empty in ``mode=rate``)."""
        if self.mode != "run":
            return []
        rounds = self.rounds or (max((r for r, _ in self.markers), default=-1) + 1)
        points = {e.get("round") for e in self.evals}
        evaluated = get(self.config, "evaluation.enabled") is True  # the evaluation stage: base, then every round
        return (["base evaluation"] if evaluated and "base" not in points else []) + [
            f"round {r} {s}" for r in range(rounds) for s in (*STAGES, *(["evaluation"] if evaluated else []))
            if ((r, s) not in self.markers if s != "evaluation" else r not in points)]

    def state(self) -> tuple[str, str]:
        """``(state, how it is known)``: the status file's ``status`` (running / done / failed / interrupted; a
        ``running`` one without a live lock is ``killed``: :func:`running_or_killed`) when there is one,
        else ``done`` when every stage marker is there, else ``incomplete``; ``empty`` for nothing at all."""
        if self.just_finished:
            return "done", "written by the run as it finished"
        if self.status is not None:
            err = self.status.get("error")
            if self.status.get("status") == "running":  # a job killed outside Python (OOM, SIGKILL) stays running
                return running_or_killed(self.root)
            return str(self.status.get("status")), f"status.json{': ' + err if err else ''}"
        if self.empty():
            return "empty", "no records, stage markers or evaluation"
        if self.mode == "rate":
            return "done", "rate_summary.json"
        missing = self.missing_stages()
        if self.config is None:
            return "incomplete", "no config.yaml: the number of rounds is unknown"
        return ("done", "no status file; every stage marker present") if not missing else (
            "incomplete", f"no status file; {len(missing)} stage(s) missing, first: {missing[0]}")

    def missing(self) -> list[str]:
        """What a complete run folder would have and this one lacks, one short phrase each."""
        out = [] if self.config is not None else ["config.yaml (and .hydra/config.yaml)"]
        if self.mode == "run":
            out += [f"{name}" for name, rows in (("turns.jsonl", self.turns), ("ratings.jsonl", self.ratings))
                    if not rows]
            trained = [m for (_, s), mk in self.markers.items() if s == "training"
                       for m in (mk.get("roles") or {}).values() if isinstance(m, dict) and m.get("steps")]
            if not self.train and trained:  # training.steps=0 logs nothing
                out.append("train_metrics.jsonl")
            if not self.evals:
                out.append("evaluation (stages/*.evaluation.json): no evaluation in this run")
            out += [f"stage marker: {m}" for m in self.missing_stages()]
        return out


def load(run_dir: str | Path) -> RunData:
    """Read ``run_dir`` (see the module's docstring); lines that are not JSON (or not UTF-8) are skipped and counted.

    Raises:
        ExpertChatError: ``run_dir`` does not exist or is not a folder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ExpertChatError(f"no run folder at {root}: give the folder a run wrote (its hydra.run.dir)")
    data = RunData(root)
    data.config = _yaml(root / "config.yaml") or _yaml(root / ".hydra" / "config.yaml")
    overrides = _yaml(root / ".hydra" / "overrides.yaml")
    data.overrides = [str(o) for o in overrides] if isinstance(overrides, list) else None
    hydra = _yaml(root / ".hydra" / "hydra.yaml") or {}
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    data.choices = {k: str(v) for k, v in choices.items() if v and not str(k).startswith("hydra/")}
    if get(hydra, "hydra.mode") == "MULTIRUN":
        data.sweep = {"dir": get(hydra, "hydra.sweep.dir"), "job": get(hydra, "hydra.job.num")}
    data.turns = _jsonl(root, "turns.jsonl", data.bad_lines)
    data.ratings = _jsonl(root, "ratings.jsonl", data.bad_lines)
    data.train = [r for r in _jsonl(root, "train_metrics.jsonl", data.bad_lines) if not r.get("final")]
    data.eval_rows = _jsonl(root, "eval.jsonl", data.bad_lines)
    data.interaction = _jsonl(root, "interaction.jsonl", data.bad_lines)
    for path in sorted((root / STAGES_DIR).glob("*.json")):
        marker = parse_marker(path.name)
        summary = _json(path)
        if marker is None or not isinstance(summary, dict):
            continue
        point, stage = marker
        if stage == "evaluation":
            data.evals.append(summary)
        elif point != "base":
            data.markers[(int(point), stage)] = summary
    data.evals.sort(key=lambda s: -1 if s.get("round") == "base" else int(s.get("round", 0)))
    data.rate_summary = _json(root / "rate_summary.json")
    data.league = _json(root / "league.json")
    data.status = _json(root / STATUS_FILE)
    return data


def _yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _jsonl(root: Path, name: str, bad: dict[str, int]) -> list[dict[str, Any]]:
    """The records (JSON objects) of ``root/name``; its bad lines (cut by a kill mid-write: not JSON, or not
    UTF-8) are counted in ``bad[name]``, other JSON values skipped."""
    path = root / name
    if not path.is_file():
        return []
    records = read_records(path)
    if records.bad:
        bad[name] = bad.get(name, 0) + len(records.bad)
    return [row for _, row in records.good if isinstance(row, dict)]


# ------------------------------------------------------------------------------------------ the hacking guards


def words(text: str) -> list[str]:
    """Lower-cased word tokens.

    >>> words("The cat, the CAT!")
    ['the', 'cat', 'the', 'cat']
    """
    return re.findall(r"\w+", text.lower())


def turn_guards(turns: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per turn ``(dialogue_id, turn)``: ``tokens`` (new tokens), ``cut`` (stopped at max_new_tokens, not at EOS),
    ``distinct_2`` and ``copied_fraction`` (of its words, against the topic and the dialogue's earlier turns)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    by_dialogue: dict[str, list[dict[str, Any]]] = {}
    for t in turns:
        by_dialogue.setdefault(str(t.get("dialogue_id")), []).append(t)
    for did, ts in by_dialogue.items():
        context = words(str(ts[0].get("topic", "")))
        for t in sorted(ts, key=lambda t: t.get("turn", 0)):
            w = words(str(t.get("text", "")))
            out[(did, t.get("turn", 0))] = {"tokens": t.get("new_tokens"), "cut": t.get("finished") is False,
                                            "distinct_2": distinct_n([w], 2),
                                            "copied_fraction": copied_fraction(context, w)}
            context = context + w
    return out


def mean(values: list[Any]) -> float | None:
    """The mean of the numbers among ``values`` (bools count 0/1), ``None`` when there is none.

    >>> mean([1, None, 2, True])
    1.3333333333333333
    """
    nums = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
    return sum(nums) / len(nums) if nums else None


# ------------------------------------------------------------------------------------------------- sweeps


def sweep_overrides(task: list[str]) -> tuple[list[str], list[list[str]]]:
    """A multirun's command-line overrides (``multirun.yaml``'s ``hydra.overrides.task``) -> (the swept keys, the
    override list of every job in Hydra's job order): the cartesian product of the swept values, as Hydra's
    basic sweeper builds it (``BasicSweeper.split_arguments``).

    >>> sweep_overrides(["+experiment=smoke", "reward.zeta=0.0,1.0", "seed=1,2"])[1][:2]
    [['+experiment=smoke', 'reward.zeta=0.0', 'seed=1'], ['+experiment=smoke', 'reward.zeta=0.0', 'seed=2']]

    Raises:
        ExpertChatError: an override Hydra cannot parse.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(task))
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar and sweeper errors
        raise ExpertChatError(f"cannot read the sweep's overrides {task}: {str(exc).splitlines()[0]}") from exc
    swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    return swept, jobs


def swept_only(overrides: list[str], swept: list[str]) -> list[str]:
    """The overrides of ``overrides`` whose key is swept.

    >>> swept_only(["+experiment=smoke", "reward.zeta=0.4"], ["reward.zeta"])
    ['reward.zeta=0.4']
    """
    return [o for o in overrides if o.partition("=")[0] in swept]


def groups(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by ``keys`` in the order first seen, sorted by key where the keys compare."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    try:
        return dict(sorted(out.items(), key=lambda kv: tuple(str(k) if k is None else k for k in kv[0])))
    except TypeError:
        return out


def get(tree: Any, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; ``None`` when a key is missing.

    >>> get({"a": {"b": 1}}, "a.b"), get({"a": 1}, "a.c")
    (1, None)
    """
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


# ------------------------------------------------------------------------------------------ table cells


def ci(mean_: Any, interval: Any, digits: int = 3) -> str:
    """``mean [lo, hi]``, each as :func:`expertchat.stats.fmt` writes it.

    >>> ci(0.1, [0.0, 0.2]), ci(0.1, None), ci(None, None)
    ('0.100 [0.000, 0.200]', '0.100', 'n/a')
    """
    if mean_ is None:
        return "n/a"
    if not interval or None in interval:
        return fmt(float(mean_), digits)
    return f"{fmt(float(mean_), digits)} [{fmt(float(interval[0]), digits)}, {fmt(float(interval[1]), digits)}]"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table.

    >>> table(["a", "b"], [[1, "x|y"]])
    ['| a | b |', '|---|---|', '| 1 | x/y |']
    """
    def cell(v: Any) -> str:
        return str(v).replace("|", "/").replace("\n", " ")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def running_or_killed(folder: Path) -> tuple[str, str]:
    """``(state, how it is known)`` of a folder whose ``status.json`` says ``running``, from its lock
    (:mod:`expertchat.runs.lock`): ``running`` while the run holds it, else ``killed`` (it ended without recording
    its end: out of memory, SIGKILL, a node failure)."""
    from expertchat.runs.lock import LOCK_FILE, holder_state

    path = Path(folder) / LOCK_FILE
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        alive, why = holder_state(holder, path.stat().st_mtime)
    except (OSError, ValueError, AttributeError):
        alive, why = False, "no lock is held"
    if alive:
        return "running", f"status.json, and the lock: {why}"
    return "killed", (f"status.json says running, but {why}: killed before it could record its end (out of memory, "
                      f"SIGKILL or a node failure); rerun into the same folder to resume")
