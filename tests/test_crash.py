"""Crash safety proven by killing real runs: the smoke experiment is SIGKILLed at several points, rerun into the
same folder, and must end with the records of an uninterrupted run (by record id: nothing lost, nothing twice),
every stage marker, complete adapters, its derived files, and no temporary file or folder left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.02  # how often a watched run's folder is looked at
RUN_TIMEOUT_S = int(os.environ.get("EXPERTCHAT_RUN_TIMEOUT_S", "300"))  # one smoke run (about 40 s on 2 idle cores)
STAGES = ("dialogue", "rating", "training", "evaluation")
ROLES = ("actor", "judge")
TEMP_NAME = re.compile(r"^\..+\.tmp\d+$")  # store.write_text's temporary file: .<name>.tmp<pid>


# ------------------------------------------------------------------------------------------------ running


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "expertchat", "+experiment=smoke", "progress=false", f"hydra.run.dir={run_dir}"]


def environment(tmpdir: Path) -> dict[str, str]:
    """The run's environment; its system temp dir is ``tmpdir``, so that what a run leaves there can be seen."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(tmpdir),
            "PYTHONUNBUFFERED": "1"}


def run_to_end(run_dir: Path, tmpdir: Path, log: Path) -> str:
    """Run the smoke experiment into ``run_dir`` to completion; returns its console output."""
    with log.open("w") as out:
        proc = subprocess.run(command(run_dir), check=False, cwd=ROOT, env=environment(tmpdir), stdout=out,
                              stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"run into {run_dir} exited {proc.returncode}:\n{text[-3000:]}"
    return text


def run_and_kill(run_dir: Path, tmpdir: Path, log: Path, reached, what: str, sig: int = signal.SIGKILL) -> float:
    """Start the run, poll its folder until ``reached(run_dir)``, send it ``sig`` (SIGKILL) and wait for its end;
    returns the seconds it ran. Fails when the run ends (or times out) before the kill point: a missed kill point
    proves nothing; and when the process did not end by ``sig``."""
    with log.open("w") as out:
        proc = subprocess.Popen(command(run_dir), cwd=ROOT, env=environment(tmpdir), stdout=out,
                                stderr=subprocess.STDOUT)
        start = time.monotonic()
        try:
            while not reached(run_dir):
                if proc.poll() is not None:
                    pytest.fail(f"missed kill point {what}: the run exited ({proc.returncode}) after "
                                f"{time.monotonic() - start:.1f} s before it was reached; output:\n"
                                f"{log.read_text(errors='replace')[-2000:]}")
                if time.monotonic() - start > RUN_TIMEOUT_S:
                    pytest.fail(f"kill point {what} not reached in {RUN_TIMEOUT_S} s")
                time.sleep(POLL_S)
            os.kill(proc.pid, sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -sig, f"kill point {what}: the run did not end by {sig!r} ({proc.returncode})"
    return time.monotonic() - start


# --------------------------------------------------------------------------------------------- the folder


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in lines(path)]


def marker(run_dir: Path, stage: str, r: int = 0) -> Path:
    return run_dir / "stages" / f"round_{r}.{stage}.json"


def keyed(path: Path, key: tuple[str, ...], ignore: tuple[str, ...] = ()) -> dict[tuple, dict]:
    """The records of ``path`` by id (the fields ``key``), less the fields ``ignore``; no id may repeat."""
    recs = records(path)
    ids = [tuple(r[k] for k in key) for r in recs]
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert not twice, f"{path.name}: records written twice: {twice}"
    return {i: {k: v for k, v in r.items() if k not in ignore} for i, r in zip(ids, recs)}


TURN_ID = ("round", "dialogue_id", "turn")
EVAL_ID = ("round", "role", "prompt_id", "sample")
RATING_ID = ("round", "rater", "ratee", "dialogue_id", "turn")
def metrics_keyed(path: Path) -> set[tuple]:
    """train_metrics.jsonl's ids: TRL's end-of-training log (train_runtime, ...) shares the last step's number,
    so a line's id is (round, role, step, step|end); each id exactly once."""
    recs = records(path)
    ids = [(r["round"], r["role"], r["step"], "end" if "train_runtime" in r else "step") for r in recs]
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert not twice, f"{path.name}: records written twice: {twice}"
    return set(ids)


def snapshot(run_dir: Path) -> dict:
    """What a finished run folder must hold, in comparable form; asserts what holds for any finished run."""
    for stage in STAGES:
        assert marker(run_dir, stage).exists(), f"stage marker of round 0 {stage} missing"
        json.loads(marker(run_dir, stage).read_text())  # complete
    for role in ROLES:
        folder = run_dir / "adapters" / "round_0" / role
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config.get("peft_type") == "LORA", f"{folder}: adapter_config.json incomplete"
        from safetensors.torch import load_file

        assert load_file(str(folder / "adapter_model.safetensors")), f"{folder}: empty adapter"
    left = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if TEMP_NAME.match(p.name)]
    assert not left, f"temporary files outlived the run: {left}"
    scratch = run_dir / ".scratch"
    assert not scratch.exists() or not any(scratch.iterdir()), f"training scratch left: {list(scratch.iterdir())}"
    return {
        "turns": keyed(run_dir / "turns.jsonl", TURN_ID, ignore=("seconds",)),  # wall time: not deterministic
        "ratings": keyed(run_dir / "ratings.jsonl", RATING_ID),
        "metrics": metrics_keyed(run_dir / "train_metrics.jsonl"),
        "rewards": json.loads((run_dir / "rewards_by_round.json").read_text()),
        "eval": keyed(run_dir / "eval.jsonl", EVAL_ID),  # greedy answers, frozen judge: deterministic
    }


def counts(run_dir: Path) -> dict[str, int]:
    return {name: len(lines(run_dir / f"{name}.jsonl")) for name in ("turns", "ratings", "train_metrics")}


# ------------------------------------------------------------------------------------------- kill points


def during_dialogue(d: Path) -> bool:
    return len(lines(d / "turns.jsonl")) >= 1 and not marker(d, "dialogue").exists()


def during_rating(d: Path) -> bool:
    return len(lines(d / "ratings.jsonl")) >= 1 and not marker(d, "rating").exists()


def during_training_step(d: Path) -> bool:
    """The rating marker is there, no training step has been recorded: the first step is under way."""
    return marker(d, "rating").exists() and not lines(d / "train_metrics.jsonl")


def while_saving_adapter(d: Path) -> bool:
    """An adapter is written in full under .scratch/save-<round>-<role>/ before it is moved into adapters/."""
    return any(p.is_file() for p in (d / ".scratch").glob("save-*/**/*"))


def after_training_marker(d: Path) -> bool:
    return marker(d, "training").exists()


KILL_POINTS = {
    "a-dialogue": during_dialogue,
    "b-rating": during_rating,
    "c-training-step": during_training_step,
    "d-saving-adapter": while_saving_adapter,
    "e-after-training-marker": after_training_marker,
}


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted smoke run."""
    base = tmp_path_factory.mktemp("reference")
    run_to_end(base / "run", base / "tmp", base / "run.log")
    snap = snapshot(base / "run")
    assert snap["turns"] and snap["ratings"] and snap["metrics"], "the reference run recorded nothing"
    snap["seconds"] = json.loads((base / "run" / "status.json").read_text())["seconds"]
    print(f"\nreference: {counts(base / 'run')}")
    return snap


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_run_resumes_to_the_records_of_an_uninterrupted_one(reference, tmp_path, point):
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    ran = run_and_kill(run_dir, tmpdir, tmp_path / "killed.log", KILL_POINTS[point], point)
    at_kill = counts(run_dir)
    if point.startswith("e-"):
        # A poll cannot land between the training marker and the derived files written right after it; make the
        # folder exactly as such a kill leaves it: rewards_by_round.json not yet (re)written, a write cut short.
        (run_dir / "rewards_by_round.json").unlink(missing_ok=True)
        (run_dir / f".rewards_by_round.json.tmp{2 ** 22 + 1}").write_text("[")

    output = run_to_end(run_dir, tmpdir, tmp_path / "rerun.log")
    after = counts(run_dir)
    print(f"\n{point}: killed after {ran:.1f} s with {at_kill}; after the rerun {after}")

    snap = snapshot(run_dir)
    assert set(snap["turns"]) == set(reference["turns"]), "turns.jsonl: record ids differ from the reference"
    assert snap["turns"] == reference["turns"], "turns.jsonl: texts differ from the reference"
    assert set(snap["ratings"]) == set(reference["ratings"]), "ratings.jsonl: record ids differ from the reference"
    assert snap["ratings"] == reference["ratings"], "ratings.jsonl: scores differ from the reference"
    assert snap["metrics"] == reference["metrics"], "train_metrics.jsonl: (round, role, step) differ"
    assert snap["eval"] == reference["eval"], "eval.jsonl: the held-out answers or their scores differ"
    assert [(r["round"], r["model"]) for r in snap["rewards"]] == [(r["round"], r["model"])
                                                                   for r in reference["rewards"]], \
        "rewards_by_round.json does not hold every trained round"
    left = [p.name for p in tmpdir.iterdir() if p.name.startswith("expertchat-")]
    assert not left, f"training scratch folders left in the system temp dir: {left}"

    # the rerun says where it resumed and what it set aside, in one line
    resumed = [line for line in output.splitlines() if re.search(r"\bresuming\b", line)]
    if point.startswith("e-"):  # training was done: the rerun goes on with the round's evaluation
        assert len(resumed) == 1 and "at round 0 evaluation" in resumed[0], resumed
        return
    assert len(resumed) == 1, f"expected one resume line, got {resumed}"
    interrupted = {"a-": "turns", "b-": "ratings", "c-": "train_metrics", "d-": "train_metrics"}.get(point[:2])
    if interrupted:
        aside = len(lines(run_dir / f"{interrupted}.incomplete.jsonl"))
        assert aside == at_kill[interrupted], f"{interrupted}: {at_kill[interrupted]} records at the kill, " \
                                              f"{aside} set aside"
        if aside:
            assert f"{aside} record" in resumed[0] and f"{interrupted}.jsonl" in resumed[0], resumed[0]


# ---------------------------------------------------------------- the pieces the kills rely on, without a run


def test_begin_counts_what_it_sets_aside_and_leftovers_are_removed(tmp_path):
    from expertchat.runs.store import RunStore

    store = RunStore(tmp_path)
    store.append("turns.jsonl", {"round": 0, "turn": 0})
    (tmp_path / "turns.jsonl").open("a").write('{"round": 0, "tu')  # a line cut by the kill
    assert store.begin(0, "dialogue", ["turns.jsonl", "missing.jsonl"]) == {"turns.jsonl": 2}
    assert store.begin(0, "dialogue", ["turns.jsonl"]) == {}  # nothing left to move
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / ".round_0.rating.json.tmp123").write_text("{")
    (tmp_path / ".rewards_by_round.json.tmp9").write_text("[")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("a: 1")  # not a temporary file: kept
    (store.scratch() / "actor-x").mkdir()
    assert store.clean_leftovers() == [".rewards_by_round.json.tmp9", "stages/.round_0.rating.json.tmp123",
                                       ".scratch"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".hydra", "config.yaml", "stages", "turns.incomplete.jsonl",
                                                           "turns.jsonl"]


# ------------------------------------------------------------------- signals, random kills, two writers at once


def test_sigterm_is_recorded_with_its_stage_and_the_rerun_resumes(reference, tmp_path):
    """The case sigterm-status-running: scancel, the time limit and preemption send SIGTERM; status.json and the log
    say so (never "running" forever), the process still ends by SIGTERM (exit 143 in a shell), a rerun resumes."""
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    run_and_kill(run_dir, tmpdir, tmp_path / "term.log", during_rating, "rating", sig=signal.SIGTERM)  # exit by it
    status = json.loads((run_dir / "status.json").read_text())
    expected = ("interrupted by SIGTERM (scancel, the time limit or preemption) at round 0 rating: rerun into the "
                "same folder to resume from the last completed stage")
    assert (status["status"], status["error"], status["stage"]) == ("interrupted", expected, "round 0 rating")
    assert status["finished"] is not None
    assert expected in (run_dir / "expertchat.log").read_text()
    assert expected in (tmp_path / "term.log").read_text()
    assert not (run_dir / ".lock").exists()  # released on the way out
    from expertchat.runs.reader import load

    assert load(run_dir).state() == ("interrupted", f"status.json: {expected}")
    run_to_end(run_dir, tmpdir, tmp_path / "rerun.log")
    snap = snapshot(run_dir)
    assert (snap["turns"], snap["ratings"], snap["eval"]) == (reference["turns"], reference["ratings"],
                                                              reference["eval"])
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"


FAULTS = int(os.environ.get("EXPERTCHAT_FAULTS", "3"))  # random kills per harness run in the e2e tier
SLOW_FAULTS = int(os.environ.get("EXPERTCHAT_SLOW_FAULTS", "8"))  # ... and in the slow tier
FAULT_SEED = int(os.environ.get("EXPERTCHAT_FAULT_SEED", "2026"))


def inject_faults(run_dir: Path, tmpdir: Path, logs: Path, n: int, seed: int, span_s: float) -> list[str]:
    """Kill the run into ``run_dir`` ``n`` times (SIGKILL or SIGTERM, seeded), each time rerunning into the same
    folder. The kill moments are ``n`` uniform draws over ``span_s`` (an uninterrupted run's seconds), sorted: attempt
    ``i`` works for the slice between draws ``i-1`` and ``i``, counted from the moment it holds the folder's lock
    (after imports and Hydra), so that the kills land across the whole run, not only after it finished. Returns what
    happened, one line each."""
    import random

    rng = random.Random(seed)
    moments = sorted(rng.uniform(0.0, span_s) for _ in range(n))
    said = []
    for i, (before, at) in enumerate(zip([0.0, *moments], moments)):
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        with (logs / f"fault{i}.log").open("w") as out:
            proc = subprocess.Popen(command(run_dir), cwd=ROOT, env=environment(tmpdir), stdout=out,
                                    stderr=subprocess.STDOUT)
            start = time.monotonic()
            while not (run_dir / ".lock").exists() and proc.poll() is None and time.monotonic() - start < 120:
                time.sleep(POLL_S)
            try:
                proc.wait(timeout=max(at - before, 0.05))
                said.append(f"{i}: ended ({proc.returncode}) before its {signal.Signals(sig).name}")
                assert proc.returncode == 0, (logs / f"fault{i}.log").read_text()[-2000:]
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
                proc.wait(timeout=120)
                stage = json.loads((run_dir / "status.json").read_text()).get("stage") \
                    if (run_dir / "status.json").exists() else None
                said.append(f"{i}: {signal.Signals(sig).name} {at - before:.1f} s into its work (stage: {stage}) "
                            f"-> {proc.returncode}")
                assert proc.returncode in (-sig, 0), (logs / f"fault{i}.log").read_text()[-2000:]
    return said


@pytest.mark.parametrize("n, seed", [
    pytest.param(FAULTS, FAULT_SEED, id="e2e"),
    pytest.param(SLOW_FAULTS, FAULT_SEED + 1, id="slow", marks=pytest.mark.slow),
])
def test_random_kills_resume_to_the_records_of_an_uninterrupted_run(reference, reference_seconds, tmp_path, n, seed):
    """The fault-injection harness: ``n`` random SIGKILL/SIGTERM (seeded) into one folder, each followed by a rerun;
    the end holds the uninterrupted run's records by id, nothing twice, nothing different (EXPERTCHAT_FAULTS,
    EXPERTCHAT_SLOW_FAULTS and EXPERTCHAT_FAULT_SEED change the numbers)."""
    run_dir, tmpdir = tmp_path / "run", tmp_path / "tmp"
    said = inject_faults(run_dir, tmpdir, tmp_path, n, seed, span_s=reference_seconds)
    run_to_end(run_dir, tmpdir, tmp_path / "final.log")
    print(f"\n{n} faults (seed {seed}): " + "; ".join(said))
    snap = snapshot(run_dir)
    for name in ("turns", "ratings", "eval", "metrics"):
        assert snap[name] == reference[name], f"{name}: differs from the uninterrupted run after {said}"
    assert [(r["round"], r["model"]) for r in snap["rewards"]] == \
        [(r["round"], r["model"]) for r in reference["rewards"]]
    assert not (run_dir / ".lock").exists()


@pytest.fixture(scope="module")
def reference_seconds(reference) -> float:
    """How long the reference run took (its status.json), the span the harness's kills are drawn from."""
    return float(reference["seconds"])


def test_a_second_run_into_a_folder_a_live_run_holds_refuses_and_touches_nothing(tmp_path):
    """The case concurrent-run-same-folder (a ``${now:}`` collision, a sweep rerun into its folder): the second run
    stops in one line before Hydra writes anything there, in mode=run and mode=eval."""
    from expertchat.runs.lock import LOCK_FILE, process_start

    holder = subprocess.Popen(["sleep", "120"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / LOCK_FILE).write_text(json.dumps({
            "host": os.uname().nodename, "pid": holder.pid, "process_start": process_start(holder.pid),
            "started": "2026-12-06T08:00:00+00:00", "command": "python -m expertchat +experiment=smoke",
            "slurm_job_id": None}))
        (run_dir / "status.json").write_text('{"status": "running"}')
        before = {p: p.read_bytes() for p in run_dir.rglob("*")}
        for extra in ([f"hydra.run.dir={run_dir}"], ["mode=eval", f"evaluation.run={run_dir}",
                                                     f"hydra.run.dir={tmp_path / 'eval'}"]):
            proc = subprocess.run([sys.executable, "-m", "expertchat", "+experiment=smoke", *extra], cwd=ROOT,
                                  env=environment(tmp_path / "tmp"), capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2, proc.stderr
            (line,) = proc.stderr.strip().splitlines()
            assert line.startswith(f"expertchat: error: a run is in progress in {run_dir} since "
                                   f"2026-12-06T08:00:00+00:00 (process {holder.pid} on this host is alive; command: "
                                   f"python -m expertchat +experiment=smoke): wait for it"), line
            assert {p: p.read_bytes() for p in run_dir.rglob("*")} == before
        assert not (tmp_path / "eval").exists()
    finally:
        holder.kill()
        holder.wait()
