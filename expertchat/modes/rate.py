"""``mode=rate``: rate answers that came from elsewhere with the configured judge, rubric and reward.

    python -m expertchat mode=rate rate.input=answers.jsonl
    python -m expertchat mode=rate rate.input=chats.jsonl rate.messages_field=messages
    python -m expertchat mode=rate rate.input=mt.jsonl "rate.question_field='turns[0]'" rate.answer_field=reply

Input: JSONL, one record per line, with a question and an answer field (dotted paths with indices; defaults
``question`` and ``answer``), or chat messages (``rate.messages_field``, default ``messages``: the last assistant
message is the answer, the messages before it the context). Output in the run folder: ``ratings.jsonl`` (one row
per rated record: its ``id`` (``rate.id_field``, else the line number), the weighted ``score``, the reward and
every category's detail) and ``rate_summary.json`` (mean score per category with a 95% BCa bootstrap CI). Bad
records (not JSON, a missing field, an empty answer) are counted and listed by line number, never dropped
silently.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from expertchat.config.schema import ExpertChatConfig, RateConfig
from expertchat.errors import ExpertChatError
from expertchat.judging.judge import Judge, RatingItem, turn_context
from expertchat.report.tracking import Tracker
from expertchat.runs import inputs
from expertchat.runs.inputs import message_text
from expertchat.runs.store import RunStore
from expertchat.stages.rating import RATINGS_FILE, cut_counts, rating_record, warn_cut
from expertchat.stages.topics import get_field
from expertchat.stats import bootstrap_ci

log = logging.getLogger(__name__)

SUMMARY_FILE = "rate_summary.json"


def read_records(path: str, cfg: RateConfig, context_turns: int = 2) -> tuple[list[RatingItem], list[dict]]:
    """Read ``path`` (JSONL, or a JSON array of records: :mod:`expertchat.runs.inputs`): a :class:`RatingItem` per
    good record (``meta`` holds ``id`` and ``line``, the record's position in an array), and one
    ``{"line", "reason"}`` per bad record (not UTF-8, not JSON, a missing field, an empty answer, ...).

    Raises:
        ExpertChatError: the file does not exist.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ExpertChatError(f"rate.input not found: {file} (set rate.input=FILE.jsonl)")
    records = inputs.read_records(file)
    items: list[RatingItem] = []
    bad: list[dict[str, Any]] = []
    entries = sorted([(n, r, None) for n, r in records.good] + [(b["line"], None, b) for b in records.bad],
                     key=lambda e: e[0])
    for lineno, record, failed in entries:
        if cfg.limit is not None and len(items) + len(bad) >= cfg.limit:
            break
        if failed is not None:
            bad.append(failed)
            continue
        if not isinstance(record, dict):
            bad.append({"line": lineno, "reason": f"not a JSON object ({type(record).__name__})"})
            continue
        try:
            question, answer = _question_answer(record, cfg, context_turns)
        except ValueError as exc:
            bad.append({"line": lineno, "reason": str(exc)})
            continue
        try:
            rid = get_field(record, cfg.id_field)
        except (KeyError, IndexError, TypeError):
            rid = lineno
        items.append(RatingItem(question, answer, {"id": rid, "line": lineno}))
    return items, bad


def _question_answer(record: dict, cfg: RateConfig, context_turns: int) -> tuple[str, str]:
    """(question, answer) of one record; ``ValueError`` naming what is wrong."""
    messages = record.get(cfg.messages_field) if cfg.messages_field else None
    has_fields = _has(record, cfg.answer_field)
    if isinstance(messages, list) and not has_fields:
        turns = [m for m in messages if isinstance(m, dict)]
        last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError(f"no assistant message in '{cfg.messages_field}'")
        answer = message_text(turns[last].get("content"))
        before = [(False, message_text(m.get("content"))) for m in turns[:last] if m.get("role") != "system"]
        question = turn_context(before, context_turns)
    else:
        for name in (cfg.question_field, cfg.answer_field):
            if not _has(record, name):
                raise ValueError(f"no field '{name}' (set rate.question_field / rate.answer_field, or give chat "
                                 f"messages in '{cfg.messages_field}')")
        question, answer = get_field(record, cfg.question_field), get_field(record, cfg.answer_field)
        if not isinstance(answer, str) or not isinstance(question, str):
            raise ValueError(f"'{cfg.question_field}' and '{cfg.answer_field}' must be strings")
    if not answer.strip():
        raise ValueError("empty answer")
    if not question.strip():
        raise ValueError("empty question")
    return question, answer


def _has(record: dict, path: str) -> bool:
    try:
        get_field(record, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


def _mean_ci(values: list[float | None], cfg: RateConfig, seed: int) -> dict[str, Any]:
    """Mean (4 decimals), 95% BCa bootstrap CI (:func:`expertchat.stats.bootstrap_ci`, ``rate.bootstrap``
    resamples, 4 decimals) and count of the values that are not ``None``."""
    vals = [v for v in values if v is not None]
    mean = round(sum(vals) / len(vals), 4) if vals else None
    return {"mean": mean, "ci95": bootstrap_ci(vals, cfg.bootstrap, seed, digits=4), "n": len(vals)}


def summarize(rows: list[dict[str, Any]], bad: list[dict], names: list[str], cfg: RateConfig, seed: int,
              counts: dict[str, int]) -> dict[str, Any]:
    """Mean and 95% BCa bootstrap CI of the weighted score, each category, the similarity and the reward."""
    return {
        "records": len(rows) + len(bad), "rated": len(rows), "scored": sum(r["score"] is not None for r in rows),
        "bad_records": len(bad), "bad": bad[:200],
        "score": _mean_ci([r["score"] for r in rows], cfg, seed),
        "categories": {n: _mean_ci([r["categories"][n]["score"] for r in rows], cfg, seed) for n in names},
        "similarity": _mean_ci([r["similarity"] for r in rows], cfg, seed),
        "reward": _mean_ci([r["reward"] for r in rows], cfg, seed),
        "parse_failures": counts.get("parse_failures", 0), "skipped": counts.get("skipped", 0),
        "neutral": counts.get("neutral", 0), "empty_wims": sum(r["wim_status"] == "empty" for r in rows),
        **cut_counts(rows),
    }


def format_summary(s: dict[str, Any]) -> str:
    """A few readable lines: one per category and for the weighted score and the reward."""
    def line(name: str, m: dict[str, Any]) -> str:
        ci = f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else "n/a"
        mean = f"{m['mean']:.3f}" if m["mean"] is not None else "n/a"
        return f"  {name:24s} {mean:>7s}  95% CI {ci}  (n={m['n']})"

    out = [f"rated {s['rated']} of {s['records']} records ({s['bad_records']} bad, {s['skipped']} skipped, "
           f"{s['parse_failures']} parse failures)"]
    out += [line(n, m) for n, m in s["categories"].items()]
    out += [line("score (weighted)", s["score"]), line("reward", s["reward"])]
    out += [f"  bad record at line {b['line']}: {b['reason']}" for b in s["bad"][:20]]
    if s["bad_records"] > 20:
        out.append(f"  ... and {s['bad_records'] - 20} more (see {SUMMARY_FILE})")
    return "\n".join(out)


def check(cfg: ExpertChatConfig) -> tuple[list[RatingItem], list[dict]]:
    """The input's records, read before any model loads or a tracker opens: (good items, bad records).

    Raises:
        ExpertChatError: the judge model is missing or needs a GPU this machine lacks, the run folder holds a
            dialogue run, the input is missing, or it has no good record.
    """
    from expertchat.engine.models import check_model

    check_model(cfg.judge, "judge")
    store = RunStore(cfg.run_dir)
    if store.path(RATINGS_FILE).exists() and not store.path(SUMMARY_FILE).exists():
        raise ExpertChatError(f"{store.path(RATINGS_FILE)} holds the ratings of a dialogue run; rate into another "
                              f"folder (hydra.run.dir=...)")
    items, bad = read_records(cfg.rate.input or "", cfg.rate, cfg.judging.context_turns)
    if not items:
        first = f" (line {bad[0]['line']}: {bad[0]['reason']})" if bad else ""
        raise ExpertChatError(f"no record to rate in {cfg.rate.input}: {len(bad)} bad records{first}")
    return items, bad


def run(cfg: ExpertChatConfig, tracker: Tracker | None = None,
        checked: tuple[list[RatingItem], list[dict]] | None = None) -> dict[str, Any]:
    """Rate ``cfg.rate.input`` with ``cfg.judge`` and write ``ratings.jsonl`` and ``rate_summary.json``; the
    summary's means also go to ``tracker`` (as ``rate/<name>`` at step 0, and the run's summary).
    ``checked``: what :func:`check` returned (``modes.run`` checks first); ``None`` reads the input here.

    Raises:
        ExpertChatError: the input is missing or holds no good record, or the folder holds a dialogue run.
    """
    from expertchat.engine.models import load_model
    from expertchat.judging.rewards import load_embedder, rewards, wants_wim

    tracker = tracker or Tracker()
    store = RunStore(cfg.run_dir)
    items, bad = checked if checked is not None else check(cfg)  # modes.run has read the input already
    for b in bad[:20]:
        log.warning("%s:%d: %s (counted as a bad record)", cfg.rate.input, b["line"], b["reason"])
    lm = load_model(cfg.judge)
    judge = Judge(lm, cfg.judging)
    start = time.perf_counter()
    use_wim = wants_wim(cfg.judging, cfg.reward)
    judgements = judge.rate(items, wim=use_wim, progress=cfg.progress)
    parts = rewards(judgements, [it.answer for it in items], cfg.reward,
                    load_embedder(cfg.reward.embedder) if use_wim else None)
    rows = [rating_record(it, j, p, cfg.judging.mode, rater_model=lm.name)
            for it, j, p in zip(items, judgements, parts)]
    store.write_text(RATINGS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = summarize(rows, bad, list(cfg.judging.active()), cfg.rate, cfg.seed, judge.counts)
    summary.update(input=str(cfg.rate.input), judge=lm.name, mode=cfg.judging.mode, zeta=cfg.reward.zeta,
                   seconds=round(time.perf_counter() - start, 2))
    store.write_json(SUMMARY_FILE, summary)
    warn_cut(summary, summary["rated"], str(cfg.rate.input))
    means = {"score": summary["score"], "reward": summary["reward"], "similarity": summary["similarity"],
             **{f"category_{n}": m for n, m in summary["categories"].items()}}
    tracker.log({f"rate/{name}": m["mean"] for name, m in means.items() if m["mean"] is not None}, step=0)
    tracker.log_summary({"rate": summary})
    text = format_summary(summary)
    print(text)
    log.info("wrote %s and %s to %s", RATINGS_FILE, SUMMARY_FILE, store.root)
    return summary
