"""The driver in the cluster (``--detach``): the command a driver Job runs, its manifest, its submission,
and the commands that follow it from any machine.

``inpars-launch run|resume|beir --backend k8s --detach`` does on the laptop only what pins the work:
the run is created in the workspace with its config (and ``resume --set`` records its settings
there), so the driver reads the same config wherever it runs. Then the orchestration itself is
submitted as one Job (:func:`~inpars.launch.k8s_manifests.render_driver`) whose container runs the
attached command, ``inpars-launch resume RUN --backend k8s ...`` (for BEIR, ``inpars-launch beir
--runs ...``), and the launcher returns. A restarted driver pod runs the same command: it rebuilds
its view from the workspace, adopts the live stage Jobs by label, and takes the run's driver lease
over once the dead pod's lease expires (:func:`~inpars.launch.driver.exclusive_driver`).
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .driver import DriverBusy, describe_holder, driver_holder
from .k8s_manifests import render_driver

if TYPE_CHECKING:
    from ..workspace import Run

LAUNCHER = "inpars-launch"


def _k8s_options(namespace: str, image: str, queue: str | None, max_parallel_pods: int | None) -> list[str]:
    out = ["--backend", "k8s", "--namespace", namespace, "--image", image]
    if queue:
        out += ["--queue", queue]
    if max_parallel_pods is not None:
        out += ["--max-parallel-pods", str(max_parallel_pods)]
    return out


def resume_command(
    run_uri: str,
    *,
    namespace: str,
    image: str,
    queue: str | None = None,
    until: str | None = None,
    max_parallel_pods: int | None = None,
) -> list[str]:
    """What a run's driver pod runs: the attached ``resume`` of the run, stage Jobs on Kubernetes."""
    out = [LAUNCHER, "resume", run_uri, *_k8s_options(namespace, image, queue, max_parallel_pods)]
    if until:
        out += ["--until", until]
    return out


def beir_command(
    workspace: str,
    run_ids: Sequence[str],
    *,
    namespace: str,
    image: str,
    queue: str | None = None,
    max_parallel_pods: int | None = None,
    max_concurrent: int = 2,
) -> list[str]:
    """What a BEIR driver pod runs: ``beir --runs`` over the runs created (and pinned) by the launcher."""
    return [
        LAUNCHER,
        "beir",
        "--workspace",
        workspace,
        "--runs",
        ",".join(run_ids),
        "--max-concurrent",
        str(max_concurrent),
        *_k8s_options(namespace, image, queue, max_parallel_pods),
    ]


def beir_set_id(workspace: str, run_ids: Sequence[str]) -> str:
    """``beir-<hash>``: the id of one BEIR request (its workspace and runs), which names its driver Job;
    the same request gives the same id, so a second ``beir --detach`` meets the first one's driver."""
    digest = hashlib.sha256(("\n".join([workspace.rstrip("/"), *sorted(run_ids)])).encode()).hexdigest()[:10]
    return f"beir-{digest}"


def run_driver_manifest(
    run_uri: str,
    run_id: str,
    *,
    namespace: str,
    image: str,
    queue: str | None = None,
    until: str | None = None,
    max_parallel_pods: int | None = None,
    ttl_seconds: int = 86400,
) -> dict[str, Any]:
    """The driver Job of one run (validated as the stage Jobs are)."""
    command = resume_command(run_uri, namespace=namespace, image=image, queue=queue, until=until, max_parallel_pods=max_parallel_pods)
    return render_driver(command, run_id=run_id, namespace=namespace, image=image, ttl_seconds=ttl_seconds)


def beir_driver_manifest(
    workspace: str,
    run_ids: Sequence[str],
    *,
    namespace: str,
    image: str,
    queue: str | None = None,
    max_parallel_pods: int | None = None,
    max_concurrent: int = 2,
    ttl_seconds: int = 86400,
) -> dict[str, Any]:
    """The driver Job of a BEIR request: ``beir --runs`` over ``run_ids``; more memory, it drives several runs at once."""
    command = beir_command(
        workspace,
        run_ids,
        namespace=namespace,
        image=image,
        queue=queue,
        max_parallel_pods=max_parallel_pods,
        max_concurrent=max_concurrent,
    )
    return render_driver(
        command,
        run_id=beir_set_id(workspace, run_ids),
        namespace=namespace,
        image=image,
        runs=run_ids,
        memory="2Gi",
        ttl_seconds=ttl_seconds,
    )


def refuse_if_driven(runs: Sequence[Run]) -> None:
    """Raise :class:`~inpars.launch.driver.DriverBusy` when a live driver (anywhere) holds one of ``runs``:
    a driver Job submitted now would only wait for it and fail."""
    for run in runs:
        holder = driver_holder(run)
        if holder:
            raise DriverBusy(
                f"run {run.run_id} already has a driver ({describe_holder(holder)}): not starting a second one; "
                f"follow it with `{LAUNCHER} status {run.uri}`"
            )


def submit(executor: Any, manifest: dict[str, Any], runs: Sequence[Run] = ()) -> str:
    """Submit a driver Job through a :class:`~inpars.launch.k8s.K8sExecutor` and return its name.

    Refused (nothing submitted) when a driver already holds one of ``runs`` (its lease) or a live
    driver Job of the same name exists (:class:`~inpars.launch.k8s.DriverRunning`)."""
    refuse_if_driven(runs)
    return executor.submit_driver(manifest)


def follow_lines(target: str, job: str, namespace: str, *, run_uris: Sequence[str] = ()) -> list[str]:
    """The commands that follow a detached driver from any machine (``target``: a run URI or a BEIR set id)."""
    ns = [] if namespace == "inpars" else ["--namespace", namespace]
    k8s = ["--backend", "k8s", *ns]
    statuses = run_uris or [target]

    def cmd(*args: str) -> str:
        return shlex.join([LAUNCHER, *args])

    lines = [f"driver Job {job} in namespace {namespace}; follow it from any machine:"]
    for uri in statuses[:3]:
        lines.append(f"  {cmd('status', uri)}")
    if len(statuses) > 3:
        lines.append(f"  ... ({len(statuses) - 3} more runs: `{LAUNCHER} status <run>`)")
    lines += [
        f"  {cmd('logs', target, 'driver', *k8s)}    # the driver's log",
        f"  kubectl -n {namespace} logs -f job/{job}",
        f"  {cmd('cancel', target, *ns)}    # the driver Job, then every stage Job",
    ]
    if not run_uris:
        lines.append(f"  {cmd('resume', target, *k8s, '--detach')}    # after it stopped: a new driver")
    return lines
