"""The driver: the loop that runs a run's stages in order, the same code on a laptop and in a pod.

For each stage of the pipeline table it asks the workspace (the truth) what is done; shards whose
records list files that are missing or of the wrong size are set aside and redone; it hands the
missing shards to an executor (local processes or Kubernetes Jobs) and, when the executor returns,
checks in the workspace that every shard is committed before the next stage starts. A driver that
dies and restarts rebuilds its whole view from the workspace, so it can be killed at any point.

One driver per run: :func:`exclusive_driver` holds a lease in the run's folder
(``_driver/lease.json``, :mod:`inpars.leases`) while it drives, so a second driver (a laptop's
``resume`` while a driver Job runs, two ``--detach``) is refused instead of racing it, and a driver
whose pod died is replaced as soon as its lease expires.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import EXIT_PERMANENT, InParsError, TransientError
from ..leases import Lease, ShardBusy
from ..pipeline import stages_for
from .plan import StageJob, data_size, plan_pipeline, plan_stage

if TYPE_CHECKING:
    from ..workspace import Run

DRIVER_LEASE_KEY = "_driver/lease.json"  # under the run's folder: which driver drives the run, until when


class StageFailed(InParsError):
    """A stage ended with shards that did not commit. ``permanent`` when every failed shard hit a
    permanent error (bad input or config: resuming will not help until it is fixed)."""

    def __init__(self, message: str, result=None, *, permanent: bool | None = None):
        super().__init__(message)
        self.result = result
        if permanent is None:
            failed = getattr(result, "failed", None) or []
            permanent = bool(failed) and all(s.returncode == EXIT_PERMANENT for s in failed)
        self.permanent = permanent


class DriverBusy(TransientError):
    """Another driver holds the run (its lease is live): this one does not drive it."""


def driver_lease(run: Run) -> Lease:
    """The run's driver lease (not acquired)."""
    return Lease(run.storage, DRIVER_LEASE_KEY)


def driver_holder(run: Run) -> dict[str, Any] | None:
    """Who drives the run now (``{host, pid, renewed_at, expires_at}``), None when no live driver holds it."""
    info = driver_lease(run).current()
    if info and float(info.get("expires_at") or 0) > time.time():
        return info
    return None


def describe_holder(info: dict[str, Any]) -> str:
    ago = max(0.0, time.time() - float(info.get("renewed_at") or 0))
    return f"host {info.get('host')}, pid {info.get('pid')}, renewed {ago:.0f} s ago"


@contextlib.contextmanager
def exclusive_driver(run: Run, *, wait: float | None = None, say: Callable[[str], None] = lambda text: None) -> Iterator[Lease]:
    """Hold the run's driver lease while the block runs (a heartbeat renews it); raise :class:`DriverBusy`
    when another driver still holds it after ``wait`` seconds. The default wait outlasts one lease
    time: a driver that died (a deleted pod, a lost node) leaves a lease that expires by then, so its
    replacement takes over; a live driver keeps renewing, so a second one is refused."""
    lease = driver_lease(run)
    if wait is None:
        wait = 1.25 * lease.seconds + 2
    holder = driver_holder(run)
    if holder:
        say(f"run {run.run_id}: another driver holds it ({describe_holder(holder)}); waiting up to {wait:.0f} s for it to let go")
    try:
        lease.acquire(wait=wait, poll=min(1.0, lease.seconds / 4))
    except ShardBusy:
        holder = driver_holder(run) or {}
        raise DriverBusy(
            f"run {run.run_id} is being driven by another driver ({describe_holder(holder)}); "
            "not starting a second one (`inpars-launch status` shows the run, `cancel` stops it)"
        ) from None
    if lease.taken_over:
        say(f"run {run.run_id}: took over from a driver that stopped ({describe_holder(lease.taken_over)})")
    try:
        yield lease
    finally:
        lease.release()


class Executor(Protocol):
    """Runs some shards of one stage; returns when they are finished (raises :class:`StageFailed`)."""

    def run_shards(self, job: StageJob, shards: Sequence[int], run: Run) -> object: ...


@dataclass
class StageOutcome:
    stage: str
    status: str  # skipped | done
    shards: int
    ran: list[int] = field(default_factory=list)
    redone: list[int] = field(default_factory=list)  # shards set aside as invalid and redone
    seconds: float = 0.0
    result: object = None  # what the executor reported for the shards it ran (its own type)


def plan_run(run: Run, *, until: str | None = None, max_retries: int = 3) -> list[StageJob]:
    """The run's stages as jobs, planned now (from the run's current settings)."""
    return plan_pipeline(run.config, run.uri, max_retries=max_retries, until=until, data=data_size(run))


def drive(
    run: Run,
    executor: Executor,
    *,
    until: str | None = None,
    max_retries: int = 3,
    say: Callable[[str], None] = lambda text: None,
    repairs: int = 0,
    lease: Lease | None = None,
) -> list[StageOutcome]:
    """Run every stage of ``run`` that is not committed yet, in order, through ``executor``.

    ``lease``: the driver lease held for the run (:func:`exclusive_driver`); checked before each
    stage is handed to the executor, so a driver that lost it (it stalled past the lease and another
    took over) stops instead of submitting twice."""
    check_pinned_corpus(run)
    outcomes = []
    for stage in stages_for(run.config, until):
        # Planned when it runs: pods are sized from the prepare record once prepare is committed.
        job = plan_stage(run.config, stage, run.uri, max_retries=max_retries, data=data_size(run))
        started = time.monotonic()
        status = run.stage_status(stage.name, job.shards)
        for i in status["invalid"]:
            run.invalidate(stage.name, i, job.shards, "a file it lists is missing or has the wrong size")
        missing = status["missing"]
        outcome = StageOutcome(stage.name, "skipped", job.shards, redone=list(status["invalid"]))
        if not missing:
            say(f"{stage.name}: all {job.shards} shard(s) committed, skipped")
            outcomes.append(outcome)
            continue
        for upstream in stage.inputs:
            run.require_complete(upstream, stages_shards(run, upstream), needed_by=stage.name)
        if len(missing) < job.shards:
            say(f"{stage.name}: {len(missing)} of {job.shards} shard(s) to run")
        if lease is not None:
            lease.check()
        try:
            result = executor.run_shards(job, missing, run)
        except StageFailed:
            # A worker may have failed on a corrupted input (a flipped byte keeps the size, so only a
            # reader's sha256 check sees it): check the inputs fully, set bad shards aside, redo them.
            if repairs < MAX_REPAIRS and repair_inputs(run, stage.inputs, say):
                return outcomes + drive(run, executor, until=until, max_retries=max_retries, say=say, repairs=repairs + 1, lease=lease)
            raise
        still = run.stage_status(stage.name, job.shards)["missing"]
        if still:
            raise StageFailed(
                f"stage {stage.name}: the executor finished but shards {', '.join(map(str, still[:20]))} are not committed "
                "in the workspace; resume the run",
                permanent=False,
            )
        outcome.status, outcome.ran, outcome.seconds, outcome.result = "done", list(missing), time.monotonic() - started, result
        outcomes.append(outcome)
    return outcomes


def check_pinned_corpus(run: Run) -> None:
    """Stop a resume whose corpus source is no longer the corpus the run was prepared from.

    A local (or packaged) corpus is compared by sha256 (about 2 s a GB, once per machine until the file
    changes: :func:`~inpars.workspace.verified_before`); a gs:// one by size only (hashing
    it would mean downloading it on the launcher). Workers read the pinned store, never the source,
    so a changed source cannot mix into a prepared run; this says so before anything is submitted.
    """
    from ..datasets import corpus_source_bytes, local_corpus_file
    from ..files import file_sha256
    from ..workspace import check_same_corpus, mark_verified, verified_before

    pinned = run.corpus_pin()
    if pinned is None:
        return
    source = run.config.data.corpus
    try:
        file = local_corpus_file(source)
    except InParsError:
        return  # the source is gone: the workers read only the pinned store, so the run can go on
    if file is not None:
        if not verified_before(file, pinned["sha256"]):  # hashed once per machine, again once it changed
            check_same_corpus(pinned, str(file), sha256=file_sha256(file))
            mark_verified(file, pinned["sha256"])
        return
    # gs:// (an irds: id has no size here: nothing to compare)
    check_same_corpus(pinned, source, size=corpus_source_bytes(source))


MAX_REPAIRS = 2  # rounds of "an input was corrupt: redo it" before a failure is reported as it is


def repair_inputs(run: Run, inputs: Sequence[str], say: Callable[[str], None]) -> list[tuple[str, int]]:
    """Check every committed file of the ``inputs`` stages against its record (sha256 too) and set
    the bad shards aside (so they are redone); the shards set aside."""
    bad = []
    for stage in inputs:
        count = stages_shards(run, stage)
        for i in range(count):
            problems = run.verify_shard(stage, i, count, deep=True)
            if problems and run.shard_done(stage, i, count):
                say(f"{stage} shard {i}: {'; '.join(problems)}: setting it aside to redo it")
                run.invalidate(stage, i, count, "; ".join(problems))
                bad.append((stage, i))
    return bad


def drive_exclusively(
    run: Run,
    executor: Executor,
    *,
    until: str | None = None,
    max_retries: int = 3,
    say: Callable[[str], None] = lambda text: None,
    wait: float | None = None,
) -> list[StageOutcome]:
    """:func:`drive` while holding the run's driver lease (:func:`exclusive_driver`): what every
    launcher command that drives a run calls, on a laptop and in a driver pod."""
    with exclusive_driver(run, wait=wait, say=say) as lease:
        return drive(run, executor, until=until, max_retries=max_retries, say=say, lease=lease)


def stages_shards(run: Run, stage: str) -> int:
    from ..pipeline import get_stage

    return get_stage(stage).shards(run.config)
