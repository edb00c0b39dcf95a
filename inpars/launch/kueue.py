"""Can a Kueue queue ever admit a stage's Job? Checked before submitting, from the queue's own objects.

Kueue admits a workload (a Job's ``parallelism`` pods, or a JobSet's pods) only when, for every
resource a pod requests, the ClusterQueue has a resource group covering it and one of that group's
flavours both matches the pod (the flavour's node labels agree with the pod's node selector, its
taints are tolerated) and has the quota for all pods at once: ``nominalQuota`` plus what it may
borrow from its cohort. A Job that can never fit waits suspended for ever, so the launcher refuses it
before submission; a Job whose default ``parallelism`` is what does not fit is given the largest
parallelism that does (an explicit ``resources.<stage>.parallelism`` is refused instead).

Reads (``CustomObjectsApi``): the LocalQueue (namespaced), its ClusterQueue and the ResourceFlavors
(cluster-scoped), the cohort's other ClusterQueues, and, for a stuck Job, its Workload's conditions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..errors import ConfigError

GROUP = "kueue.x-k8s.io"
VERSIONS = ("v1beta1", "v1beta2")  # v1beta1 first: what k8s/kueue/ applies and every release serves


class QueueRefusedError(ConfigError):
    """The queue can never admit the Job (a permanent error: fix the queue or the request)."""


@dataclass
class PodSet:
    """``count`` pods that each request ``requests`` (what Kueue sizes a workload by)."""

    name: str
    count: int
    requests: dict[str, Decimal]
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class QueueView:
    """A LocalQueue's ClusterQueue, the flavours it names, and its cohort's other ClusterQueues."""

    local_queue: str
    cluster_queue: dict[str, Any]
    flavors: dict[str, dict[str, Any]]
    cohort: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cluster_queue.get("metadata", {}).get("name", "?")


@dataclass
class Admission:
    """The verdict for one workload. ``problems``: why not even one pod could ever be admitted.
    ``max_pods``: the most pods of the first pod set that fit at once (None: no quota limits them),
    against the ``pods`` it asks for."""

    problems: list[str]
    max_pods: int | None
    pods: int
    limited_by: str = ""  # the resources whose quota sets max_pods

    @property
    def too_many_pods(self) -> bool:
        return self.max_pods is not None and self.max_pods < self.pods

    @property
    def fits(self) -> bool:
        return not self.problems and not self.too_many_pods

    def explain(self, queue: str) -> str:
        lines = list(self.problems)
        if self.too_many_pods:
            lines.append(
                f"{self.pods} pods at once exceed what ClusterQueue {queue} can ever admit ({self.max_pods}) for {self.limited_by}"
            )
        return "; ".join(lines)


def _quantity(value: Any) -> Decimal:
    from kubernetes.utils.quantity import parse_quantity

    return Decimal(parse_quantity(value))


def pod_sets(manifest: Mapping[str, Any]) -> list[PodSet]:
    """The pod sets Kueue would see for a Job (``parallelism`` pods) or a JobSet (per replicated Job)."""

    def from_job_spec(name: str, spec: Mapping[str, Any], replicas: int) -> PodSet:
        parallelism = int(spec.get("parallelism") or 1)
        completions = spec.get("completions")
        count = min(parallelism, int(completions)) if completions is not None else parallelism
        pod = (spec.get("template") or {}).get("spec") or {}
        requests: dict[str, Decimal] = {}
        for c in pod.get("containers") or []:
            res = c.get("resources") or {}
            # A request defaults to the limit (as the API server fills it in).
            merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
            for key, value in merged.items():
                requests[key] = requests.get(key, Decimal(0)) + _quantity(value)
        return PodSet(name, count * replicas, requests, dict(pod.get("nodeSelector") or {}), list(pod.get("tolerations") or []))

    spec = manifest.get("spec") or {}
    if manifest.get("kind") == "JobSet":
        return [
            from_job_spec(r.get("name", "?"), (r.get("template") or {}).get("spec") or {}, int(r.get("replicas") or 1))
            for r in spec.get("replicatedJobs") or []
        ]
    return [from_job_spec("main", spec, 1)]


def _tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t.get("key") == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value") == taint.get("value"):
            return True
    return False


def _flavor_mismatch(pod: PodSet, flavor: Mapping[str, Any]) -> str | None:
    spec = flavor.get("spec") or {}
    for key, value in (spec.get("nodeLabels") or {}).items():
        if key in pod.node_selector and pod.node_selector[key] != value:
            return f"node label {key}={value} (the pod selects {pod.node_selector[key]})"
    for taint in spec.get("nodeTaints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(pod.tolerations, taint):
            return f"taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')} is not tolerated"
    return None


def _capacity(view: QueueView, flavor: str, quota: Mapping[str, Any]) -> Decimal:
    """Nominal quota plus what may be borrowed: ``borrowingLimit``, or (unset, in a cohort) what the
    cohort's other queues lend for this flavour and resource."""
    nominal = _quantity(quota.get("nominalQuota", 0))
    spec = view.cluster_queue.get("spec") or {}
    if not (spec.get("cohort") or spec.get("cohortName")):
        return nominal
    if quota.get("borrowingLimit") is not None:
        return nominal + _quantity(quota["borrowingLimit"])
    lent = Decimal(0)
    for other in view.cohort:
        for group in (other.get("spec") or {}).get("resourceGroups") or []:
            for fl in group.get("flavors") or []:
                if fl.get("name") != flavor:
                    continue
                for res in fl.get("resources") or []:
                    if res.get("name") == quota.get("name"):
                        lent += _quantity(res.get("lendingLimit", res.get("nominalQuota", 0)))
    return nominal + lent


def check_admission(manifest: Mapping[str, Any], view: QueueView) -> Admission:
    """Whether ``view``'s ClusterQueue can ever admit ``manifest``'s pods (see the module docstring)."""
    cq = view.cluster_queue.get("spec") or {}
    problems: list[str] = []
    stop = cq.get("stopPolicy")
    if stop and stop != "None":
        problems.append(f"ClusterQueue {view.name} is stopped (stopPolicy: {stop})")
    groups = cq.get("resourceGroups") or []
    first: Admission | None = None
    for pod in pod_sets(manifest):
        wanted = {r: q for r, q in pod.requests.items() if q > 0}
        by_group: dict[int, list[str]] = {}
        for res in sorted(wanted):
            index = next((g for g, group in enumerate(groups) if res in (group.get("coveredResources") or [])), None)
            if index is None:
                problems.append(f"ClusterQueue {view.name} has no flavour for {res}: no resource group covers it")
            else:
                by_group.setdefault(index, []).append(res)
        most: int | None = None  # pods of this set that fit in every group
        limited_by: list[str] = []
        for index, resources in sorted(by_group.items()):
            best = 0
            reasons = []
            for fl in groups[index].get("flavors") or []:
                name = fl.get("name", "?")
                mismatch = _flavor_mismatch(pod, view.flavors.get(name) or {})
                if mismatch:
                    reasons.append(f"flavour {name}: {mismatch}")
                    continue
                quotas = {q.get("name"): q for q in fl.get("resources") or []}
                fit = min(int(_capacity(view, name, quotas[r]) // wanted[r]) if r in quotas else 0 for r in resources)
                if fit == 0:
                    need = ", ".join(f"{r} {wanted[r].normalize():f}" for r in resources)
                    reasons.append(f"flavour {name}: its quota is less than one pod's request ({need})")
                best = max(best, fit)
            if best == 0:
                detail = "; ".join(reasons) or "no flavours"
                problems.append(f"ClusterQueue {view.name} cannot admit even one pod for {', '.join(resources)} ({detail})")
            elif most is None or best < most:
                most, limited_by = best, resources
            elif best == most:
                limited_by = limited_by + resources
        verdict = Admission(problems, most, pod.count, ", ".join(limited_by))
        if first is None:
            first = verdict
        elif verdict.too_many_pods:  # a later pod set that does not fit is a hard problem here
            problems.append(verdict.explain(view.name))
    return first or Admission(problems, None, 0)


# --------------------------------------------------------------------------------------------
# Reading the queue from the cluster


def _get(custom: Any, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """The object, or None when no served Kueue version has it (404). Other errors propagate."""
    from kubernetes.client.exceptions import ApiException

    for version in VERSIONS:
        try:
            if namespace is None:
                return custom.get_cluster_custom_object(GROUP, version, plural, name)
            return custom.get_namespaced_custom_object(GROUP, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
    return None


def read_queue(custom: Any, namespace: str, queue: str) -> QueueView | None:
    """The queue behind LocalQueue ``queue``; None when RBAC forbids reading it (then nothing is checked).

    Raises :class:`QueueRefusedError` when the LocalQueue or its ClusterQueue does not exist: a Job
    labelled for it would stay suspended for ever.
    """
    from kubernetes.client.exceptions import ApiException

    try:
        local = _get(custom, "localqueues", queue, namespace)
        if local is None:
            raise QueueRefusedError(
                f"Kueue LocalQueue {queue!r} not found in namespace {namespace!r} (is Kueue installed? kubectl apply -k k8s/kueue/): "
                "a Job for it would stay suspended for ever"
            )
        cq_name = (local.get("spec") or {}).get("clusterQueue", "")
        cq = _get(custom, "clusterqueues", cq_name)
        if cq is None:
            raise QueueRefusedError(f"LocalQueue {queue!r} points to ClusterQueue {cq_name!r}, which does not exist")
        flavors: dict[str, dict[str, Any]] = {}
        for group in (cq.get("spec") or {}).get("resourceGroups") or []:
            for fl in group.get("flavors") or []:
                name = fl.get("name", "")
                if name and name not in flavors:
                    flavors[name] = _get(custom, "resourceflavors", name) or {}
        cohort_name = (cq.get("spec") or {}).get("cohort") or (cq.get("spec") or {}).get("cohortName")
        cohort = []
        if cohort_name:
            items = custom.list_cluster_custom_object(GROUP, cq.get("apiVersion", f"{GROUP}/v1beta1").split("/")[-1], "clusterqueues")
            for other in items.get("items") or []:
                spec = other.get("spec") or {}
                if (spec.get("cohort") or spec.get("cohortName")) == cohort_name and other.get("metadata", {}).get("name") != cq_name:
                    cohort.append(other)
    except ApiException as exc:
        if exc.status == 403:
            return None
        raise
    return QueueView(queue, cq, flavors, cohort)


def workload_messages(custom: Any, namespace: str, owner: str) -> list[str]:
    """Why Kueue has not admitted ``owner`` (a Job or JobSet name): its Workload's unmet conditions."""
    from kubernetes.client.exceptions import ApiException

    for version in VERSIONS:
        try:
            items = custom.list_namespaced_custom_object(GROUP, version, namespace, "workloads").get("items") or []
        except ApiException as exc:
            if exc.status in (403, 404):
                continue
            raise
        for wl in items:
            owners = (wl.get("metadata") or {}).get("ownerReferences") or []
            if any(o.get("name") == owner and o.get("kind") in ("Job", "JobSet") for o in owners):
                out = []
                for cond in (wl.get("status") or {}).get("conditions") or []:
                    if cond.get("type") in ("QuotaReserved", "Admitted") and str(cond.get("status")) != "True" and cond.get("message"):
                        out.append(f"Kueue {cond.get('type')}={cond.get('status')} ({cond.get('reason', '')}): {cond['message']}")
                    elif cond.get("type") == "Evicted" and str(cond.get("status")) == "True":
                        out.append(f"Kueue evicted it ({cond.get('reason', '')}): {cond.get('message', '')}")
                return out
        return []
    return []
