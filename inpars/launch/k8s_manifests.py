"""Kubernetes manifests for stage Jobs: names, rendering, and the rules a real API server enforces.

One stage is one ``batch/v1`` Job with ``completionMode: Indexed``: pod *i* gets
``JOB_COMPLETION_INDEX=i`` and runs the stage's command (the same
``inpars worker <stage> --run RUN`` the local executor runs). The environment contract (shard count,
the resume mapping, the device) is :mod:`inpars.shards`'s.

A stage on a multi-host TPU slice is a ``jobset.x-k8s.io/v1alpha2`` JobSet instead: one replicated
Job with one pod per host (``completions = parallelism = hosts``), all hosts running the same shard.

The driver itself (``--detach``) is one more ``batch/v1`` Job, :func:`render_driver`: one pod
running ``inpars-launch resume RUN --backend k8s ...`` under the ``inpars-launcher`` service account.

Job-level choices (why): ``backoffLimitPerIndex`` retries each shard on its own;
``podFailurePolicy`` ignores disruptions (preemption costs no retry) and fails a shard at once on
:data:`inpars.errors.EXIT_PERMANENT`; ``podReplacementPolicy: Failed`` never runs two pods on one
shard; ``maxFailedIndexes`` stops a Job that fails broadly instead of burning retries;
``activeDeadlineSeconds`` (per stage) ends a Job that runs, or waits, too long.

Every rendered manifest passes :func:`validate_manifest`: the values the JSON schemas leave open
(names, label values, quantities) and the rules the API server (or the JobSet webhook) applies to
generated names: an Indexed Job's last pod hostname ``<job>-<completions - 1>`` must be a DNS label
(<= 63 characters), and a JobSet's longest pod name too.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from ..config import ResourcesConfig
from ..errors import EXIT_PERMANENT, ConfigError
from ..shards import DEVICE_ENV, worker_env
from .accelerators import (
    GPU_NODE_LABEL,
    GPU_RESOURCE,
    TPU_ACCELERATOR_LABEL,
    TPU_RESOURCE,
    TPU_TOPOLOGY_LABEL,
    TpuSlice,
    check_gpus,
    tpu_slice,
)
from .plan import OPTIONAL_SECRETS, StageJob

# Labels and annotations the launcher writes and selects on.
NAME_LABEL = "app.kubernetes.io/name"
RUN_LABEL = "inpars.io/run-id"
STAGE_LABEL = "inpars.io/stage"
ATTEMPT_LABEL = "inpars.io/attempt"
RUN_ANNOTATION = "inpars.io/run-id"  # the run id unabridged (a label value is at most 63 chars)
SHARDS_ANNOTATION = "inpars.io/shard-indexes"  # the shards this Job runs, "3,7,9" or "0-63"
PENDING_DEADLINE_ANNOTATION = "inpars.io/pending-deadline-seconds"  # read by whichever launcher watches
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on pods by the Job controller
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # set on a JobSet's Jobs and pods
SLICE_JOB = "slice"  # the JobSet's one replicated Job: its Jobs are <jobset>-slice-<i>
# One slice per node pool: GKE's TPU node pools are one slice each.
EXCLUSIVE_TOPOLOGY_ANNOTATION = "alpha.jobset.sigs.k8s.io/exclusive-topology"
NODE_POOL_LABEL = "cloud.google.com/gke-nodepool"

CONTAINER = "worker"
DEFAULT_SERVICE_ACCOUNT = "inpars-runner"
RUN_AS_USER = 1000  # the non-root user of the images (images/Dockerfile.*)
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

# The driver Job (``--detach``): the orchestration itself, in the cluster (see render_driver).
DRIVER_STAGE = "driver"  # its inpars.io/stage label: `logs RUN driver`, and `cancel` deletes it first
DRIVER_CONTAINER = "driver"
DRIVER_SERVICE_ACCOUNT = "inpars-launcher"  # k8s/rbac.yaml: manages Jobs, reads pods and logs; Workload Identity for the bucket
RUN_IDS_ANNOTATION = "inpars.io/run-ids"  # a BEIR driver: the runs it drives (cancel deletes their Jobs too)
# Retries of the driver pod after a crash or a transient stage failure (exit 75): each retry resumes
# the run where the workspace says it is. A node lost or a preemption does not count (DisruptionTarget).
DRIVER_BACKOFF_LIMIT = 2
MAX_NAME = 63  # a DNS label

# activeDeadlineSeconds per stage when resources.<stage>.active_deadline_seconds is not set: the
# whole Job (every shard, with parallelism < shards the waves add up), generous for BEIR's largest.
DEFAULT_ACTIVE_DEADLINE_SECONDS = {
    "generate": 48 * 3600,
    "filter": 12 * 3600,
    "negatives": 12 * 3600,
    "train": 48 * 3600,
    "rerank": 24 * 3600,
    "evaluate": 6 * 3600,
    "publish": 6 * 3600,
}
# How long a Job may make no progress with its pods Pending (or itself queued) before the launcher
# reports the reasons and fails the stage; node auto-provisioning of GPUs/TPUs can take 10-20 min.
DEFAULT_PENDING_DEADLINE_SECONDS = 3600

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


# --------------------------------------------------------------------------------------------
# Names, labels, images


def _slug(text: str, max_len: int) -> str:
    """``text`` as lowercase ``[a-z0-9-]``, at most ``max_len``; a hash keeps lossy slugs distinct."""
    slug = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", text.lower())).strip("-")
    if slug == text and len(slug) <= max_len:
        return slug
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    head = slug[: max_len - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}" if head else digest


def run_label(run_id: str) -> str:
    """The ``inpars.io/run-id`` label value for ``run_id`` (a valid label value, stable)."""
    if not run_id:
        raise ConfigError("the run id is empty")
    return _slug(run_id, MAX_NAME)


def generated_name_tail(completions: int = 1, hosts: int = 1) -> str:
    """The longest suffix Kubernetes appends to a stage Job's name in a name that must stay a DNS label.

    A Job: its last pod's hostname ``<job>-<completions - 1>``. A JobSet (``hosts`` > 1): the pod
    name the JobSet webhook checks, ``<jobset>-slice-0-<hosts - 1>-abcde``.
    """
    if hosts > 1:
        return f"-{SLICE_JOB}-0-{hosts - 1}-abcde"
    return f"-{max(completions, 1) - 1}"


def job_name(run_id: str, stage: str, attempt: int = 0, *, completions: int = 1, hosts: int = 1) -> str:
    """``inpars-<run>-<stage>[-r<attempt>]``, short enough that every name Kubernetes derives from it
    (see :func:`generated_name_tail`) is a DNS label; long run ids are shortened with a hash."""
    suffix = f"-{stage}" + (f"-r{attempt}" if attempt else "")
    budget = MAX_NAME - len("inpars-") - len(suffix) - len(generated_name_tail(completions, hosts))
    if budget < 9:  # room for at least the 8-character hash
        raise ConfigError(f"stage {stage!r}: no room for a run id in a Job name with {completions} completions / {hosts} hosts")
    return f"inpars-{_slug(run_id, budget)}{suffix}"


def image_variant(resources: ResourcesConfig) -> str:
    """Which image a stage needs: ``tpu``, ``cuda`` or ``cpu``."""
    if resources.tpu_type:
        return "tpu"
    return "cuda" if resources.gpu else "cpu"


def image_for(image: str, resources: ResourcesConfig) -> str:
    """The image for a stage: fills ``{variant}``, or swaps a ``:cpu``/``:cuda``/``:tpu`` tag.

    A CPU image on a GPU node runs, silently, on the CPU; swapping the variant tag prevents that.
    Any other image is used as given.
    """
    variant = image_variant(resources)
    if "{variant}" in image:
        return image.replace("{variant}", variant)
    repo, sep, tag = image.rpartition(":")
    if sep and "/" not in tag and tag in ("cpu", "cuda", "tpu"):
        return f"{repo}:{variant}"
    return image


def format_indexes(indexes: Sequence[int]) -> str:
    """``[1, 3, 4, 5]`` -> ``"1,3-5"`` (the Job status format)."""
    parts: list[str] = []
    values = sorted(set(indexes))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def parse_indexes(text: str | None) -> list[int]:
    """``"1,3-5"`` -> ``[1, 3, 4, 5]`` (``status.completedIndexes`` / ``failedIndexes``)."""
    out: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ConfigError(f"bad index list {text!r}") from None
    return sorted(set(out))


def active_deadline_seconds(job: StageJob) -> int:
    """The stage's ``activeDeadlineSeconds``: ``resources.<stage>.active_deadline_seconds`` or the default."""
    value = job.resources.active_deadline_seconds
    if value is None:
        return DEFAULT_ACTIVE_DEADLINE_SECONDS.get(job.stage, 24 * 3600)
    if value < 1:
        raise ConfigError(f"resources.{job.stage}.active_deadline_seconds must be >= 1, got {value}")
    return int(value)


def pending_deadline_seconds(job: StageJob) -> int:
    """How long the stage may sit Pending/queued without progress (see :data:`DEFAULT_PENDING_DEADLINE_SECONDS`)."""
    value = job.resources.pending_deadline_seconds
    if value is None:
        return DEFAULT_PENDING_DEADLINE_SECONDS
    if value < 1:
        raise ConfigError(f"resources.{job.stage}.pending_deadline_seconds must be >= 1, got {value}")
    return int(value)


def stage_tpu_slice(job: StageJob) -> TpuSlice | None:
    """The TPU slice a stage asks for, if any."""
    r = job.resources
    return tpu_slice(r.tpu_type, r.tpu_topology, f"resources.{job.stage}") if r.tpu_type else None


# --------------------------------------------------------------------------------------------
# Rendering


def load_template(stage: str) -> dict[str, Any]:
    """The per-stage pod extras in ``inpars/launch/templates/<stage>.yaml`` (package data)."""
    res = importlib.resources.files("inpars.launch") / "templates" / f"{stage}.yaml"
    if not res.is_file():
        raise ConfigError(f"no Job template for stage {stage!r} (inpars/launch/templates/{stage}.yaml)")
    data = yaml.safe_load(res.read_text(encoding="utf-8")) or {}
    unknown = set(data) - {"job", "pod", "container"}
    if unknown:
        raise ConfigError(f"templates/{stage}.yaml: unknown section(s) {sorted(unknown)}")
    return data


def _merge(base: Any, over: Any) -> Any:
    """Deep merge: mappings merge, lists append, ``over`` wins for scalars."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(over, list):
        return base + over
    return over


def _pod_resources(job: StageJob) -> tuple[dict[str, Any], dict[str, str], list[dict[str, str]], dict[str, str]]:
    """Container resources, node selector, tolerations and device env for one stage's pods."""
    r, stage = job.resources, job.stage
    where = f"resources.{stage}"
    requests = {"cpu": str(r.cpu), "memory": str(r.memory)}
    if r.ephemeral_storage:
        requests["ephemeral-storage"] = str(r.ephemeral_storage)  # /scratch: the prepared store and index, models, spills
    limits = dict(requests)
    selector: dict[str, str] = {}
    tolerations: list[dict[str, str]] = []
    env = {DEVICE_ENV: image_variant(r)}
    if r.gpu and r.tpu_type:
        raise ConfigError(f"{where}: set gpu or tpu_type, not both")
    if r.gpu_type and not r.gpu:
        raise ConfigError(f"{where}: gpu_type={r.gpu_type!r} needs gpu >= 1")
    if r.gpu:
        check_gpus(int(r.gpu), r.gpu_type, where)
        if r.gpu > 1 and stage != "train":
            # Only training spreads over several GPUs (one process per GPU, see inpars.distributed); anything else
            # would hold idle GPUs. More shards with one GPU each is the way to scale the others.
            raise ConfigError(f"{where}: gpu={r.gpu}, but only train uses more than one GPU per pod; raise {stage}.shards with gpu: 1")
        limits[GPU_RESOURCE] = str(int(r.gpu))
        if r.gpu_type:
            selector[GPU_NODE_LABEL] = r.gpu_type
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    tpu = stage_tpu_slice(job)
    if tpu is not None:
        requests[TPU_RESOURCE] = limits[TPU_RESOURCE] = str(tpu.chips_per_pod)
        selector[TPU_ACCELERATOR_LABEL] = tpu.generation.accelerator
        selector[TPU_TOPOLOGY_LABEL] = tpu.topology
        tolerations.append({"key": TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
        env["PJRT_DEVICE"] = "TPU"  # torch_xla's runtime; the worker reads INPARS_DEVICE
    return {"requests": requests, "limits": limits}, selector, tolerations, env


def _shard_list(job: StageJob, indexes: Sequence[int] | None) -> list[int]:
    if job.shards < 1:
        raise ConfigError(f"stage {job.stage}: shards must be >= 1, got {job.shards}")
    if indexes is None:
        return list(range(job.shards))
    shard_list = sorted(set(int(i) for i in indexes))
    if not shard_list:
        raise ConfigError(f"stage {job.stage}: no shard indexes to run")
    bad = [i for i in shard_list if not 0 <= i < job.shards]
    if bad:
        raise ConfigError(f"stage {job.stage}: shard indexes {bad} are outside [0, {job.shards})")
    return shard_list


def _job_manifest(
    job: StageJob,
    *,
    name: str,
    run_id: str,
    namespace: str,
    image: str,
    service_account: str,
    ttl_seconds: int,
    shard_list: list[int],
    shard_env: dict[str, str],
    completions: int,
    parallelism: int,
    attempt: int,
    queue: str | None,
) -> dict[str, Any]:
    """A batch/v1 Job in wire form: the stage's pod, merged with its template."""
    labels = {NAME_LABEL: "inpars", RUN_LABEL: run_label(run_id), STAGE_LABEL: job.stage, ATTEMPT_LABEL: str(attempt)}
    job_labels = dict(labels)
    if queue:
        job_labels[QUEUE_LABEL] = queue
    both = set(job.env) & set(job.secret_env)
    if both:
        raise ConfigError(f"stage {job.stage}: {sorted(both)} set both as plain env and as secret")
    resources, node_selector, tolerations, device_env = _pod_resources(job)
    env = [{"name": var, "value": str(value)} for var, value in job.env.items()]
    env += [{"name": var, "value": value} for var, value in {**shard_env, **device_env}.items()]
    for var, (secret, key) in job.secret_env.items():
        # Keys travel by reference only: the manifest never holds a value.
        ref = {"name": secret, "key": key}
        if var in OPTIONAL_SECRETS:  # a hub token is needed only for gated models: a Secret without it still starts
            ref["optional"] = True
        env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    container = {
        "name": CONTAINER,
        "image": image_for(image, job.resources),
        "command": list(job.command),
        "env": env,
        "resources": resources,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
    }
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    failure_policy = {
        "rules": [
            # Preemption / eviction / node drain: retry without counting against backoffLimitPerIndex.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # A permanent error (bad input/config) fails again on retry: fail this shard at once.
            {"action": "FailIndex", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]}},
        ]
    }
    spec: dict[str, Any] = {
        "activeDeadlineSeconds": active_deadline_seconds(job),
        "backoffLimitPerIndex": job.max_retries,
        "completionMode": "Indexed",
        "completions": completions,
        "maxFailedIndexes": min(max(1, completions // 4), completions),
        "parallelism": parallelism,
        "podFailurePolicy": failure_policy,
        "podReplacementPolicy": "Failed",
    }
    if queue:
        spec["suspend"] = True  # Kueue admits (unsuspends) it when quota allows
    spec["template"] = {"metadata": {"labels": labels}, "spec": pod}
    spec["ttlSecondsAfterFinished"] = ttl_seconds
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "annotations": {
                PENDING_DEADLINE_ANNOTATION: str(pending_deadline_seconds(job)),
                RUN_ANNOTATION: run_id,
                SHARDS_ANNOTATION: format_indexes(shard_list),
            },
            "labels": job_labels,
            "name": name,
            "namespace": namespace,  # kmock (and kubectl apply -f) need it on the object itself
        },
        "spec": spec,
    }
    return _apply_template(manifest, _sized_template(job))


def render_job(
    job: StageJob,
    *,
    run_id: str,
    namespace: str,
    image: str,
    queue: str | None = None,
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
    ttl_seconds: int = 86400,
    indexes: Sequence[int] | None = None,
    attempt: int = 0,
    max_failed_indexes: int | None = None,
    max_parallel_pods: int | None = None,
) -> dict[str, Any]:
    """One stage as an Indexed ``batch/v1`` Job, in wire form (what the API server takes).

    ``indexes``: run only these shards (resume): ``completions = len(indexes)`` and the worker maps
    its completion index through ``INPARS_SHARD_INDEXES``. ``attempt`` > 0 adds ``-r<attempt>`` to
    the name so a resume Job never collides with the finished Job it follows. ``max_failed_indexes``
    defaults to a quarter of the completions (at least 1): failed shards are redone on resume.
    ``parallelism`` is the StageJob's, capped by the completions and ``max_parallel_pods`` (a
    run-wide cap, so that a queue's quota can admit the Job). ``image`` may hold ``{variant}`` or a
    ``:cpu`` tag; see :func:`image_for`. A multi-host TPU slice is refused: see :func:`render_stage`.
    """
    tpu = stage_tpu_slice(job)
    if tpu is not None and tpu.multi_host:
        raise ConfigError(
            f"resources.{job.stage}: tpu_topology {tpu.topology} spans several hosts ({tpu.hosts} x {tpu.chips_per_pod} chips): "
            "a batch/v1 Job cannot run it; render_stage renders it as a JobSet"
        )
    shard_list = _shard_list(job, indexes)
    completions = len(shard_list)
    parallelism = max(1, min(job.parallelism or completions, completions, max_parallel_pods or completions))
    manifest = _job_manifest(
        job,
        name=job_name(run_id, job.stage, attempt, completions=job.shards),
        run_id=run_id,
        namespace=namespace,
        image=image,
        service_account=service_account,
        ttl_seconds=ttl_seconds,
        shard_list=shard_list,
        shard_env=worker_env(job.shards, run_id, shard_list if indexes is not None else None),
        completions=completions,
        parallelism=parallelism,
        attempt=attempt,
        queue=queue,
    )
    if max_failed_indexes is not None:
        manifest["spec"]["maxFailedIndexes"] = min(max_failed_indexes, completions)
    validate_manifest(manifest)
    return manifest


def render_jobset(
    job: StageJob,
    *,
    run_id: str,
    namespace: str,
    image: str,
    queue: str | None = None,
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
    ttl_seconds: int = 86400,
    indexes: Sequence[int] | None = None,
    attempt: int = 0,
) -> dict[str, Any]:
    """One shard of a stage on a multi-host TPU slice, as a JobSet (``jobset.x-k8s.io/v1alpha2``).

    One replicated Job, one slice (``replicas: 1``): ``completions = parallelism = hosts``, each pod
    asking for its host's chips; every host runs the same shard (``INPARS_SHARD_INDEXES`` repeats it,
    ``INPARS_HOST_COUNT`` = hosts; the completion index is the host index). A failed host fails its
    Job and the JobSet restarts the whole slice (``failurePolicy.maxRestarts`` = the retries), except
    on :data:`~inpars.errors.EXIT_PERMANENT`, which fails the JobSet at once.
    """
    tpu = stage_tpu_slice(job)
    if tpu is None or not tpu.multi_host:
        raise ConfigError(f"stage {job.stage}: a JobSet is only for multi-host TPU slices; use render_job")
    shard_list = _shard_list(job, indexes)
    if len(shard_list) != 1:
        raise ConfigError(
            f"stage {job.stage}: a multi-host TPU slice ({tpu.topology}) runs one shard at a time, but {len(shard_list)} shards are to run; "
            f"set {job.stage}.shards=1 or choose a single-host topology ({', '.join(sorted(tpu.generation.single_host))})"
        )
    hosts = tpu.hosts
    name = job_name(run_id, job.stage, attempt, hosts=hosts)
    inner = _job_manifest(
        job,
        name=name,
        run_id=run_id,
        namespace=namespace,
        image=image,
        service_account=service_account,
        ttl_seconds=ttl_seconds,
        shard_list=shard_list,
        shard_env=worker_env(job.shards, run_id, shard_list * hosts, hosts=hosts),
        completions=hosts,
        parallelism=hosts,
        attempt=attempt,
        queue=None,
    )
    job_spec = inner["spec"]
    # All hosts or none: any failure fails the Job (backoffLimit 0) and the JobSet restarts the slice.
    for key in ("backoffLimitPerIndex", "maxFailedIndexes", "ttlSecondsAfterFinished", "suspend"):
        job_spec.pop(key, None)
    job_spec["backoffLimit"] = 0
    job_spec["podFailurePolicy"] = {
        "rules": [{"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]}}]
    }
    meta = inner["metadata"]
    meta["annotations"][EXCLUSIVE_TOPOLOGY_ANNOTATION] = NODE_POOL_LABEL
    if queue:
        meta["labels"][QUEUE_LABEL] = queue
    spec: dict[str, Any] = {
        "failurePolicy": {
            "maxRestarts": job.max_retries,
            # The child Job fails by its podFailurePolicy only on the permanent exit code.
            "rules": [{"name": "PermanentError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
        },
        "network": {"enableDNSHostnames": True},  # the hosts find each other (GKE's TPU_WORKER_HOSTNAMES)
        "replicatedJobs": [
            {
                "name": SLICE_JOB,
                "replicas": 1,
                "template": {"metadata": {"labels": dict(job_spec["template"]["metadata"]["labels"])}, "spec": job_spec},
            }
        ],
        "ttlSecondsAfterFinished": ttl_seconds,
    }
    if queue:
        spec["suspend"] = True
    manifest = {"apiVersion": f"{JOBSET_GROUP}/{JOBSET_VERSION}", "kind": "JobSet", "metadata": meta, "spec": spec}
    validate_manifest(manifest)
    return manifest


def render_stage(
    job: StageJob,
    *,
    run_id: str,
    namespace: str,
    image: str,
    queue: str | None = None,
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
    ttl_seconds: int = 86400,
    indexes: Sequence[int] | None = None,
    attempt: int = 0,
    max_parallel_pods: int | None = None,
) -> dict[str, Any]:
    """A stage's manifest: an Indexed Job, or a JobSet for a multi-host TPU slice."""
    common = dict(
        run_id=run_id,
        namespace=namespace,
        image=image,
        queue=queue,
        service_account=service_account,
        ttl_seconds=ttl_seconds,
        indexes=indexes,
        attempt=attempt,
    )
    tpu = stage_tpu_slice(job)
    if tpu is not None and tpu.multi_host:
        return render_jobset(job, **common)
    return render_job(job, max_parallel_pods=max_parallel_pods, **common)


def driver_job_name(run_id: str) -> str:
    """The driver Job of ``run_id`` (a run, or a BEIR set): one name per run, so that a second driver
    for the same run meets a 409 from the API server instead of starting."""
    return job_name(run_id, DRIVER_STAGE)


def render_driver(
    command: Sequence[str],
    *,
    run_id: str,
    namespace: str,
    image: str,
    runs: Sequence[str] = (),
    service_account: str = DRIVER_SERVICE_ACCOUNT,
    ttl_seconds: int = 86400,
    backoff_limit: int = DRIVER_BACKOFF_LIMIT,
    cpu: str = "250m",
    memory: str = "1Gi",
) -> dict[str, Any]:
    """The driver as a ``batch/v1`` Job: one pod that runs ``command`` (``inpars-launch resume RUN ...``,
    or ``inpars-launch beir --runs ...`` for the BEIR ``runs``) in the CPU variant of ``image``.

    Why each choice: ``restartPolicy: Never`` with ``backoffLimit`` (a fresh pod per try, and each
    try's log stays readable); the ``podFailurePolicy`` ignores disruptions (a lost node, a
    preemption: no try counted) and fails the Job at once on :data:`~inpars.errors.EXIT_PERMANENT` (a
    bad input fails again); no Kueue queue label (it holds no accelerator, and a driver queued behind
    the Jobs it submits could deadlock a full quota); no secret at all: stage pods read their keys by
    reference, the driver needs none.
    """
    if not command:
        raise ConfigError("the driver needs a command")
    name = driver_job_name(run_id)
    labels = {NAME_LABEL: "inpars", RUN_LABEL: run_label(run_id), STAGE_LABEL: DRIVER_STAGE, ATTEMPT_LABEL: "0"}
    annotations = {RUN_ANNOTATION: run_id}
    if runs:
        annotations[RUN_IDS_ANNOTATION] = ",".join(runs)
    container = {
        "name": DRIVER_CONTAINER,
        "image": image_for(image, ResourcesConfig()),
        "command": [str(arg) for arg in command],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    pod = {
        "containers": [container],
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
    }
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"annotations": annotations, "labels": dict(labels), "name": name, "namespace": namespace},
        "spec": {
            "backoffLimit": backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": DRIVER_CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]},
                    },
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod},
            "ttlSecondsAfterFinished": ttl_seconds,
        },
    }
    validate_manifest(manifest)
    return manifest


def _sized_template(job: StageJob) -> dict[str, Any]:
    """The stage's template with its ``scratch`` volume as large as the pod's ``ephemeral-storage``."""
    template = copy.deepcopy(load_template(job.stage))
    size = job.resources.ephemeral_storage
    if size:
        for volume in (template.get("pod") or {}).get("volumes") or []:
            if volume.get("name") == "scratch" and "emptyDir" in volume:
                volume["emptyDir"]["sizeLimit"] = str(size)
    return template


def _apply_template(manifest: dict[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay the rendered Job on the stage template (the StageJob wins on conflicts)."""
    out = copy.deepcopy(manifest)
    spec = out["spec"]
    for key, value in (template.get("job") or {}).items():
        spec.setdefault(key, copy.deepcopy(value))
    pod = spec["template"]["spec"]
    spec["template"]["spec"] = _merge(copy.deepcopy(template.get("pod") or {}), {k: v for k, v in pod.items() if k != "containers"})
    spec["template"]["spec"]["containers"] = pod["containers"]
    extra = copy.deepcopy(template.get("container") or {})
    container = pod["containers"][0]
    rendered_env = container.get("env", [])
    names = {e["name"] for e in rendered_env}
    defaults = [e for e in extra.pop("env", []) if e["name"] not in names]
    merged = _merge(extra, {k: v for k, v in container.items() if k != "env"})
    merged["env"] = defaults + rendered_env
    first = ("name", "image", "command", "args", "env", "resources", "volumeMounts")
    pod["containers"][0] = {key: merged[key] for key in first if key in merged} | {
        key: value for key, value in merged.items() if key not in first
    }
    return out


def render_pipeline(jobs: Sequence[StageJob], **kwargs: Any) -> list[dict[str, Any]]:
    """Every stage's manifest (keyword arguments as for :func:`render_stage`)."""
    return [render_stage(job, **kwargs) for job in jobs]


def to_yaml(manifests: Sequence[Mapping[str, Any]]) -> str:
    """Manifests as one multi-document YAML stream (``kubectl apply -f -`` takes it)."""
    return "---\n".join(yaml.safe_dump(dict(m), sort_keys=False) for m in manifests)


def dry_run(jobs: Sequence[StageJob], **kwargs: Any) -> str:
    """What ``inpars-launch run --backend k8s --dry-run`` prints: every stage's manifest as YAML.

    Each one has passed :func:`validate_manifest`, so what a real API server would reject for its
    names, labels or quantities fails here, before anything is submitted.
    """
    return to_yaml(render_pipeline(jobs, **kwargs))


# --------------------------------------------------------------------------------------------
# Validation (what the JSON schemas do not check)


def validate_manifest(obj: Mapping[str, Any]) -> None:
    """Check names (DNS-1123), label keys/values, env names, quantities and generated names; raise :class:`ConfigError`.

    ``kubernetes-validate`` checks structure; this checks the values the schemas leave open and the
    names the API server derives: an Indexed Job's pod hostnames ``<job>-<index>`` and a JobSet's
    ``<jobset>-<replicatedJob>-<jobIndex>-<podIndex>-<5 chars>`` pod names must be DNS labels.
    """
    from kubernetes.utils.quantity import parse_quantity

    errors: list[str] = []
    kind = obj.get("kind", "?")
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    spec = obj.get("spec") or {}
    # Jobs (their name becomes a pod label value) and Services need DNS-1123 labels; a JobSet's
    # name is also its headless Service's (DNS-1035: starts with a letter).
    if kind in ("Job", "Namespace", "Service"):
        if not (len(name) <= MAX_NAME and _DNS1123_LABEL.match(name)):
            errors.append(f"metadata.name {name!r} is not a DNS-1123 label (<= 63 chars, [a-z0-9-])")
    elif kind == "JobSet":
        if not (len(name) <= MAX_NAME and _DNS1035_LABEL.match(name)):
            errors.append(f"metadata.name {name!r} is not a DNS-1035 label (<= 63 chars, [a-z0-9-], starting with a letter)")
    elif not (len(name) <= 253 and _DNS1123_SUBDOMAIN.match(name)):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")

    if kind == "Job" and spec.get("completionMode") == "Indexed":
        hostname = f"{name}-{max(int(spec.get('completions') or 1), 1) - 1}"
        if not (len(hostname) <= MAX_NAME and _DNS1123_LABEL.match(hostname)):
            errors.append(
                f"the last pod's hostname {hostname!r} ({len(hostname)} chars) is not a DNS label (<= 63): the API server rejects the Job"
            )
    if kind == "JobSet":
        for rjob in spec.get("replicatedJobs") or []:
            rname, replicas = rjob.get("name", ""), int(rjob.get("replicas") or 1)
            jspec = (rjob.get("template") or {}).get("spec") or {}
            longest_job = f"{name}-{rname}-{replicas - 1}"
            if not (len(longest_job) <= MAX_NAME and _DNS1035_LABEL.match(longest_job)):
                errors.append(f"replicatedJob {rname!r}: Job name {longest_job!r} is not a DNS-1035 label (<= 63)")
            if jspec.get("completionMode") == "Indexed" and jspec.get("completions"):
                pod = f"{longest_job}-{int(jspec['completions']) - 1}-abcde"
                if not (len(pod) <= MAX_NAME and _DNS1035_LABEL.match(pod)):
                    errors.append(
                        f"replicatedJob {rname!r}: pod name {pod!r} ({len(pod)} chars) is too long: the JobSet webhook rejects it"
                    )

    def check_labels(labels: Mapping[str, Any] | None, where: str) -> None:
        for key, value in (labels or {}).items():
            prefix, _, lname = key.rpartition("/")
            if prefix and not (len(prefix) <= 253 and _DNS1123_SUBDOMAIN.match(prefix)):
                errors.append(f"{where}: label key {key!r} has a bad prefix")
            if not (len(lname) <= MAX_NAME and _LABEL_NAME.match(lname)):
                errors.append(f"{where}: label key {key!r} is not a valid name")
            if not isinstance(value, str) or len(value) > MAX_NAME or (value and not _LABEL_NAME.match(value)):
                errors.append(f"{where}: label {key}={value!r} is not a valid label value (<= 63 chars)")

    def quantity(value: Any, where: str) -> None:
        try:
            parse_quantity(value)
        except (ValueError, TypeError, ArithmeticError):
            errors.append(f"{where}: {value!r} is not a quantity")

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("metadata"), dict):
                check_labels(node["metadata"].get("labels"), f"{path}.metadata.labels")
            for key in ("containers", "initContainers"):
                for i, c in enumerate(node.get(key) or []):
                    where = f"{path}.{key}[{i}]"
                    if not _DNS1123_LABEL.match(c.get("name", "")):
                        errors.append(f"{where}.name {c.get('name')!r} is not a DNS-1123 label")
                    for section in ("requests", "limits"):
                        for res, value in ((c.get("resources") or {}).get(section) or {}).items():
                            quantity(value, f"{where}.resources.{section}.{res}")
                    for e in c.get("env") or []:
                        if not _ENV_NAME.match(e.get("name", "")):
                            errors.append(f"{where}.env: bad variable name {e.get('name')!r}")
            if "sizeLimit" in node:
                quantity(node["sizeLimit"], f"{path}.sizeLimit")
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(dict(obj), kind)
    if errors:
        raise ConfigError(f"{kind} {name!r}: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------
# The rendered examples in jobs/ (kept up to date by a test)

EXAMPLE_RUN_ID = "example"
EXAMPLE_NAMESPACE = "inpars"
EXAMPLE_RUN_URI = "gs://YOUR-BUCKET/inpars/runs/example"


# The default config, spread over a cluster: sharded stages and an L4 GPU for the model stages.
EXAMPLE_CONFIG = {
    "generate": {"shards": 8},
    "negatives": {"shards": 4},
    "rerank": {"shards": 4},
    "publish": {"destination": "gs://YOUR-BUCKET/inpars/published"},
    "resources": {
        "generate": {"cpu": "4", "memory": "16Gi", "gpu": 1, "gpu_type": "nvidia-l4", "parallelism": 4},
        "train": {"cpu": "4", "memory": "16Gi", "gpu": 1, "gpu_type": "nvidia-l4"},
        "rerank": {"cpu": "4", "memory": "16Gi", "gpu": 1, "gpu_type": "nvidia-l4", "parallelism": 4},
    },
}
# Training on a multi-host TPU slice: v5p 2x2x2 is 8 chips on 2 hosts, so a JobSet.
EXAMPLE_TPU_TRAIN = {"train": {"cpu": "8", "memory": "64Gi", "tpu_type": "tpu-v5p-slice", "tpu_topology": "2x2x2"}}


# The examples' pods are sized for MS MARCO's corpus (8.8M passages, a 3.2 GB corpus.jsonl), as the launcher
# would size them from the corpus file before prepare ran (DataSize.estimate).
EXAMPLE_CORPUS_BYTES = 3_200_000_000


def render_examples() -> dict[str, str]:
    """``jobs/<stage>.yaml``: every stage of :data:`EXAMPLE_CONFIG` (the default config, with shards and
    GPUs) sized for :data:`EXAMPLE_CORPUS_BYTES`, ``jobs/train-tpu-multihost.yaml``: training on a v5p
    2x2x2 slice (a JobSet), and ``jobs/driver.yaml``: the run's driver Job (``--detach``)."""
    from ..config import PipelineConfig
    from ..pipeline import DataSize
    from .plan import plan_pipeline

    data = DataSize.estimate(EXAMPLE_CORPUS_BYTES)

    config = PipelineConfig.from_dict(EXAMPLE_CONFIG)
    header = (
        "# Rendered by `python -m inpars.launch.k8s_manifests --write-examples jobs/` from EXAMPLE_CONFIG in\n"
        "# inpars/launch/k8s_manifests.py. Do not edit: change inpars/launch/templates/ or the renderer, then re-render.\n"
    )

    def text(job: StageJob) -> str:
        return header + to_yaml([render_stage(job, run_id=EXAMPLE_RUN_ID, namespace=EXAMPLE_NAMESPACE, image=config.image)])

    out = {f"{job.stage}.yaml": text(job) for job in plan_pipeline(config, EXAMPLE_RUN_URI, data=data)}
    tpu = PipelineConfig.from_dict({**EXAMPLE_CONFIG, "resources": {**EXAMPLE_CONFIG["resources"], **EXAMPLE_TPU_TRAIN}})
    [train] = [job for job in plan_pipeline(tpu, EXAMPLE_RUN_URI, until="train", data=data) if job.stage == "train"]
    out["train-tpu-multihost.yaml"] = text(train)
    from .detach import run_driver_manifest

    driver = run_driver_manifest(EXAMPLE_RUN_URI, EXAMPLE_RUN_ID, namespace=EXAMPLE_NAMESPACE, image=config.image)
    out["driver.yaml"] = header + to_yaml([driver])
    return out


if __name__ == "__main__":  # python -m inpars.launch.k8s_manifests --write-examples jobs/
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Write the rendered example Jobs.")
    parser.add_argument("--write-examples", metavar="DIR", required=True)
    out = Path(parser.parse_args().write_examples)
    out.mkdir(parents=True, exist_ok=True)
    for filename, text in render_examples().items():
        (out / filename).write_text(text, encoding="utf-8")
        print(out / filename)
