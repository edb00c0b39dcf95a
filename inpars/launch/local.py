"""The local executor: each stage's shards as subprocesses, the same contract as a Kubernetes Indexed Job.

For every :class:`~inpars.launch.plan.StageJob`, in order, ``command`` runs once per shard with
``JOB_COMPLETION_INDEX=i`` plus the job's ``env``; up to ``max_parallel`` shards at a time. Exit 0 is
success; :data:`~inpars.errors.EXIT_PERMANENT` fails the shard at once; any other code (or a death by
signal) is retried up to ``max_retries`` times. Shards already committed in the workspace are skipped,
so rerunning a pipeline (``inpars-launch resume``) redoes only what is missing. A stage with a failed
shard stops the pipeline after the stage's other shards finish (as ``backoffLimitPerIndex`` does).

Secrets: ``secret_env`` names variables the worker needs (e.g. ``OPENAI_API_KEY``); locally they are
inherited from this process's environment by name, never written to a log, a file or an event.

Logs: one file per attempt, ``<log_dir>/<stage>/shard-<i>.attempt-<k>.log`` (stdout and stderr
together). By default ``<run>/logs`` for a local workspace; for a gs:// workspace the logs stay on
this machine, in ``$INPARS_CACHE/logs/<run-id>`` (see :func:`default_log_dir`).
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EXIT_PERMANENT, InParsError
from ..shards import COMPLETION_INDEX_ENV, HOST_COUNT_ENV, SHARD_INDEXES_ENV, worker_env
from ..storage import cache_root, is_remote
from .driver import StageFailed
from .plan import OPTIONAL_SECRETS, StageJob

if TYPE_CHECKING:
    from ..workspace import Run

TAIL_LINES = 25


@dataclass
class Event:
    """What the executor reports to ``on_event`` (kind: stage_start, shard_skipped, shard_start,
    shard_done, shard_retry, shard_failed, stage_done, warning)."""

    kind: str
    stage: str
    shard: int | None = None
    attempt: int | None = None
    returncode: int | None = None
    log: Path | None = None
    message: str = ""


@dataclass
class ShardResult:
    shard: int
    status: str  # done | skipped | failed
    attempts: int = 0
    returncode: int | None = None
    log: Path | None = None
    seconds: float = 0.0


@dataclass
class StageResult:
    stage: str
    shards: list[ShardResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[ShardResult]:
        return [s for s in self.shards if s.status == "failed"]


def default_log_dir(run: Run) -> Path:
    """``<run>/logs`` for a local workspace; a local folder for a gs:// one (logs are not uploaded)."""
    if is_remote(run.uri):
        return cache_root() / "logs" / run.run_id
    return Path(run.uri) / "logs"


def log_path(log_dir: Path, stage: str, shard: int, attempt: int) -> Path:
    return Path(log_dir) / stage / f"shard-{shard}.attempt-{attempt}.log"


def next_attempt(log_dir: Path, stage: str, shard: int) -> int:
    """The first attempt number with no log yet: a resumed run keeps the crashed attempts' logs."""
    numbers = [
        int(m.group(1))
        for p in (Path(log_dir) / stage).glob(f"shard-{shard}.attempt-*.log")
        if (m := re.search(r"attempt-(\d+)\.log$", p.name))
    ]
    return max(numbers, default=-1) + 1


def tail(path: Path | None, lines: int = TAIL_LINES) -> str:
    """The last lines of a log; progress-bar redraws (``\\r``) count as line breaks."""
    if path is None or not Path(path).exists():
        return ""
    data = Path(path).read_bytes()[-64 * 1024 :].decode("utf-8", "replace")
    parts = [p for p in re.split(r"\r\n|\r|\n", data) if p.strip()]
    return "\n".join(parts[-lines:])


@dataclass
class _Running:
    shard: int
    attempt: int
    proc: subprocess.Popen
    log: Path
    started: float


def run_jobs(
    jobs: Sequence[StageJob],
    *,
    max_parallel: int = 2,
    extra_env: dict[str, str] | None = None,
    on_event: Callable[[Event], None] | None = None,
    skip_done: Callable[[str, int], bool] | None = None,
    run: Run | None = None,
    log_dir: str | os.PathLike | None = None,
    retry_delay: float = 2.0,
    progress: bool | None = None,
) -> list[StageResult]:
    """Run ``jobs`` stage after stage as local subprocesses; the results of every stage.

    ``skip_done(stage, shard)`` says which shards to skip; with ``run`` given it defaults to the
    workspace's completion markers, and progress shows rows from those markers. ``retry_delay``
    seconds (times the attempt number) pass before a retry. ``progress``: a rich progress display
    (default: when stderr is a terminal). Raises :class:`StageFailed` after a stage with failed shards.
    """
    if max_parallel < 1:
        raise InParsError(f"max_parallel must be >= 1, got {max_parallel}")
    if log_dir is None:
        log_dir = default_log_dir(run) if run is not None else Path.cwd() / "inpars-logs"
    if progress is None:
        progress = sys.stderr.isatty()
    emit = on_event or functools.partial(_print_event, quiet=progress)
    results = []
    for job in jobs:
        result = _run_stage(job, max_parallel, extra_env or {}, emit, skip_done, run, Path(log_dir), retry_delay, progress)
        results.append(result)
        if result.failed:
            raise StageFailed(_failure_message(job, result), result)
    return results


class LocalExecutor:
    """The driver's executor for local processes (see :func:`inpars.launch.driver.drive`)."""

    def __init__(
        self,
        *,
        max_parallel: int = 2,
        log_dir: str | os.PathLike | None = None,
        retry_delay: float = 2.0,
        progress: bool | None = None,
        on_event: Callable[[Event], None] | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        if max_parallel < 1:
            raise InParsError(f"max_parallel must be >= 1, got {max_parallel}")
        self.max_parallel, self.log_dir, self.retry_delay = max_parallel, log_dir, retry_delay
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.emit = on_event or functools.partial(_print_event, quiet=self.progress)
        self.extra_env = extra_env or {}

    def run_shards(self, job: StageJob, shards: Sequence[int], run: Run) -> StageResult:
        wanted = set(shards)
        log_dir = Path(self.log_dir) if self.log_dir is not None else default_log_dir(run)
        result = _run_stage(
            job,
            self.max_parallel,
            self.extra_env,
            self.emit,
            lambda stage, i: i not in wanted,
            run,
            log_dir,
            self.retry_delay,
            self.progress,
        )
        if result.failed:
            raise StageFailed(_failure_message(job, result), result)
        return result


def _print_event(event: Event, quiet: bool) -> None:
    """The default ``on_event``: one line per noteworthy event on stderr (shard lines only when no
    progress display shows them)."""
    if event.kind in ("shard_start", "shard_skipped") or (quiet and event.kind == "shard_done"):
        return
    where = event.stage + (f" shard {event.shard}" if event.shard is not None else "")
    text = {
        "stage_start": f"{where}: starting, {event.message}",
        "stage_done": f"{where}: {event.message}",
        "shard_done": f"{where}: done",
        "shard_retry": f"{where}: attempt {event.attempt} exited with {event.returncode}; retrying ({event.log})",
        "shard_failed": f"{where}: failed with exit code {event.returncode} ({event.log})",
        "warning": f"{where}: warning: {event.message}",
    }.get(event.kind, f"{where}: {event.kind} {event.message}")
    print(text, file=sys.stderr, flush=True)


def _env(job: StageJob, extra_env: dict[str, str], shard: int) -> dict[str, str]:
    env = dict(os.environ)
    # The workers are this installation's `inpars` script, also when its venv is not activated.
    scripts = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")]) if scripts else env.get("PATH", "")
    for var in (SHARD_INDEXES_ENV, HOST_COUNT_ENV):
        env.pop(var, None)  # the index below is the real shard number, on one host
    env.update(job.env)
    env.update(extra_env)
    env.update(worker_env(job.shards))
    env[COMPLETION_INDEX_ENV] = str(shard)
    env["INPARS_PARENT_PID"] = str(os.getpid())  # workers stop when this launcher dies (inpars.workers)
    return env


def _run_stage(job, max_parallel, extra_env, emit, skip_done, run, log_dir, retry_delay, progress) -> StageResult:
    started = time.monotonic()
    result = StageResult(job.stage)
    emit(Event("stage_start", job.stage, message=f"{job.shards} shard(s)"))
    for var in job.secret_env:
        if var not in OPTIONAL_SECRETS and not os.environ.get(var):
            emit(Event("warning", job.stage, message=f"${var} is not set; the {job.stage} workers may fail without it"))
    pending: list[tuple[int, int, float]] = []  # (shard, attempt, not before)
    first_attempt: dict[int, int] = {}
    outcome: dict[int, ShardResult] = {}
    if skip_done is None and run is not None:
        missing = set(run.missing_shards(job.stage, job.shards))  # one listing, not one request per shard

        def skip_done(stage: str, i: int) -> bool:
            return i not in missing

    for i in range(job.shards):
        if skip_done is not None and skip_done(job.stage, i):
            outcome[i] = ShardResult(i, "skipped")
            emit(Event("shard_skipped", job.stage, i))
        else:
            first_attempt[i] = next_attempt(log_dir, job.stage, i)
            pending.append((i, 0, 0.0))
    width = max(1, min(max_parallel, job.parallelism or max_parallel))
    display = _Progress(job, run, len(outcome)) if progress else None
    running: list[_Running] = []
    try:
        while pending or running:
            now = time.monotonic()
            for item in sorted(pending, key=lambda p: (p[2], p[0])):
                if len(running) >= width:
                    break
                shard, attempt, not_before = item
                if not_before > now:
                    continue
                pending.remove(item)
                running.append(_start(job, shard, attempt, extra_env, log_dir, first_attempt.get(shard, 0)))
                emit(Event("shard_start", job.stage, shard, attempt, log=running[-1].log))
            time.sleep(0.05)
            for r in list(running):
                rc = r.proc.poll()
                if rc is None:
                    continue
                running.remove(r)
                seconds = time.monotonic() - r.started
                if rc == 0:
                    outcome[r.shard] = ShardResult(r.shard, "done", r.attempt + 1, rc, r.log, seconds)
                    emit(Event("shard_done", job.stage, r.shard, r.attempt, rc, r.log))
                    if display:
                        display.advance()
                elif rc != EXIT_PERMANENT and r.attempt < job.max_retries:
                    pending.append((r.shard, r.attempt + 1, time.monotonic() + retry_delay * (r.attempt + 1)))
                    emit(Event("shard_retry", job.stage, r.shard, r.attempt, rc, r.log, tail(r.log, 3)))
                else:
                    outcome[r.shard] = ShardResult(r.shard, "failed", r.attempt + 1, rc, r.log, seconds)
                    emit(Event("shard_failed", job.stage, r.shard, r.attempt, rc, r.log, tail(r.log)))
    except BaseException:
        # Ctrl-C or an error here: take our workers down with us (each runs in its own process group).
        for r in running:
            _stop(r.proc)
        raise
    finally:
        if display:
            display.close()
    result.shards = [outcome[i] for i in sorted(outcome)]
    result.seconds = time.monotonic() - started
    emit(
        Event(
            "stage_done",
            job.stage,
            message=f"{sum(s.status == 'done' for s in result.shards)} done, "
            f"{sum(s.status == 'skipped' for s in result.shards)} skipped, "
            f"{len(result.failed)} failed",
        )
    )
    return result


def _start(job: StageJob, shard: int, attempt: int, extra_env: dict[str, str], log_dir: Path, offset: int = 0) -> _Running:
    path = log_path(log_dir, job.stage, shard, offset + attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as log:
        # Its own session, so a stop reaches the worker's children too (dataloaders, servers).
        proc = subprocess.Popen(
            job.command,
            env=_env(job, extra_env, shard),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return _Running(shard, attempt, proc, path, time.monotonic())


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _failure_message(job: StageJob, result: StageResult) -> str:
    lines = [f"stage {job.stage} failed: {len(result.failed)} of {job.shards} shard(s) did not complete"]
    for s in result.failed:
        why = "permanent error, not retried" if s.returncode == EXIT_PERMANENT else f"after {s.attempts} attempt(s)"
        lines.append(f"-- {job.stage} shard {s.shard} exited with {s.returncode} ({why}); log {s.log}; last lines:")
        lines.append(tail(s.log) or "(no output)")
    lines.append("fix the cause, then resume: shards already committed are not redone")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar per stage: shards done/total, rows (from completion markers), rate, ETA."""

    def __init__(self, job: StageJob, run: Run | None, already: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.job, self.run = job, run
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards"),
            TextColumn("{task.fields[rows]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.start()
        self.started = time.monotonic()
        self.rows0 = self._count()
        self.task = self.progress.add_task(job.stage, total=job.shards, completed=already, rows=self._rows())

    def _count(self) -> int | None:
        if self.run is None:
            return None
        try:
            return self.run.stage_status(self.job.stage, self.job.shards)["rows"]
        except Exception:  # progress must never break the run
            return None

    def _rows(self) -> str:
        rows = self._count()
        if rows is None:
            return ""
        rate = (rows - (self.rows0 or 0)) / max(time.monotonic() - self.started, 1e-9)
        return f"{rows} rows ({rate:.1f}/s)"

    def advance(self) -> None:
        self.progress.update(self.task, advance=1, rows=self._rows())

    def close(self) -> None:
        self.progress.stop()


# ----------------------------------------------------------------------------- status and logs


def stage_rows(run: Run, jobs: Sequence[StageJob]) -> list[dict[str, Any]]:
    """Per stage, from the workspace alone: shards, done, missing, partial (started: checkpoint
    chunks but no commit — running, or failed: the workspace cannot tell which) and rows."""
    rows = []
    for job in jobs:
        s = run.stage_status(job.stage, job.shards)
        rows.append(
            {
                "stage": job.stage,
                "shards": job.shards,
                "done": len(s["done"]),
                "missing": s["missing"],
                "partial": s["partial"],
                "rows": s["rows"],
            }
        )
    return rows


def _ids(ids: list[int], limit: int = 12) -> str:
    if not ids:
        return "-"
    text = ", ".join(map(str, ids[:limit]))
    return text + (f" (+{len(ids) - limit})" if len(ids) > limit else "")


def stage_table(run: Run, jobs: Sequence[StageJob]):
    """A rich Table for ``inpars-launch status RUN`` (see :func:`stage_rows`), with each unfinished
    stage's progress as its workers last noted it (rows or steps done of total, rate, ETA)."""
    from rich.table import Table

    table = Table(
        title=f"run {run.run_id}",
        caption="partial = started (checkpoints) but not committed: running or failed; invalid = files missing, redone on resume",
    )
    for col, justify in (
        ("stage", "left"),
        ("done", "right"),
        ("missing", "left"),
        ("partial", "left"),
        ("invalid", "left"),
        ("rows", "right"),
        ("progress", "left"),
    ):
        table.add_column(col, justify=justify)
    for job, r in zip(jobs, stage_rows(run, jobs)):
        status = run.stage_status(job.stage, job.shards)
        state = "green" if not r["missing"] else ("yellow" if r["done"] else "")
        progress = run.stage_progress(job.stage, r["missing"], job.shards) if r["missing"] else None
        table.add_row(
            f"[{state}]{r['stage']}[/]" if state else r["stage"],
            f"{r['done']}/{r['shards']}",
            _ids(r["missing"]),
            _ids(r["partial"]),
            _ids(status["invalid"]),
            str(r["rows"]),
            format_progress(progress),
        )
    return table


def format_progress(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    text = f"{p['done']}/{p['total']} {p['unit']}" if p["total"] else f"{p['done']} {p['unit']}"
    if p.get("rate"):
        text += f", {p['rate']:.1f}/s"
    if p.get("eta") is not None:
        text += f", ETA {int(p['eta']) // 60}m{int(p['eta']) % 60:02d}s"
    return text


def read_logs(run: Run, stage: str, index: int | None = None, log_dir: str | os.PathLike | None = None) -> str:
    """The local executor's logs of a stage (every shard, or one), last attempt last."""
    folder = Path(log_dir or default_log_dir(run)) / stage
    if not folder.is_dir():
        return f"no local logs for {stage} under {folder}"

    def key(p: Path):
        m = re.match(r"shard-(\d+)\.attempt-(\d+)\.log$", p.name)
        return (int(m.group(1)), int(m.group(2))) if m else (1 << 30, 0)

    paths = sorted((p for p in folder.glob("shard-*.log") if index is None or p.name.startswith(f"shard-{index}.")), key=key)
    if not paths:
        return f"no local logs for {stage}{'' if index is None else f' shard {index}'} under {folder}"
    return "\n".join(f"==> {p} <==\n{p.read_text(errors='replace')}" for p in paths)
