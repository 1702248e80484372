"""``python -m expertchat [+experiment=NAME] [key=value ...]``: the Hydra entrypoint.

Configuration errors (an unknown option in a config group, a wrong type, a bad value, a missing file) end
the run with one line naming the key or path and the fix, and exit code 2; ``HYDRA_FULL_ERROR=1`` shows the
traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from expertchat.config.schema import CONF, register, renamed, to_config
from expertchat.errors import ExpertChatError, first_line

CONF_DIR = str(CONF)
log = logging.getLogger("expertchat")

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                     "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)
register()


def fail(message: str) -> None:
    """Print one error line and exit 2 (or re-raise for a full traceback under HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"expertchat: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> None:
    from expertchat.modes import registry as modes
    from expertchat.runs import jobs

    job = jobs.current_job(default_dir=cfg.get("run_dir"))
    threads = jobs.cpu_threads()  # the CPUs this job was given (never the node's core count), or OMP_NUM_THREADS
    jobs.set_threads(threads, why=jobs.threads_reason())  # the console says it after the key choices
    status = jobs.JobStatus(job.run_dir, job.overrides, threads)
    status.start()
    try:
        modes.run(to_config(cfg))
    except (ExpertChatError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in WRITE_ERRORS:
            status.end(f"{type(exc).__name__}: {first_line(exc)}")
            raise
        message = str(exc) if isinstance(exc, ExpertChatError) else write_error(exc)
        status.end(message)
        if job.multirun:  # raise, not exit: Hydra records the failure and the sweep's other jobs run
            log.error("%s", message)
            raise jobs.JobFailed(f"job {job.num} ({' '.join(job.overrides)}): {message}") from None
        fail(message)
    except BaseException as exc:
        status.end(f"{type(exc).__name__}: {first_line(exc)}")
        raise
    status.end()


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


def preflight(overrides: list[str]) -> None:
    """Compose the config once before Hydra does, to turn composition errors into one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf import open_dict

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        with open_dict(cfg):
            cfg.run_dir = "."  # ${hydra:runtime.output_dir} only resolves inside a Hydra job
        to_config(cfg)  # ranges and values: fail before Hydra writes anything into the run folder
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


def check_run_dir(args: list[str]) -> None:
    """The run folder (``hydra.run.dir``, else ``outputs/``) must take a file before Hydra writes its config and
    log there: a read-only or full disk is one line here, not a traceback from Hydra's logging set-up."""
    if any(a.startswith("-") for a in args):
        return  # a sweep writes under hydra.sweep.dir; --help, --cfg and the like write nothing
    given = [a.partition("=")[2] for a in args if a.startswith("hydra.run.dir=")]
    path = Path(given[-1] if given else "outputs").expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
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


def end_sweep(code: int | str | None, swept: list[str] | None) -> None:
    """Print the sweep's table of jobs (jobs.sweep_lines) and exit non-zero when any job did not finish."""
    from expertchat.runs import jobs

    sweep = jobs.SweepCallback.sweep_dir
    if sweep is None:  # the sweep never started (a composition error, --help, --cfg)
        sys.exit(code)
    for line in jobs.sweep_lines(sweep, swept or None, ended=True):
        print(line)
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


def main() -> None:
    args = sys.argv[1:]
    checks = os.environ.get("HYDRA_FULL_ERROR") != "1"
    multirun = any(a in ("-m", "--multirun") for a in args)
    if checks:
        check_renamed(args)
        check_run_dir(args)
    if not multirun:
        if checks and not any(a.startswith("-") for a in args):
            preflight(args)
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
        app()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    end_sweep(code, job[1] if job else None)


if __name__ == "__main__":
    main()
