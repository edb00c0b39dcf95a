"""The Kubernetes executor: submit a run's stage Jobs, watch them, resume, report, cancel.

Manifests come from :mod:`inpars.launch.k8s_manifests`. The workspace (a ``gs://`` prefix) is the
truth about what is done; Jobs are only the means, so a launcher can die, restart, and pick its Jobs
up again by label. The driver (:func:`inpars.launch.driver.drive`) runs the stage loop and hands
each stage's missing shards to :meth:`K8sExecutor.run_shards`; what the executor itself asks the
workspace is one question, :class:`CommittedShards`.

Watching: the watch API, reopened whenever a stream ends (server timeout, dropped connection, 410
Gone); every ``check_interval`` seconds without news the Job is re-read and its pods looked at. Work
that cannot start is reported, not shown as "running" for ever: pods Pending (ImagePullBackOff,
Unschedulable, ...) or a Job left suspended by Kueue are shown with their reasons, and after the
stage's pending deadline with no progress the Job is deleted and the stage fails with them.

A Job that disappears: a DELETED event of a finished Job (its TTL) counts as that finish; of an
unfinished one, as a cancel. A Job found missing (404: the events were missed, e.g. the laptop slept
through the TTL) makes the executor ask the workspace: committed -> go on; not committed -> submit
it again (unless the Job was seen running less than a TTL ago: then someone deleted it).

The driver Job (``--detach``, :func:`~inpars.launch.k8s_manifests.render_driver`) is submitted by
:meth:`K8sExecutor.submit_driver`: its name is one per run, so a live one refuses a second
(:class:`DriverRunning`) and a finished one is replaced; ``cancel`` deletes it before the stage Jobs.

Tested against kmock (an in-memory API server without selectors, resourceVersions or PUT), so every
list is also filtered client-side and every watch loop stops on its own terminal condition.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, TransientError
from ..shards import SHARD_COUNT_ENV
from . import kueue
from .driver import StageFailed
from .k8s_manifests import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX_LABEL,
    CONTAINER,
    DEFAULT_PENDING_DEADLINE_SECONDS,
    DEFAULT_SERVICE_ACCOUNT,
    DRIVER_CONTAINER,
    DRIVER_STAGE,
    JOB_NAME_LABEL,
    JOBSET_GROUP,
    JOBSET_NAME_LABEL,
    JOBSET_PLURAL,
    JOBSET_VERSION,
    PENDING_DEADLINE_ANNOTATION,
    RUN_ANNOTATION,
    RUN_IDS_ANNOTATION,
    RUN_LABEL,
    SHARDS_ANNOTATION,
    STAGE_LABEL,
    format_indexes,
    parse_indexes,
    render_stage,
    run_label,
    stage_tpu_slice,
)
from .plan import StageJob

if TYPE_CHECKING:
    from ..workspace import Run

CANCELLED_ANNOTATION = "inpars.io/cancelled"  # set by cancel() just before deleting: not a TTL


# --------------------------------------------------------------------------------------------
# Progress and errors


@dataclass
class JobProgress:
    """Where one stage Job stands; shard numbers are the stage's real shard indexes."""

    name: str
    stage: str
    run_id: str
    shard_count: int  # the stage's full shard count
    shards: list[int]  # the shards this Job runs (completion index i runs shards[i])
    completed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    active: int = 0
    state: str = "running"  # queued | running | complete | failed
    reason: str | None = None
    message: str | None = None
    kind: str = "Job"  # Job | JobSet
    waiting: list[str] = field(default_factory=list)  # why pods are Pending / the Job is queued

    @property
    def finished(self) -> bool:
        return self.state in ("complete", "failed")

    def __str__(self) -> str:
        text = f"{self.stage}: {len(self.completed)}/{len(self.shards)} shards done, {self.active} running"
        if self.failed:
            text += f", failed shards {format_indexes(self.failed)}"
        text += f" [{self.state}]"
        if self.waiting and not self.finished:
            text += " waiting: " + "; ".join(self.waiting[:3])
        return text


def _containers(pod_template: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return ((pod_template.get("spec") or {}).get("containers")) or [{}]


def progress_of(obj: Mapping[str, Any]) -> JobProgress:
    """A :class:`JobProgress` from a Job or JobSet in wire form."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    kind = obj.get("kind") or "Job"
    if kind == "JobSet":
        rjobs = spec.get("replicatedJobs") or [{}]
        job_spec = (rjobs[0].get("template") or {}).get("spec") or {}
    else:
        job_spec = spec
    shards = parse_indexes(annotations.get(SHARDS_ANNOTATION)) or list(range(spec.get("completions") or 1))
    count = spec.get("completions") or len(shards)
    for e in _containers(job_spec.get("template") or {})[0].get("env") or []:
        if e.get("name") == SHARD_COUNT_ENV and e.get("value"):
            count = int(e["value"])

    def real(indexes: str | None) -> list[int]:
        return sorted(shards[i] for i in parse_indexes(indexes) if i < len(shards))

    progress = JobProgress(
        name=meta.get("name", ""),
        stage=labels.get(STAGE_LABEL, ""),
        run_id=annotations.get(RUN_ANNOTATION) or labels.get(RUN_LABEL, ""),
        shard_count=count,
        shards=shards,
        state="queued" if spec.get("suspend") else "running",
        kind=kind,
    )
    if kind == "JobSet":
        progress.active = sum(int(r.get("active") or 0) for r in status.get("replicatedJobsStatus") or [])
    else:
        progress.completed = real(status.get("completedIndexes"))
        progress.failed = real(status.get("failedIndexes"))
        progress.active = status.get("active") or 0
    for cond in status.get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        if cond.get("type") in ("Complete", "Completed"):
            progress.state = "complete"
            if kind == "JobSet":
                progress.completed = list(shards)
        elif cond.get("type") == "Failed":
            progress.state, progress.reason, progress.message = "failed", cond.get("reason"), cond.get("message")
            if kind == "JobSet":
                progress.failed = list(shards)
    return progress


class JobFailedError(RuntimeError):
    """A stage Job failed; names the failed shards and carries the tail of their logs."""

    def __init__(self, progress: JobProgress, logs: Mapping[int, str]):
        self.progress, self.logs = progress, dict(logs)
        p = progress
        lines = [f"stage {p.stage!r} failed ({p.kind} {p.name}): " + (p.reason or "Failed") + (f": {p.message}" if p.message else "")]
        if p.failed:
            lines.append(f"failed shards: {format_indexes(p.failed)} of {p.shard_count}")
        for shard, text in sorted(self.logs.items()):
            lines.append(f"--- last log lines of shard {shard} ---")
            lines.append(text.rstrip() or "(no log)")
        lines.append("Fix the cause, then resume the run: finished shards are kept, only the missing ones rerun.")
        super().__init__("\n".join(lines))


class JobDeletedError(JobFailedError):
    """The Job was deleted before it finished: cancelled (``inpars-launch cancel``) or by hand."""


class JobMissingError(JobFailedError):
    """The Job is gone (404) and its end was not seen: ``last_seen`` (the executor's clock) is when
    it was last seen unfinished, None if never."""

    def __init__(self, progress: JobProgress, last_seen: float | None):
        self.last_seen = last_seen
        super().__init__(progress, {})


class JobStuckError(JobFailedError):
    """The Job made no progress for its pending deadline: pods Pending or the Job left queued."""


class DriverRunning(TransientError):
    """A driver Job of that name is live: a second driver for the same run is not started."""

    def __init__(self, name: str, namespace: str):
        self.name = name
        super().__init__(f"a driver is already running for this run: Job {name} in namespace {namespace}")


class CommittedShards(Protocol):
    """What the executor asks the workspace (``inpars.workspace.Run`` answers it): which shards of a
    stage are not committed yet."""

    def missing_shards(self, stage: str, n: int) -> list[int]: ...


def pod_waiting_reason(pod: Mapping[str, Any]) -> str | None:
    """Why a pod has not started (``ImagePullBackOff: ...``, ``Unschedulable: ...``), None if it has."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] not in ("ContainerCreating", "PodInitializing"):
            return f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and str(cond.get("status")) == "False":
            return f"{cond.get('reason') or 'Unschedulable'}: {cond.get('message') or ''}".rstrip(": ")
    return "Pending"


def _wire(api_client: Any, obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else api_client.sanitize_for_serialization(obj)


# --------------------------------------------------------------------------------------------
# Job and JobSet, behind one small interface


class _Jobs:
    """batch/v1 Jobs in one namespace."""

    kind = "Job"

    def __init__(self, api: Any, namespace: str):
        from kubernetes import client

        self.api, self.namespace = api, namespace
        self.batch = client.BatchV1Api(api)

    def create(self, manifest: dict[str, Any]) -> None:
        self.batch.create_namespaced_job(self.namespace, manifest)

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return _wire(self.api, self.batch.read_namespaced_job(name, self.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, selector: str) -> list[dict[str, Any]]:
        return [_wire(self.api, o) for o in self.batch.list_namespaced_job(self.namespace, label_selector=selector).items]

    def stream(self, name: str, timeout: int, read_timeout: float) -> Iterator[tuple[str, dict[str, Any]]]:
        from kubernetes import watch

        w = watch.Watch()
        try:
            for event in w.stream(
                self.batch.list_namespaced_job,
                self.namespace,
                field_selector=f"metadata.name={name}",
                timeout_seconds=timeout,
                _request_timeout=(10, read_timeout),
            ):
                yield event["type"], _wire(self.api, event["object"])
        finally:
            w.stop()

    def patch(self, name: str, body: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job(name, self.namespace, body)

    def delete(self, name: str) -> None:
        self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")

    def pod_selector(self, name: str) -> tuple[str, str]:
        return JOB_NAME_LABEL, name


class _JobSets(_Jobs):
    """jobset.x-k8s.io JobSets in one namespace (CustomObjectsApi); none when the CRD is absent."""

    kind = "JobSet"

    def __init__(self, api: Any, namespace: str):
        from kubernetes import client

        self.api, self.namespace = api, namespace
        self.custom = client.CustomObjectsApi(api)
        self.args = (JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL)

    def create(self, manifest: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(*self.args, manifest)

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(*self.args, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, selector: str) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.list_namespaced_custom_object(*self.args, label_selector=selector).get("items") or []
        except ApiException as exc:
            if exc.status in (403, 404):  # JobSet not installed, or not granted: none of ours
                return []
            raise

    def stream(self, name: str, timeout: int, read_timeout: float) -> Iterator[tuple[str, dict[str, Any]]]:
        from kubernetes import watch

        w = watch.Watch()
        try:
            for event in w.stream(
                self.custom.list_namespaced_custom_object,
                *self.args,
                field_selector=f"metadata.name={name}",
                timeout_seconds=timeout,
                _request_timeout=(10, read_timeout),
            ):
                yield event["type"], event["object"]
        finally:
            w.stop()

    def patch(self, name: str, body: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(*self.args, name, body)

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(*self.args, name, propagation_policy="Background")

    def pod_selector(self, name: str) -> tuple[str, str]:
        return JOBSET_NAME_LABEL, name


@dataclass
class _Watched:
    """What one watch has seen, on the executor's clock."""

    started: float
    last_progress: float  # when a pod last ran or a shard last completed
    last_seen: float | None = None  # when the Job was last seen unfinished
    last_check: float = 0.0
    completed: int = -1


# --------------------------------------------------------------------------------------------
# The executor


class K8sExecutor:
    """Submits, watches, resumes and cancels a run's stage Jobs in one namespace.

    ``api_client``: a configured ``kubernetes.client.ApiClient``; default: the kubeconfig, else the
    in-cluster service account. ``queue``: a Kueue LocalQueue; each Job is checked against it before
    submission (:mod:`inpars.launch.kueue`). ``max_parallel_pods``: a run-wide cap on any Job's
    ``parallelism``. ``check_interval``: how often an idle watch re-reads the Job and its pods;
    ``poll_interval``: the pause before reconnecting a failed watch. ``clock``: wall time by default,
    because the monotonic clocks stand still while a laptop sleeps, and a sleep through a Job's TTL
    is what tells an expired Job from a deleted one.
    """

    def __init__(
        self,
        namespace: str,
        image: str,
        queue: str | None = None,
        api_client: Any | None = None,
        *,
        service_account: str = DEFAULT_SERVICE_ACCOUNT,
        ttl_seconds: int = 86400,
        watch_timeout: int = 300,
        log_lines: int = 30,
        max_parallel_pods: int | None = None,
        check_interval: float = 30.0,
        poll_interval: float = 5.0,
        resubmits: int = 2,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        from kubernetes import client

        if api_client is None:
            from kubernetes import config as kube_config

            kube_config.load_config()  # kubeconfig, else in-cluster
            api_client = client.ApiClient()
        if max_parallel_pods is not None and max_parallel_pods < 1:
            raise ConfigError(f"max_parallel_pods must be >= 1, got {max_parallel_pods}")
        self.namespace, self.image, self.queue = namespace, image, queue
        self.service_account, self.ttl_seconds = service_account, ttl_seconds
        self.watch_timeout, self.log_lines = watch_timeout, log_lines
        self.max_parallel_pods = max_parallel_pods
        self.check_interval, self.poll_interval, self.resubmits = check_interval, poll_interval, resubmits
        self.say = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.clock = clock
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.jobs, self.jobsets = _Jobs(api_client, namespace), _JobSets(api_client, namespace)

    def _kinds(self, kind: str | None = None) -> list[_Jobs]:
        return [k for k in (self.jobs, self.jobsets) if kind is None or k.kind == kind]

    # -- rendering and submission ------------------------------------------------------------

    def render(
        self, job: StageJob, run_id: str, *, indexes: Sequence[int] | None = None, attempt: int = 0, max_parallel_pods: int | None = None
    ) -> dict[str, Any]:
        return render_stage(
            job,
            run_id=run_id,
            namespace=self.namespace,
            image=self.image,
            queue=self.queue,
            service_account=self.service_account,
            ttl_seconds=self.ttl_seconds,
            indexes=indexes,
            attempt=attempt,
            max_parallel_pods=max_parallel_pods or self.max_parallel_pods,
        )

    def admissible(self, job: StageJob, run_id: str, *, indexes: Sequence[int] | None = None, attempt: int = 0) -> dict[str, Any]:
        """The manifest to submit, checked against the Kueue queue (if any).

        A Job that can never be admitted raises :class:`~inpars.launch.kueue.QueueRefusedError`. If
        only its pod count is too large and the stage's parallelism was not set explicitly, it is
        rendered again with the largest parallelism the queue can admit.
        """
        manifest = self.render(job, run_id, indexes=indexes, attempt=attempt)
        if not self.queue:
            return manifest
        view = kueue.read_queue(self.custom, self.namespace, self.queue)
        if view is None:
            self.say(f"{job.stage}: cannot read Kueue queue {self.queue!r} (RBAC); its admission is not checked")
            return manifest
        verdict = kueue.check_admission(manifest, view)
        if verdict.fits:
            return manifest
        explicit = job.resources.parallelism is not None
        if not verdict.problems and manifest["kind"] == "Job" and not explicit and verdict.max_pods:
            before = manifest["spec"]["parallelism"]
            manifest = self.render(job, run_id, indexes=indexes, attempt=attempt, max_parallel_pods=verdict.max_pods)
            self.say(
                f"{job.stage}: parallelism {before} -> {verdict.max_pods}: the most pods ClusterQueue {view.name} can admit at once "
                f"({verdict.limited_by})"
            )
            return manifest
        hint = ""
        if not verdict.problems and verdict.max_pods:
            hint = f"; set resources.{job.stage}.parallelism <= {verdict.max_pods}"
        raise kueue.QueueRefusedError(
            f"stage {job.stage}: queue {self.queue!r} can never admit {manifest['kind']} {manifest['metadata']['name']}: "
            f"{verdict.explain(view.name)}{hint}"
        )

    def submit(self, job: StageJob, run_id: str, *, indexes: Sequence[int] | None = None, attempt: int = 0) -> str:
        """Create the stage's Job (or JobSet) and return its name; adopt it if it already exists."""
        from kubernetes.client.exceptions import ApiException

        manifest = self.admissible(job, run_id, indexes=indexes, attempt=attempt)
        name = manifest["metadata"]["name"]
        kind = self._kinds(manifest["kind"])[0]
        try:
            kind.create(manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = kind.get(name) or {}
            labels = existing.get("metadata", {}).get("labels") or {}
            if labels.get(RUN_LABEL) != run_label(run_id) or labels.get(STAGE_LABEL) != job.stage:
                raise ConfigError(f"{kind.kind} {name} exists in {self.namespace} but belongs to another run/stage") from None
        return name

    def find_jobs(self, run_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        """The run's Jobs and JobSets (optionally of one stage), oldest attempt first."""
        selector = f"{RUN_LABEL}={run_label(run_id)}" + (f",{STAGE_LABEL}={stage}" if stage else "")
        found = []
        for kind in self._kinds():
            for o in kind.list(selector):  # filter again: selectors are ignored by kmock (and cheap to re-check)
                o.setdefault("kind", kind.kind)
                labels = o.get("metadata", {}).get("labels") or {}
                if labels.get(RUN_LABEL) == run_label(run_id) and (stage is None or labels.get(STAGE_LABEL) == stage):
                    found.append(o)
        return sorted(
            found, key=lambda o: (o["metadata"]["labels"].get(STAGE_LABEL, ""), int(o["metadata"]["labels"].get(ATTEMPT_LABEL, "0")))
        )

    # -- watching -----------------------------------------------------------------------------

    def watch(self, job_name: str, on_progress: Callable[[JobProgress], None] | None = None, *, kind: str = "Job") -> JobProgress:
        """Follow one Job (or JobSet) until it completes (returns) or fails (raises :class:`JobFailedError`).

        Raises :class:`JobDeletedError` if it is deleted unfinished, :class:`JobMissingError` if it
        is found gone (404) without its end seen, :class:`JobStuckError` after its pending deadline
        without progress (the Job is deleted then).
        """
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import ReadTimeoutError

        res = self._kinds(kind)[0]
        now = self.clock()
        state = _Watched(started=now, last_progress=now)
        last: JobProgress | None = None

        def seen(obj: Mapping[str, Any], waiting: list[str] | None = None) -> JobProgress:
            nonlocal last
            obj = {**obj, "kind": obj.get("kind") or res.kind}
            progress = progress_of(obj)
            progress.waiting = list(waiting if waiting is not None else (last.waiting if last and not progress.finished else []))
            key = (progress.state, progress.completed, progress.failed, progress.active, progress.waiting)
            if on_progress is not None and (last is None or key != (last.state, last.completed, last.failed, last.active, last.waiting)):
                on_progress(progress)
            if not progress.finished:
                state.last_seen = self.clock()
            last = progress
            return progress

        def missing() -> JobMissingError:
            gone = last or JobProgress(job_name, "", "", 0, [], kind=res.kind)
            gone.state, gone.reason = "failed", "NotFound"
            gone.message = f"the {res.kind} is gone (deleted, or removed by its TTL after it finished)"
            return JobMissingError(gone, state.last_seen)

        obj = res.get(job_name)
        if obj is None:
            raise missing()
        progress = seen(obj)
        while not progress.finished:
            progress = self._check_pods(res, obj, progress, state, seen)
            try:
                for etype, event_obj in res.stream(job_name, self.watch_timeout, self.check_interval):
                    if etype == "ERROR" or event_obj.get("metadata", {}).get("name") != job_name:
                        continue
                    if etype == "DELETED":
                        final = progress_of({**event_obj, "kind": res.kind}) if event_obj.get("spec") else progress
                        if final.finished:  # its TTL, after it finished: that finish counts
                            progress = seen(event_obj)
                            break
                        cancelled = (event_obj.get("metadata", {}).get("annotations") or {}).get(CANCELLED_ANNOTATION)
                        final.state, final.reason = "failed", "Deleted"
                        final.message = f"the {res.kind} was deleted " + ("(cancelled)" if cancelled else "before it finished (by hand?)")
                        raise JobDeletedError(final, {})
                    obj = event_obj
                    progress = seen(obj)
                    if progress.finished or self.clock() - state.last_check >= self.check_interval:
                        break
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion expired; re-read and watch again
                    self.say(f"{job_name}: watch failed ({exc.status} {exc.reason}); reconnecting")
                time.sleep(self.poll_interval if exc.status != 410 else min(self.poll_interval, 1.0))
            except ReadTimeoutError:
                pass  # no event for check_interval: re-read and look at the pods
            except JobFailedError:
                raise
            except Exception as exc:  # a dropped stream: re-read the Job and watch again
                self.say(f"{job_name}: watch stream dropped ({exc.__class__.__name__}); reconnecting")
                time.sleep(self.poll_interval)
            if not progress.finished:
                fresh = res.get(job_name)
                if fresh is None:
                    raise missing()
                obj = fresh
                progress = seen(obj)
        if progress.state == "failed":
            raise JobFailedError(progress, self._failed_logs(res, job_name, progress))
        return progress

    def _check_pods(self, res: _Jobs, obj: Mapping[str, Any], progress: JobProgress, state: _Watched, seen: Callable) -> JobProgress:
        """Every ``check_interval``: why pods wait; fail the stage when nothing moved for its pending deadline."""
        now = self.clock()
        if now - state.last_check < self.check_interval:
            return progress
        state.last_check = now
        if len(progress.completed) > state.completed:
            state.completed, state.last_progress = len(progress.completed), now
        waiting: list[str] = []
        if progress.state == "queued":
            waiting = kueue.workload_messages(self.custom, self.namespace, progress.name) or ["suspended: waiting for Kueue to admit it"]
        else:
            pods = self._pods(res, progress.name)
            if any((p.get("status") or {}).get("phase") in ("Running", "Succeeded") for p in pods):
                state.last_progress = now
            reasons: dict[str, list[str]] = {}
            for pod in pods:
                why = pod_waiting_reason(pod)
                if why is not None:
                    reasons.setdefault(why, []).append(pod["metadata"]["name"])
            waiting = [f"{len(names)} pod(s) {why} ({', '.join(sorted(names)[:3])})" for why, names in sorted(reasons.items())]
            if not pods and not progress.completed:
                waiting = ["no pods created yet"]
        progress = seen(obj, waiting)
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        deadline = float(annotations.get(PENDING_DEADLINE_ANNOTATION) or DEFAULT_PENDING_DEADLINE_SECONDS)
        if waiting and now - state.last_progress > deadline:
            self._delete(res, progress.name)
            progress.state, progress.reason = "failed", "Stuck"
            progress.message = (
                f"no progress for {now - state.last_progress:.0f} s (pending deadline {deadline:.0f} s): "
                + "; ".join(waiting)
                + f". The {res.kind} was deleted; fix the cause (or raise resources.{progress.stage}.pending_deadline_seconds)"
            )
            raise JobStuckError(progress, {})
        return progress

    def _pods(self, res: _Jobs, name: str) -> list[dict[str, Any]]:
        key, value = res.pod_selector(name)
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{key}={value}").items
        out = [_wire(self.api, p) for p in pods]
        return [p for p in out if (p.get("metadata", {}).get("labels") or {}).get(key) == value]

    def _pod_log(self, pod: str, tail_lines: int | None, container: str = CONTAINER) -> str:
        # Raw bytes: the typed path cannot decode every server's content type (kmock: octet-stream).
        resp = self.core.read_namespaced_pod_log(pod, self.namespace, container=container, tail_lines=tail_lines, _preload_content=False)
        return resp.data.decode("utf-8", errors="replace")

    def _pod_shard(self, res: _Jobs, pod: Mapping[str, Any], progress: JobProgress) -> int | None:
        if res.kind == "JobSet":  # every host runs the JobSet's one shard
            return progress.shards[0] if progress.shards else None
        meta = pod.get("metadata", {})
        raw = (meta.get("labels") or {}).get(COMPLETION_INDEX_LABEL) or (meta.get("annotations") or {}).get(COMPLETION_INDEX_LABEL)
        if raw is None or not raw.isdigit() or int(raw) >= len(progress.shards):
            return None
        return progress.shards[int(raw)]

    def _failed_logs(self, res: _Jobs, job_name: str, progress: JobProgress) -> dict[int, str]:
        """The log tail of the newest pod of each failed shard (best effort: logs may be gone)."""
        try:
            pods = self._pods(res, job_name)
        except Exception:
            return {}
        newest: dict[int, dict[str, Any]] = {}
        for pod in pods:
            shard = self._pod_shard(res, pod, progress)
            if shard is not None and shard in progress.failed:
                stamp = pod["metadata"].get("creationTimestamp") or ""
                if shard not in newest or str(stamp) >= str(newest[shard]["metadata"].get("creationTimestamp") or ""):
                    newest[shard] = pod
        logs = {}
        for shard, pod in sorted(newest.items())[:5]:  # a handful is enough to diagnose
            try:
                logs[shard] = self._pod_log(pod["metadata"]["name"], self.log_lines)
            except Exception as exc:
                logs[shard] = f"(log unavailable: {exc.__class__.__name__})"
        return logs

    def _delete(self, res: _Jobs, name: str) -> None:
        """Delete, marked as ours first, so a watcher elsewhere sees a cancel rather than a TTL."""
        from kubernetes.client.exceptions import ApiException

        try:
            res.patch(name, {"metadata": {"annotations": {CANCELLED_ANNOTATION: "true"}}})
            res.delete(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- run-level commands --------------------------------------------------------------------

    def status(self, run_id: str) -> list[JobProgress]:
        """Every Job of the run, in stage order."""
        from ..pipeline import STAGE_NAMES as STAGES

        order = {s: i for i, s in enumerate(STAGES)}
        progress = [progress_of(o) for o in self.find_jobs(run_id)]
        return sorted(progress, key=lambda p: (order.get(p.stage, 99), p.name))

    def pod_logs(
        self, run_id: str, stage: str, index: int | None = None, *, tail_lines: int | None = None
    ) -> dict[str, tuple[int | None, str]]:
        """Pod name -> (shard, log text) for a stage's pods (``index``: only that shard's pods)."""
        out: dict[str, tuple[int | None, str]] = {}
        container = DRIVER_CONTAINER if stage == DRIVER_STAGE else CONTAINER
        for obj in self.find_jobs(run_id, stage):
            progress = progress_of(obj)
            res = self._kinds(obj.get("kind", "Job"))[0]
            for pod in self._pods(res, obj["metadata"]["name"]):
                shard = None if stage == DRIVER_STAGE else self._pod_shard(res, pod, progress)
                if index is None or shard == index:
                    out[pod["metadata"]["name"]] = (shard, self._pod_log(pod["metadata"]["name"], tail_lines, container))
        return out

    def logs(self, run_id: str, stage: str, index: int | None = None, *, tail_lines: int | None = None) -> str:
        """A stage's pod logs as one text, each under a ``==> pod (shard i) <==`` header."""
        parts = [
            f"==> {pod}{'' if shard is None else f' (shard {shard})'} <==\n{text.rstrip()}"
            for pod, (shard, text) in sorted(self.pod_logs(run_id, stage, index, tail_lines=tail_lines).items())
        ]
        if not parts:
            return f"no pods found for stage {stage!r} of run {run_id!r}" + (f" shard {index}" if index is not None else "")
        return "\n".join(parts)

    def cancel(self, run_id: str, *, driver_grace: float = 60.0) -> list[str]:
        """Delete the run's Jobs and their pods (the workspace keeps every committed shard).

        The driver Job goes first, and its pods are waited for (up to ``driver_grace`` seconds), so
        that it cannot submit a stage between our listing and its end; a BEIR driver's runs (its
        ``inpars.io/run-ids``) are cancelled with it. Stage Jobs are listed after that.
        """
        names: list[str] = []
        run_ids = [run_id]
        drivers = self.find_jobs(run_id, DRIVER_STAGE)
        for obj in drivers:
            annotations = obj["metadata"].get("annotations") or {}
            run_ids += [r for r in (annotations.get(RUN_IDS_ANNOTATION) or "").split(",") if r]
            self._delete(self.jobs, obj["metadata"]["name"])
            names.append(obj["metadata"]["name"])
        deadline = self.clock() + driver_grace
        for obj in drivers:
            while self._pods(self.jobs, obj["metadata"]["name"]) and self.clock() < deadline:
                time.sleep(min(self.poll_interval, 2.0))
        for rid in dict.fromkeys(run_ids):
            for obj in self.find_jobs(rid):
                if obj["metadata"]["name"] in names:
                    continue
                self._delete(self._kinds(obj.get("kind", "Job"))[0], obj["metadata"]["name"])
                names.append(obj["metadata"]["name"])
        return names

    def submit_driver(self, manifest: dict[str, Any], *, replace_wait: float = 30.0) -> str:
        """Create a driver Job (:func:`~inpars.launch.k8s_manifests.render_driver`); return its name.

        Its name is one per run, so the API server decides between two launchers: a live driver of
        that name raises :class:`DriverRunning` (nothing is submitted); a finished one (its TTL not yet
        passed) is deleted and replaced, because a finished driver drives nothing.
        """
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        want = (manifest["metadata"]["labels"] or {}).get(RUN_LABEL)
        deadline = self.clock() + replace_wait
        while True:
            try:
                self.jobs.create(manifest)
                return name
            except ApiException as exc:
                if exc.status != 409:
                    raise
            existing = self.jobs.get(name)
            if existing is None:  # deleted meanwhile: create again
                continue
            labels = existing.get("metadata", {}).get("labels") or {}
            if labels.get(RUN_LABEL) != want or labels.get(STAGE_LABEL) != DRIVER_STAGE:
                raise ConfigError(f"Job {name} exists in {self.namespace} but is not this run's driver")
            if not progress_of({**existing, "kind": "Job"}).finished:
                raise DriverRunning(name, self.namespace)
            if self.clock() > deadline:
                raise TransientError(f"the finished driver Job {name} is still being deleted; try again in a minute")
            self.say(f"replacing the finished driver Job {name}")
            try:
                self.jobs.delete(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            time.sleep(min(self.poll_interval, 1.0))

    def run_stage(
        self,
        job: StageJob,
        run_id: str,
        missing: Sequence[int],
        on_progress: Callable[[JobProgress], None] | None = None,
        *,
        workspace: CommittedShards | None = None,
    ) -> JobProgress:
        """Run the ``missing`` shards of one stage: adopt a live Job of the stage, else submit one.

        With ``workspace``, a Job found gone (404) is settled by it: committed -> done; not committed
        -> submitted again (at most ``resubmits`` times).
        """
        kind = "JobSet" if (tpu := stage_tpu_slice(job)) is not None and tpu.multi_host else "Job"
        missing = sorted(missing)
        tried: list[int] = []  # attempts submitted here (a vanished one is no longer listed)
        for round_ in range(self.resubmits + 1):
            existing = self.find_jobs(run_id, job.stage)
            live = [o for o in existing if not progress_of(o).finished] if round_ == 0 else []
            if live:  # a restarted launcher: pick the running Job up instead of starting another
                name, kind = live[-1]["metadata"]["name"], live[-1].get("kind", "Job")
            else:
                attempt = 1 + max([int(o["metadata"]["labels"].get(ATTEMPT_LABEL, "0")) for o in existing] + tried, default=-1)
                tried.append(attempt)
                partial = missing != list(range(job.shards))
                name = self.submit(job, run_id, indexes=missing if partial else None, attempt=attempt)
            try:
                return self.watch(name, on_progress, kind=kind)
            except JobMissingError as exc:
                if workspace is None:
                    raise
                still = sorted(set(workspace.missing_shards(job.stage, job.shards)) & set(exc.progress.shards or missing))
                if not still:
                    self.say(f"{job.stage}: {exc.progress.kind} {name} is gone, but the workspace holds its shards; going on")
                    p = exc.progress
                    p.state, p.reason, p.message, p.completed, p.failed = (
                        "complete",
                        "Committed",
                        "gone; the workspace holds its shards",
                        p.shards,
                        [],
                    )
                    return p
                if exc.last_seen is not None and self.clock() - exc.last_seen < self.ttl_seconds:
                    # Seen unfinished less than a TTL ago: not the TTL, someone deleted it.
                    exc.progress.message = f"the {exc.progress.kind} was deleted before it finished (cancelled?)"
                    raise JobDeletedError(exc.progress, {}) from None
                self.say(
                    f"{job.stage}: {exc.progress.kind} {name} is gone and shards {format_indexes(still)} are not committed; submitting again"
                )
                missing = still
        vanished = f"its {kind} vanished {self.resubmits + 1} times without the workspace holding its shards"
        raise JobFailedError(
            JobProgress(name, job.stage, run_id, job.shards, missing, failed=missing, state="failed", message=vanished), {}
        )

    def run_shards(self, job: StageJob, shards: Sequence[int], run: Run) -> JobProgress:
        """The driver's executor (:func:`inpars.launch.driver.drive`): run ``shards`` of one stage as
        a Job (:meth:`run_stage`, the workspace settling Jobs that vanished); a Job that failed is a
        :class:`~inpars.launch.driver.StageFailed` (transient: a resume may succeed)."""
        try:
            return self.run_stage(job, run.run_id, list(shards), lambda p: self.say(str(p)), workspace=run)
        except JobFailedError as e:
            raise StageFailed(str(e), permanent=False) from None
