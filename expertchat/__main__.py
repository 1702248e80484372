"""``python -m expertchat [+experiment=NAME] [key=value ...]``: the Hydra entrypoint.

Configuration errors (an unknown option in a config group, a wrong type, a bad value, a missing file) end
the run with one line naming the key or path and the fix, and exit code 2; ``HYDRA_FULL_ERROR=1`` shows the
traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from expertchat.config.schema import CONF, register, renamed, to_config
from expertchat.errors import ExpertChatError, first_line

CONF_DIR = str(CONF)
log = logging.getLogger("expertchat")

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                     "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)
register()


def fail(message: str) -> NoReturn:
    """Print one error line and exit 2 (or re-raise for a full traceback under HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"expertchat: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> None:
    from expertchat.modes import registry as modes
    from expertchat.runs import jobs, signals
    from expertchat.runs.lock import RunLock, written_folders

    job = jobs.current_job(default_dir=cfg.get("run_dir"))
    threads = jobs.cpu_threads()  # the CPUs this job was given (never the node's core count), or OMP_NUM_THREADS
    jobs.set_threads(threads, why=jobs.threads_reason())  # the console says it after the key choices
    status = jobs.JobStatus(job.run_dir, job.overrides, threads)
    folders = written_folders(job.run_dir, cfg)
    lock = RunLock(folders, force=cfg.get("resume") == "force")
    try:  # before status.json: a run refused here leaves the folder's running job untouched
        lock.acquire()
    except ExpertChatError as exc:
        refuse(job, str(exc))
    for line in lock.taken_over:
        log.warning("%s", line)
    if status.fields["restarts"]:
        log.info("requeued by Slurm (restart %d of job %s): resuming from the last completed stage",
                 status.fields["restarts"], status.fields["slurm_job_id"])
    guard = signals.Guard(lambda message: (log.error("%s", message), status.end(message, status="interrupted")),
                          stage=lambda: status.stage)
    try:
        status.start()
        with guard:
            modes.run(to_config(cfg))
    except (ExpertChatError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in WRITE_ERRORS:
            status.end(f"{type(exc).__name__}: {first_line(exc)}")
            raise
        message = str(exc) if isinstance(exc, ExpertChatError) else write_error(exc)
        status.end(message)
        refuse(job, message)
    except BaseException as exc:  # signals.Interrupted included: main() then ends the process by its signal
        if guard.message is not None:  # e.g. submitit's requeue on SIGUSR2 exits through here
            status.end(guard.message, status="interrupted")
        else:
            status.end(f"{type(exc).__name__}: {first_line(exc)}")
        raise
    else:
        status.end()  # before the lock goes: a folder without a lock never says running
    finally:
        lock.release()


def refuse(job: Any, message: str) -> None:
    """End the job with one error line: exit 2 for a single run; in a multirun, raise so that Hydra records the
    failure and the sweep's other jobs run."""
    from expertchat.runs import jobs

    if job.multirun:
        log.error("%s", message)
        raise jobs.JobFailed(f"job {job.num} ({' '.join(job.overrides)}): {message}") from None
    fail(message)


WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT}


def write_error(exc: OSError) -> str:
    """One line for a run folder that cannot be written (full disk, read-only, no permission, quota). Files are
    written whole and renamed into place, so nothing half-written is left; rerunning resumes.

    >>> write_error(OSError(28, "No space left on device", "/runs/a/ratings.jsonl")).split(";")[0]
    'cannot write /runs/a/ratings.jsonl: No space left on device'
    """
    where = exc.filename or "the run folder"
    return (f"cannot write {where}: {exc.strerror}; free space or choose another folder (hydra.run.dir=...), then "
            f"rerun into the same folder to resume")


def preflight(overrides: list[str]) -> Path:
    """Compose the config once before Hydra does, to turn composition errors into one line.

    Returns:
        the run folder Hydra will use (``hydra.run.dir`` resolved and unquoted; ``${now:}`` as of now).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf import open_dict

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).expanduser()
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.run_dir = "."  # ${hydra:runtime.output_dir} only resolves inside a Hydra job
        checked = to_config(cfg)  # ranges and values: fail before Hydra writes anything into the run folder
        if checked.tracker.backend == "wandb":
            from expertchat.report.tracking import wandb_dirs

            wandb_dirs()  # a W&B folder the user set that cannot be written
        return run_dir
    except ExpertChatError as exc:
        fail(str(exc))
    except MissingConfigException as exc:
        missing = str(exc.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        options = ", ".join(exc.options or [])
        fail(f"unknown option '{option}' for config group '{group}'" + (f" (choose from: {options})" if options
                                                                      else f": no file conf/{missing}.yaml"))
    except OverrideParseException as exc:
        bad = next((o for o in overrides if _unparsable(o)), None)
        fail(f"cannot parse the override {bad or ''!r} ({first_line(exc)}): quote its value for Hydra and the shell, "
             f"e.g. \"topics.field='turns[0]'\" or \"rate.input='epoch=9.jsonl'\"")
    except Exception as exc:  # noqa: BLE001 - hydra/omegaconf raise many types; report them as one line
        if first_line(exc).startswith(("Ambiguous value for argument", "Sweep parameters")):
            fail(sweep_in_single_run(str(exc)))
        hint = [line for line in str(exc).splitlines()[1:] if line.strip().lower().startswith(("to ", "use "))]
        if hint and hint[0].strip().startswith("To append to your config"):  # a key the schema does not have
            key = first_line(exc).partition("'")[2].partition("'")[0]
            fail(f"no key '{key}' in the config: check its spelling (expertchat --cfg job lists every key)")
        if hint:  # Hydra's own hint, e.g. "To append to your default list use +experiment=smoke"
            fail(f"{first_line(exc)} {hint[0].strip()}")
        cause = exc.__cause__ or exc.__context__ or exc  # Hydra chains the config error as the context
        first = first_line(cause) or type(cause).__name__
        key = getattr(cause, "full_key", None)
        if key and renamed(key):
            fail(f"{key} was renamed to {renamed(key)} (in a config file or override)")
        fail(f"{first}" + (f" (key: {key})" if key and key not in first else ""))


def sweep_in_single_run(error: str) -> str:
    """One line for a value Hydra reads as a sweep in a single run (``a,b``, ``range()``, ``choice()``), keeping
    Hydra's own hints; a number written with a decimal comma (``0,4``) also gets its decimal-point spelling.

    >>> sweep_in_single_run("Ambiguous value for argument 'reward.zeta=0,4'\\n1. To use it as a list, use [a,b]")[48:]
    'a number takes a decimal point (reward.zeta=0.4); to use it as a list, use [a,b]'
    """
    lines = error.splitlines()
    hints = [line.partition(". ")[2] or line for line in lines[1:] if line.strip()]
    if not hints:  # "Sweep parameters 'seed=range(3)' requires --multirun"
        hints = ["to sweep over it, add --multirun (-m) to your command line"]
    override = lines[0].partition("'")[2].rpartition("'")[0]
    key, _, value = override.partition("=")
    if re.fullmatch(r"-?\d+,\d+", value):
        hints.insert(0, f"a number takes a decimal point ({key}={value.replace(',', '.')})")
    return f"{lines[0].rstrip('.')}: " + "; ".join(h[0].lower() + h[1:] for h in hints)


def _unparsable(override: str) -> bool:
    """Whether Hydra's override grammar refuses ``override`` on its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([override])
    except Exception:  # noqa: BLE001 - the grammar's errors
        return True
    return False


def check_renamed(args: list[str]) -> None:
    """A command-line override (also in a multirun sweep) of a key that moved: one line naming its new place."""
    for arg in args:
        key, _, value = arg.partition("=")
        if renamed(key):
            fail(f"{key.lstrip('+~')} was renamed to {renamed(key)}: use {renamed(key)}={value}")


def check_run_dir(path: Path) -> None:
    """The run folder (``hydra.run.dir`` as :func:`preflight` resolved it) must take a file before Hydra writes its
    config and log there: a read-only or full disk is one line here, not a traceback from Hydra's logging set-up.
    Creates nothing: the folder, or the nearest folder above it that exists, takes a temporary file that is gone
    again (a refused command leaves no empty run folder behind)."""
    where = path.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        fail(write_error(OSError(exc.errno, exc.strerror, str(path))))


def first_job(args: list[str]) -> tuple[list[str], list[str]] | None:
    """A multirun's overrides with each sweep replaced by its first value (the first job's config, checked before
    anything is submitted), and the swept keys; None when a sweep cannot be expanded here (e.g. ``glob``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, job, swept = OverridesParser.create(), [], []
    for arg in (a for a in args if not a.startswith("-")):
        try:
            (override,) = parser.parse_overrides([arg])
            if override.is_sweep_override():
                job.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
                swept.append(override.get_key_element().lstrip("+~"))
            else:
                job.append(arg)
        except StopIteration:
            job.append(arg)
        except Exception:  # noqa: BLE001 - Hydra's grammar errors: preflight reports them; glob needs Hydra's loader
            if "," in arg or "(" in arg:
                return None
            job.append(arg)
    return job, swept


def check_sweep(args: list[str], job: list[str] | None) -> None:
    """Before a sweep on Slurm is queued: the launcher answers, a cluster profile has GPU hardware and an account,
    and every job's models are found and its memory plan fits (``expertchat.modes.preflight``); else one line."""
    from expertchat.modes import preflight

    try:
        lines = preflight.check_sweep(args, job)
    except ExpertChatError as exc:
        fail(str(exc))
    for line in lines:
        print(line)


def print_sweep(swept: list[str] | None) -> str | None:
    """Print the table of the sweep this process drove (:func:`expertchat.runs.jobs.sweep_lines`); its folder, or
    None when no sweep started."""
    from expertchat.runs import jobs

    sweep = jobs.SweepCallback.sweep_dir
    if sweep is not None:
        for line in jobs.sweep_lines(sweep, swept or None, ended=True):
            print(line)
    return sweep


def end_sweep(code: int | str | None, swept: list[str] | None) -> None:
    """Print the sweep's table of jobs (jobs.sweep_lines) and exit non-zero when any job did not finish."""
    from expertchat.runs import jobs

    sweep = print_sweep(swept)
    if sweep is None:  # the sweep never started (a composition error, --help, --cfg)
        sys.exit(code)
    try:  # the numbers of each job (held-out reward change, win-rate, length): sweep.md and sweep.png
        from expertchat.report.sweep import write_sweep_report

        print(f"sweep report: {write_sweep_report(sweep)}")
    except Exception as exc:  # noqa: BLE001 - a report must never hide the sweep's own outcome
        print(f"expertchat: warning: no sweep report ({first_line(exc)}); python -m expertchat.report {sweep}",
              file=sys.stderr)
    failed = jobs.sweep_failed(sweep)
    if failed:
        print(f"expertchat: error: {len(failed)} sweep job(s) did not finish: job {', '.join(map(str, failed))} "
              f"(their status.json and expertchat.log say why); the other jobs' results are in {sweep}",
              file=sys.stderr)
        sys.exit(code or 1)
    sys.exit(code)


@contextlib.contextmanager
def ended_by_signal(before: Callable[[], None] | None = None) -> Iterator[None]:
    """A job interrupted by a signal (:mod:`expertchat.runs.signals`; its status and log say so) ends this process
    by the same signal once everything has unwound, so that the shell or scheduler sees the end it expects
    (``$?`` 143 for SIGTERM). ``before``: what to print first (a sweep's table)."""
    from expertchat.runs import signals

    try:
        yield
    except signals.Interrupted as exc:
        if before is not None:
            before()
        print(f"expertchat: {exc.message}", file=sys.stderr)
        signals.die_by(exc.signum)


def main() -> None:
    args = sys.argv[1:]
    checks = os.environ.get("HYDRA_FULL_ERROR") != "1"
    multirun = any(a in ("-m", "--multirun") for a in args)
    if checks:
        check_renamed(args)
    if not multirun:
        if checks and not any(a.startswith("-") for a in args):  # --help, --cfg and the like write nothing
            check_run_dir(preflight(args))
        with ended_by_signal():
            app()
        return
    job = first_job(args)
    if checks:
        if job is not None:
            preflight(job[0])
        check_sweep(args, job[0] if job is not None else None)
    from expertchat.runs import jobs

    logging.getLogger("submitit").addFilter(jobs.QuietSacct())
    try:
        with ended_by_signal(lambda: print_sweep(job[1] if job else None)):
            app()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    end_sweep(code, job[1] if job else None)


if __name__ == "__main__":
    main()
