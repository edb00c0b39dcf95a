"""The Kubernetes backend: render :class:`StageJob`s as Indexed Jobs, submit, watch, resume, cancel.

One stage is one ``batch/v1`` Job with ``completionMode: Indexed``: pod *i* gets
``JOB_COMPLETION_INDEX=i`` and runs the same ``inpars worker <stage> --run RUN`` command that the
local executor runs. The workspace (a ``gs://`` prefix) is the truth about what is done; Jobs are
only the means, so a launcher can die, restart, and pick its Jobs up again by label.

Shard-index contract (read by the worker, see :func:`shard_from_env`):

* ``JOB_COMPLETION_INDEX`` — set by Kubernetes (or the local executor): the completion index.
* ``INPARS_SHARD_COUNT`` — always set: the stage's full shard count (the ``-of-N`` of shard names).
* ``INPARS_SHARD_INDEXES`` — set only on resume Jobs, e.g. ``"3,7,9"``: completion index *i* runs
  shard ``INPARS_SHARD_INDEXES[i]`` (an Indexed Job cannot pick arbitrary indexes, so a Job that
  redoes only the missing shards has ``completions = len(missing)`` and maps through this list).

Job-level choices (why): ``backoffLimitPerIndex`` retries each shard on its own;
``podFailurePolicy`` ignores disruptions (preemption costs no retry) and fails a shard at once on
:data:`inpars.errors.EXIT_PERMANENT`; ``podReplacementPolicy: Failed`` never runs two pods on one
shard; ``maxFailedIndexes`` stops a Job that fails broadly instead of burning retries.

Tested against kmock (an in-memory API server without selectors, resourceVersions or PUT), so every
list is also filtered client-side and every watch loop stops on its own terminal condition.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from ..config import ResourcesConfig
from ..errors import EXIT_PERMANENT, ConfigError
from .plan import StageJob

# Labels and annotations the launcher writes and selects on.
NAME_LABEL = "app.kubernetes.io/name"
RUN_LABEL = "inpars.io/run-id"
STAGE_LABEL = "inpars.io/stage"
ATTEMPT_LABEL = "inpars.io/attempt"
RUN_ANNOTATION = "inpars.io/run-id"  # the run id unabridged (a label value is at most 63 chars)
SHARDS_ANNOTATION = "inpars.io/shard-indexes"  # the shards this Job runs, "3,7,9" or "0-63"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on pods by the Job controller
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

# The worker contract (see the module docstring).
SHARD_INDEXES_ENV = "INPARS_SHARD_INDEXES"
SHARD_COUNT_ENV = "INPARS_SHARD_COUNT"
RUN_ID_ENV = "INPARS_RUN_ID"

CONTAINER = "worker"
DEFAULT_SERVICE_ACCOUNT = "inpars-runner"
RUN_AS_USER = 1000  # the non-root user of the images (images/Dockerfile.*)

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
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
    return _slug(run_id, 63)


def job_name(run_id: str, stage: str, attempt: int = 0) -> str:
    """``inpars-<run>-<stage>[-r<attempt>]``: a DNS-1123 label of at most 63 characters."""
    suffix = f"-{stage}" + (f"-r{attempt}" if attempt else "")
    budget = 63 - len("inpars-") - len(suffix)
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


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int | None]:
    """``(shard index, shard count or None)`` for a worker, per the contract above.

    A reference implementation of the worker side; ``inpars.shards`` owns the real one.
    """
    env = os.environ if environ is None else environ
    raw = env.get("JOB_COMPLETION_INDEX")
    if raw is None:
        raise ConfigError("JOB_COMPLETION_INDEX is not set")
    index = int(raw)
    count = int(env[SHARD_COUNT_ENV]) if env.get(SHARD_COUNT_ENV) else None
    mapping = env.get(SHARD_INDEXES_ENV)
    if mapping:
        shards = [int(x) for x in mapping.split(",")]
        if not 0 <= index < len(shards):
            raise ConfigError(f"JOB_COMPLETION_INDEX={index} is outside {SHARD_INDEXES_ENV}={mapping!r}")
        index = shards[index]
    return index, count


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


def _resources(r: ResourcesConfig, stage: str) -> tuple[Any, dict[str, str], list[Any]]:
    """Container resources, node selector and tolerations for one stage."""
    from kubernetes import client as k

    requests = {"cpu": str(r.cpu), "memory": str(r.memory)}
    limits = dict(requests)
    selector: dict[str, str] = {}
    tolerations = []
    if r.gpu and r.tpu_type:
        raise ConfigError(f"resources.{stage}: set gpu or tpu_type, not both")
    if r.gpu_type and not r.gpu:
        raise ConfigError(f"resources.{stage}: gpu_type={r.gpu_type!r} needs gpu >= 1")
    if r.gpu:
        limits["nvidia.com/gpu"] = str(int(r.gpu))
        if r.gpu_type:
            selector["cloud.google.com/gke-accelerator"] = r.gpu_type
        tolerations.append(k.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"))
    if r.tpu_type:
        if not r.tpu_topology:
            raise ConfigError(f"resources.{stage}: tpu_type needs tpu_topology (e.g. 2x2)")
        try:
            chips = math.prod(int(x) for x in r.tpu_topology.lower().split("x"))
        except ValueError:
            raise ConfigError(f"resources.{stage}: bad tpu_topology {r.tpu_topology!r}") from None
        if chips > 8:
            # One pod drives one host; a multi-host slice needs a JobSet (not supported here).
            raise ConfigError(f"resources.{stage}: tpu_topology {r.tpu_topology} spans several hosts; use a single-host slice (<= 8 chips)")
        requests["google.com/tpu"] = limits["google.com/tpu"] = str(chips)
        selector["cloud.google.com/gke-tpu-accelerator"] = r.tpu_type
        selector["cloud.google.com/gke-tpu-topology"] = r.tpu_topology
        tolerations.append(k.V1Toleration(key="google.com/tpu", operator="Exists", effect="NoSchedule"))
    return k.V1ResourceRequirements(requests=requests, limits=limits), selector, tolerations


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
) -> dict[str, Any]:
    """One stage as an Indexed ``batch/v1`` Job, in wire form (what the API server takes).

    ``indexes``: run only these shards (resume): ``completions = len(indexes)`` and the worker maps
    its completion index through ``INPARS_SHARD_INDEXES``. ``attempt`` > 0 adds ``-r<attempt>`` to
    the name so a resume Job never collides with the finished Job it follows. ``max_failed_indexes``
    defaults to a quarter of the completions (at least 1): failed shards are redone on resume.
    ``image`` may hold ``{variant}`` or a ``:cpu`` tag; see :func:`image_for`.
    """
    from kubernetes import client as k

    if job.shards < 1:
        raise ConfigError(f"stage {job.stage}: shards must be >= 1, got {job.shards}")
    if indexes is not None:
        shard_list = sorted(set(int(i) for i in indexes))
        if not shard_list:
            raise ConfigError(f"stage {job.stage}: no shard indexes to run")
        bad = [i for i in shard_list if not 0 <= i < job.shards]
        if bad:
            raise ConfigError(f"stage {job.stage}: shard indexes {bad} are outside [0, {job.shards})")
    else:
        shard_list = list(range(job.shards))
    completions = len(shard_list)
    parallelism = max(1, min(job.parallelism or completions, completions))
    if max_failed_indexes is None:
        max_failed_indexes = max(1, completions // 4)
    max_failed_indexes = min(max_failed_indexes, completions)

    name = job_name(run_id, job.stage, attempt)
    labels = {NAME_LABEL: "inpars", RUN_LABEL: run_label(run_id), STAGE_LABEL: job.stage, ATTEMPT_LABEL: str(attempt)}
    job_labels = dict(labels)
    if queue:
        job_labels[QUEUE_LABEL] = queue

    both = set(job.env) & set(job.secret_env)
    if both:
        raise ConfigError(f"stage {job.stage}: {sorted(both)} set both as plain env and as secret")
    env = [k.V1EnvVar(name=var, value=str(value)) for var, value in job.env.items()]
    env.append(k.V1EnvVar(name=SHARD_COUNT_ENV, value=str(job.shards)))
    env.append(k.V1EnvVar(name=RUN_ID_ENV, value=run_id))
    if indexes is not None:
        env.append(k.V1EnvVar(name=SHARD_INDEXES_ENV, value=",".join(map(str, shard_list))))
    for var, (secret, key) in job.secret_env.items():
        # Keys travel by reference only: the manifest never holds a value.
        ref = k.V1SecretKeySelector(name=secret, key=key)
        env.append(k.V1EnvVar(name=var, value_from=k.V1EnvVarSource(secret_key_ref=ref)))

    resources, node_selector, tolerations = _resources(job.resources, job.stage)
    container = k.V1Container(
        name=CONTAINER,
        image=image_for(image, job.resources),
        command=list(job.command),
        env=env,
        resources=resources,
        security_context=k.V1SecurityContext(allow_privilege_escalation=False, capabilities=k.V1Capabilities(drop=["ALL"])),
    )
    pod = k.V1PodSpec(
        containers=[container],
        restart_policy="Never",
        service_account_name=service_account,
        node_selector=node_selector or None,
        tolerations=tolerations or None,
        security_context=k.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=RUN_AS_USER,
            run_as_group=RUN_AS_USER,
            fs_group=RUN_AS_USER,
            seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    failure_policy = k.V1PodFailurePolicy(
        rules=[
            # Preemption / eviction / node drain: retry without counting against backoffLimitPerIndex.
            k.V1PodFailurePolicyRule(
                action="Ignore",
                on_pod_conditions=[k.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")],
            ),
            # A permanent error (bad input/config) fails again on retry: fail this shard at once.
            k.V1PodFailurePolicyRule(
                action="FailIndex",
                on_exit_codes=k.V1PodFailurePolicyOnExitCodesRequirement(container_name=CONTAINER, operator="In", values=[EXIT_PERMANENT]),
            ),
        ]
    )
    body = k.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k.V1ObjectMeta(
            name=name,
            namespace=namespace,  # kmock (and kubectl apply -f) need it on the object itself
            labels=job_labels,
            annotations={RUN_ANNOTATION: run_id, SHARDS_ANNOTATION: format_indexes(shard_list)},
        ),
        spec=k.V1JobSpec(
            completion_mode="Indexed",
            completions=completions,
            parallelism=parallelism,
            backoff_limit_per_index=job.max_retries,
            max_failed_indexes=max_failed_indexes,
            pod_failure_policy=failure_policy,
            pod_replacement_policy="Failed",
            ttl_seconds_after_finished=ttl_seconds,
            suspend=True if queue else None,  # Kueue admits (unsuspends) it when quota allows
            template=k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=labels), spec=pod),
        ),
    )
    manifest = k.ApiClient().sanitize_for_serialization(body)
    manifest = _apply_template(manifest, load_template(job.stage))
    validate_manifest(manifest)
    return manifest


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
    """Every stage's Job (keyword arguments as for :func:`render_job`)."""
    return [render_job(job, **kwargs) for job in jobs]


def to_yaml(manifests: Sequence[Mapping[str, Any]]) -> str:
    """Manifests as one multi-document YAML stream (``kubectl apply -f -`` takes it)."""
    return "---\n".join(yaml.safe_dump(dict(m), sort_keys=False) for m in manifests)


def dry_run(jobs: Sequence[StageJob], **kwargs: Any) -> str:
    """What ``inpars-launch run --backend k8s --dry-run`` prints: every stage's Job as YAML."""
    return to_yaml(render_pipeline(jobs, **kwargs))


# --------------------------------------------------------------------------------------------
# Validation (what the JSON schemas do not check)


def validate_manifest(obj: Mapping[str, Any]) -> None:
    """Check names (DNS-1123), label keys/values, env names and quantities; raise :class:`ConfigError`.

    ``kubernetes-validate`` checks structure; this checks the values the schemas leave open.
    """
    from kubernetes.utils.quantity import parse_quantity

    errors: list[str] = []
    kind = obj.get("kind", "?")
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    # Jobs (their name becomes a pod label value) and Services need DNS-1123 labels.
    if kind in ("Job", "Namespace", "Service"):
        if not (len(name) <= 63 and _DNS1123_LABEL.match(name)):
            errors.append(f"metadata.name {name!r} is not a DNS-1123 label (<= 63 chars, [a-z0-9-])")
    elif not (len(name) <= 253 and _DNS1123_SUBDOMAIN.match(name)):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")

    def check_labels(labels: Mapping[str, Any] | None, where: str) -> None:
        for key, value in (labels or {}).items():
            prefix, _, lname = key.rpartition("/")
            if prefix and not (len(prefix) <= 253 and _DNS1123_SUBDOMAIN.match(prefix)):
                errors.append(f"{where}: label key {key!r} has a bad prefix")
            if not (len(lname) <= 63 and _LABEL_NAME.match(lname)):
                errors.append(f"{where}: label key {key!r} is not a valid name")
            if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_NAME.match(value)):
                errors.append(f"{where}: label {key}={value!r} is not a valid label value")

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
# Watching and the executor


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

    @property
    def finished(self) -> bool:
        return self.state in ("complete", "failed")

    def __str__(self) -> str:
        text = f"{self.stage}: {len(self.completed)}/{len(self.shards)} shards done, {self.active} running"
        if self.failed:
            text += f", failed shards {format_indexes(self.failed)}"
        return f"{text} [{self.state}]"


def progress_of(obj: Mapping[str, Any]) -> JobProgress:
    """A :class:`JobProgress` from a Job in wire form."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    shards = parse_indexes(annotations.get(SHARDS_ANNOTATION)) or list(range(spec.get("completions") or 1))
    count = spec.get("completions") or len(shards)
    for e in (((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}])[0].get("env") or []:
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
        completed=real(status.get("completedIndexes")),
        failed=real(status.get("failedIndexes")),
        active=status.get("active") or 0,
        state="queued" if spec.get("suspend") else "running",
    )
    for cond in status.get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        if cond.get("type") == "Complete":
            progress.state = "complete"
        elif cond.get("type") == "Failed":
            progress.state, progress.reason, progress.message = "failed", cond.get("reason"), cond.get("message")
    return progress


class JobFailedError(RuntimeError):
    """A stage Job failed; names the failed shards and carries the tail of their logs."""

    def __init__(self, progress: JobProgress, logs: Mapping[int, str]):
        self.progress, self.logs = progress, dict(logs)
        p = progress
        lines = [f"stage {p.stage!r} failed (Job {p.name}): " + (p.reason or "Failed") + (f": {p.message}" if p.message else "")]
        if p.failed:
            lines.append(f"failed shards: {format_indexes(p.failed)} of {p.shard_count}")
        for shard, text in sorted(self.logs.items()):
            lines.append(f"--- last log lines of shard {shard} ---")
            lines.append(text.rstrip() or "(no log)")
        lines.append("Fix the cause, then resume the run: finished shards are kept, only the missing ones rerun.")
        super().__init__("\n".join(lines))


class WorkspaceRun(Protocol):
    """What :meth:`K8sExecutor.run_pipeline` needs from ``inpars.workspace.Run``."""

    def missing_shards(self, stage: str, n: int) -> list[int]: ...


def _wire(api_client: Any, obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else api_client.sanitize_for_serialization(obj)


class K8sExecutor:
    """Submits, watches, resumes and cancels a run's stage Jobs in one namespace.

    ``api_client``: a configured ``kubernetes.client.ApiClient``; default: the kubeconfig, else the
    in-cluster service account.
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
    ):
        from kubernetes import client

        if api_client is None:
            from kubernetes import config as kube_config

            kube_config.load_config()  # kubeconfig, else in-cluster
            api_client = client.ApiClient()
        self.namespace, self.image, self.queue = namespace, image, queue
        self.service_account, self.ttl_seconds = service_account, ttl_seconds
        self.watch_timeout, self.log_lines = watch_timeout, log_lines
        self.api = api_client
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    # -- rendering and submission ------------------------------------------------------------

    def render(self, job: StageJob, run_id: str, *, indexes: Sequence[int] | None = None, attempt: int = 0) -> dict[str, Any]:
        return render_job(
            job,
            run_id=run_id,
            namespace=self.namespace,
            image=self.image,
            queue=self.queue,
            service_account=self.service_account,
            ttl_seconds=self.ttl_seconds,
            indexes=indexes,
            attempt=attempt,
        )

    def submit(self, job: StageJob, run_id: str, *, indexes: Sequence[int] | None = None, attempt: int = 0) -> str:
        """Create the stage's Job and return its name; adopt it if it already exists (a restarted launcher)."""
        from kubernetes.client.exceptions import ApiException

        manifest = self.render(job, run_id, indexes=indexes, attempt=attempt)
        name = manifest["metadata"]["name"]
        try:
            self.batch.create_namespaced_job(self.namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            existing = self._get(name)
            labels = existing.get("metadata", {}).get("labels") or {}
            if labels.get(RUN_LABEL) != run_label(run_id) or labels.get(STAGE_LABEL) != job.stage:
                raise ConfigError(f"Job {name} exists in {self.namespace} but belongs to another run/stage") from None
        return name

    def _get(self, name: str) -> dict[str, Any]:
        return _wire(self.api, self.batch.read_namespaced_job(name, self.namespace))

    def find_jobs(self, run_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        """The run's Jobs (optionally of one stage), oldest attempt first."""
        selector = f"{RUN_LABEL}={run_label(run_id)}" + (f",{STAGE_LABEL}={stage}" if stage else "")
        items = self.batch.list_namespaced_job(self.namespace, label_selector=selector).items
        jobs = []
        for obj in items:  # filter again: selectors are ignored by kmock (and cheap to re-check)
            o = _wire(self.api, obj)
            labels = o.get("metadata", {}).get("labels") or {}
            if labels.get(RUN_LABEL) == run_label(run_id) and (stage is None or labels.get(STAGE_LABEL) == stage):
                jobs.append(o)
        return sorted(
            jobs, key=lambda o: (o["metadata"]["labels"].get(STAGE_LABEL, ""), int(o["metadata"]["labels"].get(ATTEMPT_LABEL, "0")))
        )

    # -- watching -----------------------------------------------------------------------------

    def watch(self, job_name: str, on_progress: Callable[[JobProgress], None] | None = None) -> JobProgress:
        """Follow one Job until it completes (returns) or fails (raises :class:`JobFailedError`).

        Uses the watch API; a stream that ends (server timeout, dropped connection, 410 Gone) is
        simply reopened. The loop ends on the Job's own terminal condition, never on a timeout,
        because kmock's (and some proxies') watches ignore ``timeoutSeconds``.
        """
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        last: JobProgress | None = None

        def seen(obj: Mapping[str, Any]) -> JobProgress:
            nonlocal last
            progress = progress_of(obj)
            key = (progress.state, progress.completed, progress.failed, progress.active)
            if on_progress is not None and (last is None or key != (last.state, last.completed, last.failed, last.active)):
                on_progress(progress)
            last = progress
            return progress

        progress = seen(self._get(job_name))  # already finished? (e.g. an adopted Job)
        while not progress.finished:
            w = watch.Watch()
            try:
                for event in w.stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    field_selector=f"metadata.name={job_name}",
                    timeout_seconds=self.watch_timeout,
                    _request_timeout=self.watch_timeout + 30,
                ):
                    obj = _wire(self.api, event["object"])
                    if event["type"] == "ERROR" or obj.get("metadata", {}).get("name") != job_name:
                        continue
                    if event["type"] == "DELETED":
                        gone = progress_of(obj) if obj.get("spec") else progress
                        gone.state, gone.reason, gone.message = "failed", "Deleted", "the Job was deleted (cancelled?)"
                        raise JobFailedError(gone, {})
                    progress = seen(obj)
                    if progress.finished:
                        break
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion expired; re-list below
                    raise
            except Exception as exc:  # a dropped stream: re-read the Job and watch again
                if isinstance(exc, JobFailedError):
                    raise
                time.sleep(1)
            finally:
                w.stop()
            if not progress.finished:
                progress = seen(self._get(job_name))
        if progress.state == "failed":
            raise JobFailedError(progress, self._failed_logs(job_name, progress))
        return progress

    def _pods(self, job_name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_NAME_LABEL}={job_name}").items
        out = [_wire(self.api, p) for p in pods]
        return [p for p in out if (p.get("metadata", {}).get("labels") or {}).get(JOB_NAME_LABEL) == job_name]

    def _pod_log(self, pod: str, tail_lines: int | None) -> str:
        # Raw bytes: the typed path cannot decode every server's content type (kmock: octet-stream).
        resp = self.core.read_namespaced_pod_log(pod, self.namespace, container=CONTAINER, tail_lines=tail_lines, _preload_content=False)
        return resp.data.decode("utf-8", errors="replace")

    def _failed_logs(self, job_name: str, progress: JobProgress) -> dict[int, str]:
        """The log tail of the newest pod of each failed shard (best effort: logs may be gone)."""
        try:
            pods = self._pods(job_name)
        except Exception:
            return {}
        newest: dict[int, dict[str, Any]] = {}
        for pod in pods:
            meta = pod.get("metadata", {})
            raw = (meta.get("labels") or {}).get(COMPLETION_INDEX_LABEL) or (meta.get("annotations") or {}).get(
                "batch.kubernetes.io/job-completion-index"
            )
            if raw is None or not raw.isdigit() or int(raw) >= len(progress.shards):
                continue
            shard = progress.shards[int(raw)]
            if shard in progress.failed:
                stamp = meta.get("creationTimestamp") or ""
                if shard not in newest or str(stamp) >= str(newest[shard]["metadata"].get("creationTimestamp") or ""):
                    newest[shard] = pod
        logs = {}
        for shard, pod in sorted(newest.items())[:5]:  # a handful is enough to diagnose
            try:
                logs[shard] = self._pod_log(pod["metadata"]["name"], self.log_lines)
            except Exception as exc:
                logs[shard] = f"(log unavailable: {exc.__class__.__name__})"
        return logs

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
        for obj in self.find_jobs(run_id, stage):
            progress = progress_of(obj)
            for pod in self._pods(obj["metadata"]["name"]):
                raw = (pod["metadata"].get("labels") or {}).get(COMPLETION_INDEX_LABEL)
                shard = progress.shards[int(raw)] if raw and raw.isdigit() and int(raw) < len(progress.shards) else None
                if index is None or shard == index:
                    out[pod["metadata"]["name"]] = (shard, self._pod_log(pod["metadata"]["name"], tail_lines))
        return out

    def logs(self, run_id: str, stage: str, index: int | None = None, *, tail_lines: int | None = None) -> str:
        """A stage's pod logs as one text, each under a ``==> pod (shard i) <==`` header."""
        parts = [
            f"==> {pod} (shard {shard}) <==\n{text.rstrip()}"
            for pod, (shard, text) in sorted(self.pod_logs(run_id, stage, index, tail_lines=tail_lines).items())
        ]
        if not parts:
            return f"no pods found for stage {stage!r} of run {run_id!r}" + (f" shard {index}" if index is not None else "")
        return "\n".join(parts)

    def cancel(self, run_id: str) -> list[str]:
        """Delete the run's Jobs and their pods (the workspace keeps every committed shard)."""
        from kubernetes.client.exceptions import ApiException

        names = []
        for obj in self.find_jobs(run_id):
            name = obj["metadata"]["name"]
            try:
                self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")
            except ApiException as exc:
                if exc.status != 404:
                    raise
            names.append(name)
        return names

    def run_stage(
        self,
        job: StageJob,
        run_id: str,
        missing: Sequence[int],
        on_progress: Callable[[JobProgress], None] | None = None,
    ) -> JobProgress:
        """Run the ``missing`` shards of one stage: adopt a live Job of the stage, else submit one."""
        existing = self.find_jobs(run_id, job.stage)
        live = [o for o in existing if not progress_of(o).finished]
        if live:  # a restarted launcher: pick the running Job up instead of starting another
            name = live[-1]["metadata"]["name"]
        else:
            attempt = 1 + max((int(o["metadata"]["labels"].get(ATTEMPT_LABEL, "0")) for o in existing), default=-1)
            partial = sorted(missing) != list(range(job.shards))
            name = self.submit(job, run_id, indexes=sorted(missing) if partial else None, attempt=attempt)
        return self.watch(name, on_progress)

    def run_pipeline(
        self,
        jobs: Sequence[StageJob],
        run: WorkspaceRun,
        *,
        run_id: str | None = None,
        on_progress: Callable[[JobProgress], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> list[JobProgress]:
        """Run the stages in order; the workspace decides what is left to do.

        A stage whose shards are all committed is skipped; a partly done one runs only its missing
        shards. After a Job completes, the workspace must agree (a Job can complete while a commit
        was lost); otherwise this raises rather than start the next stage on partial input.
        """
        run_id = run_id or getattr(run, "run_id", None) or getattr(run, "id", None)
        if not run_id:
            raise ConfigError("run_pipeline needs a run id (pass run_id=)")
        say = log or (lambda text: print(text, file=sys.stderr))
        if on_progress is None:
            on_progress = lambda p: say(str(p))  # noqa: E731
        done = []
        for job in jobs:
            missing = sorted(run.missing_shards(job.stage, job.shards))
            if not missing:
                say(f"{job.stage}: all {job.shards} shards done, skipped")
                continue
            if len(missing) < job.shards:
                say(f"{job.stage}: resuming {len(missing)} of {job.shards} shards ({format_indexes(missing)})")
            progress = self.run_stage(job, run_id, missing, on_progress)
            still = sorted(run.missing_shards(job.stage, job.shards))
            if still:
                raise JobFailedError(
                    JobProgress(
                        progress.name,
                        job.stage,
                        run_id,
                        job.shards,
                        progress.shards,
                        failed=still,
                        state="failed",
                        reason="MissingOutput",
                        message=f"the Job completed but shards {format_indexes(still)} are not in the workspace",
                    ),
                    {},
                )
            say(f"{job.stage}: done")
            done.append(progress)
        return done


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


def render_examples() -> dict[str, str]:
    """``jobs/<stage>.yaml``: every stage of :data:`EXAMPLE_CONFIG` (the default config, with shards and GPUs)."""
    from ..config import PipelineConfig
    from .plan import plan_pipeline

    config = PipelineConfig.from_dict(EXAMPLE_CONFIG)
    header = (
        "# Rendered by `python -m inpars.launch.k8s --write-examples jobs/` from EXAMPLE_CONFIG in\n"
        "# inpars/launch/k8s.py. Do not edit: change inpars/launch/templates/ or the renderer, then re-render.\n"
    )
    return {
        f"{job.stage}.yaml": header + to_yaml([render_job(job, run_id=EXAMPLE_RUN_ID, namespace=EXAMPLE_NAMESPACE, image=config.image)])
        for job in plan_pipeline(config, EXAMPLE_RUN_URI)
    }


if __name__ == "__main__":  # python -m inpars.launch.k8s --write-examples jobs/
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Write the rendered example Jobs.")
    parser.add_argument("--write-examples", metavar="DIR", required=True)
    out = Path(parser.parse_args().write_examples)
    out.mkdir(parents=True, exist_ok=True)
    for filename, text in render_examples().items():
        (out / filename).write_text(text, encoding="utf-8")
        print(out / filename)
