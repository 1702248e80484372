"""The run folder: append-only JSONL records, flushed as they are written, and per-stage markers.

Every stage writes into the run folder and marks itself done (``stages/round_<r>.<stage>.json``). Rerunning
into the same folder skips completed stages. Records that an interrupted stage left behind are moved to
``<name>.incomplete.jsonl`` before the stage runs again, so the main file never holds a record twice and
nothing written is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from expertchat.errors import ExpertChatError
from expertchat.runs.inputs import decode_record, read_records

CONFIG_FILE = "config.yaml"  # the resolved config of the last run into the folder
RESUMES_FILE = "resumes.jsonl"  # forced resumes with a changed config (resume=force)
SCRATCH_DIR = ".scratch"  # working folders of the current run (the trainer's output_dir); never outlives a run
STAGES_DIR = "stages"  # the stage markers: <point>.<stage>.json (marker_name)
_MARKER = re.compile(r"(base|round_(\d+))\.(\w+)\.json")  # a marker's file name (parse_marker)
_TEMP_FILE = re.compile(r"^\..+\.tmp\d+$")  # write_text's temporary file: .<name>.tmp<pid>


def point_name(round_idx: int | str) -> str:
    """The name of a point of the run in its files: ``base`` (before round 0: the evaluation of the base models)
    or ``round_<r>``.

    >>> point_name("base"), point_name(2)
    ('base', 'round_2')
    """
    return "base" if round_idx == "base" else f"round_{round_idx}"


def marker_name(round_idx: int | str, stage: str) -> str:
    """The stage marker of ``stage`` at round ``round_idx`` (or ``"base"``), relative to the run folder.

    >>> marker_name(0, "dialogue"), marker_name("base", "evaluation")
    ('stages/round_0.dialogue.json', 'stages/base.evaluation.json')
    """
    return f"{STAGES_DIR}/{point_name(round_idx)}.{stage}.json"


def parse_marker(file_name: str) -> tuple[int | str, str] | None:
    """``(round or "base", stage)`` of a marker's file name (the last part of :func:`marker_name`); ``None`` for
    a file that is no marker.

    >>> parse_marker("round_3.training.json"), parse_marker("base.evaluation.json"), parse_marker("notes.json")
    ((3, 'training'), ('base', 'evaluation'), None)
    """
    m = _MARKER.fullmatch(file_name)
    if m is None:
        return None
    return ("base" if m.group(2) is None else int(m.group(2))), m.group(3)


class RunStore:
    """Reads and writes one run folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    # ------------------------------------------------------------------------------------------- records
    def append(self, name: str, record: dict[str, Any]) -> None:
        """Append one JSON record to ``name`` and flush it to disk."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()

    def read(self, name: str, **where: Any) -> list[dict[str, Any]]:
        """All records of ``name`` whose fields equal ``where`` (e.g. ``round=0``); a line that is not a record
        (cut by a kill mid-write) is skipped (read by :func:`expertchat.runs.inputs.read_records`)."""
        return [r for r in self._iter(name) if all(r.get(k) == v for k, v in where.items())]

    def _iter(self, name: str) -> Iterator[dict[str, Any]]:
        path = self.path(name)
        if path.exists():
            yield from (record for _, record in read_records(path).good)

    def write_text(self, name: str, text: str) -> Path:
        """Write a whole file atomically (temp file + rename)."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path

    def scratch(self) -> Path:
        """The run's scratch folder (``.scratch``), created on demand; :meth:`clean_leftovers` removes it."""
        path = self.path(SCRATCH_DIR)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, folder: Path, name: str, written_in: Path | None = None) -> None:
        """Move a folder written in full (under :meth:`scratch`) into place as ``name``, replacing what was there:
        a kill leaves the old folder or none, never a half-written one. ``written_in``: the scratch folder it was
        written in, removed afterwards."""
        import shutil

        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
        if written_in is not None:
            shutil.rmtree(written_in, ignore_errors=True)
        with contextlib.suppress(OSError):  # the scratch folder itself, once empty: a finished run leaves none
            self.path(SCRATCH_DIR).rmdir()

    def clean_leftovers(self) -> list[str]:
        """Remove what a killed run can leave and nothing reads: temporary files of :meth:`write_text`
        (``.<name>.tmp<pid>``, anywhere in the folder) and the scratch folder. Call it at the start of a run,
        before anything is written: the job holds the folder's lock (:mod:`expertchat.runs.lock`), so no other
        run is writing there.

        Returns:
            the removed paths, relative to the run folder.
        """
        removed = []
        for path in sorted(self.root.rglob(".*.tmp*")):
            if _TEMP_FILE.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(self.root)))
        scratch = self.path(SCRATCH_DIR)
        if scratch.exists():
            if any(scratch.iterdir()):  # an empty one is no leftover of a killed run: not reported
                removed.append(SCRATCH_DIR)
            shutil.rmtree(scratch, ignore_errors=True)
        return removed

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads(self.path(name).read_text(encoding="utf-8"))

    # ------------------------------------------------------------------------------------------------ config
    def check_resume(self, config: dict[str, Any], harmless: tuple[str, ...], force: bool) -> dict[str, list]:
        """Compare the resolved ``config`` with the one recorded in ``config.yaml`` by an earlier run into this
        folder (nothing to compare on a first run); writes nothing.

        Keys under ``harmless`` may differ. Any other difference raises, unless ``force``.

        Returns:
            ``{key: [before, now]}`` for each difference that ``force`` lets through (see :meth:`record_config`).

        Raises:
            ExpertChatError: the config changed in a key that changes results, naming the keys and the two
                ways on (a new folder, or ``resume=force``).
        """
        import yaml

        path = self.path(CONFIG_FILE)
        changed: list[str] = []
        if path.exists():
            before = _leaves(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
            now = _leaves(config)
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                             and not any(k == h or k.startswith(h + ".") for h in harmless))
            if changed and not force:
                shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed[:6])
                more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
                raise ExpertChatError(
                    f"{self.root} holds a run with another config: {shown}{more}; run into a new folder "
                    f"(hydra.run.dir=...) or pass resume=force to go on in this one (recorded in {RESUMES_FILE})")
            return {k: [before.get(k), now.get(k)] for k in changed}
        return {}

    def record_config(self, config: dict[str, Any], forced: dict[str, list]) -> None:
        """Write ``config`` to ``config.yaml``; append the differences a forced resume let through to
        ``resumes.jsonl``, so the folder says that it mixes two configs."""
        import yaml

        if forced:
            self.append(RESUMES_FILE, {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "forced": True, "changed": forced})
        self.write_text(CONFIG_FILE, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))

    # -------------------------------------------------------------------------------------------- stages
    def _marker(self, round_idx: int | str, stage: str) -> Path:
        return self.path(marker_name(round_idx, stage))

    def done(self, round_idx: int | str, stage: str) -> bool:
        return self._marker(round_idx, stage).exists()

    def begin(self, round_idx: int | str, stage: str, files: list[str]) -> dict[str, int]:
        """Start (or restart) a stage: records of this round left by an interrupted attempt (and lines cut by a
        kill, or anything else that is no record) are moved to ``<file>.incomplete.jsonl``. Lines end at ``\\n``
        only (as :func:`expertchat.runs.inputs.read_records` reads them): a record may hold U+2028 or U+0085.

        Returns:
            ``{file: number of lines moved aside}`` for each file that had any (empty for a fresh stage).
        """
        if self.done(round_idx, stage):
            raise RuntimeError(f"stage {stage} of round {round_idx} is already complete")
        moved: dict[str, int] = {}
        for name in files:
            path = self.path(name)
            if not path.exists():
                continue
            lines = path.read_bytes().split(b"\n")
            if lines[-1] == b"":  # the file's last newline ends its last line
                lines.pop()
            keep, stale = [], []
            for line in lines:
                record, reason = decode_record(line)
                stale_line = reason is not None or not isinstance(record, dict) or record.get("round") == round_idx
                (stale if stale_line else keep).append(line + b"\n")
            if stale:
                aside = path.with_name(path.stem + ".incomplete.jsonl")
                with aside.open("ab") as f:
                    f.writelines(stale)
                    f.flush()
                self.write_text(name, b"".join(keep).decode("utf-8"))
                moved[name] = len(stale)
        return moved

    def finish(self, round_idx: int | str, stage: str, summary: dict[str, Any] | None = None) -> None:
        """Mark a stage complete, with a small summary of what it produced and the process's peak memory so far."""
        self.write_json(
            marker_name(round_idx, stage),
            {"round": round_idx, "stage": stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             **(summary or {}), **peak_memory()},
        )

    def stage_summary(self, round_idx: int | str, stage: str) -> dict[str, Any]:
        """The summary a completed stage's marker holds.

        Raises:
            ExpertChatError: the marker is unreadable (:meth:`check_markers`).
        """
        return self._read_marker(self._marker(round_idx, stage))

    def check_markers(self) -> None:
        """Every stage marker of the folder holds a JSON object: a marker left empty or cut (a full disk, an
        interrupted copy) stops a rerun here, before anything is written, in one line naming the file.

        Raises:
            ExpertChatError: the first unreadable marker, its size and what to do.
        """
        for path in sorted(self.path(STAGES_DIR).glob("*.json")):
            self._read_marker(path)

    def _read_marker(self, path: Path) -> dict[str, Any]:
        return self.read_json_as(str(path.relative_to(self.root)), lambda obj: isinstance(obj, dict),
                                 "stage summary", "delete it to run that stage again (its records are set aside), "
                                                  "then rerun", what="stage marker")

    def read_json_as(self, name: str, valid: Callable[[Any], bool], shape: str, ways: str,
                     what: str = "") -> Any:
        """The JSON file ``name`` of the folder, checked where it is read: a file that is not JSON, or whose
        content ``valid`` refuses, is one line naming it, its size and ``ways`` (what to do).

        Args:
            shape: what ``valid`` accepts, in words (e.g. ``list of topics``).
            what: what the file is, in words, before its path (e.g. ``stage marker``).

        Raises:
            ExpertChatError: the file is unreadable (cut or emptied by a full disk or an interrupted copy).
        """
        path = self.path(name)
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
            if valid(obj):
                return obj
            why = f"holds a JSON {type(obj).__name__} that is not a {shape}"
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = f"is not JSON ({exc.__class__.__name__}: {exc})"
        raise ExpertChatError(f"{what + ' ' if what else ''}{path} ({path.stat().st_size} bytes) {why}: it was cut "
                              f"or emptied (a full disk, an interrupted copy); {ways}")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of nested dicts."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}."))
    return out


def peak_memory() -> dict[str, float]:
    """Peak memory of this process so far, in GB: resident set (``peak_rss_gb``) and, where CUDA has been used,
    GPU memory allocated on any device (``peak_gpu_gb``)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, 3)}
    torch = sys.modules.get("torch")  # never imported here just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_gb"] = round(max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
                                   / 1e9, 3)
    return out
