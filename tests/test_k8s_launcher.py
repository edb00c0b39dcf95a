"""The Kubernetes executor against kmock, a real in-memory HTTP API server.

kmock has no Job controller, so each test plays it: it patches Job status (completedIndexes,
failedIndexes, conditions) through the same API the launcher uses, and creates pods with the labels
the real controller sets. The official client talks HTTP to kmock, run in a background thread.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

kmock = pytest.importorskip("kmock")
from kubernetes import client  # noqa: E402

from inpars.config import PipelineConfig, ResourcesConfig  # noqa: E402
from inpars.launch.k8s import JobDeletedError, JobFailedError, JobStuckError, K8sExecutor  # noqa: E402
from inpars.launch.k8s_manifests import COMPLETION_INDEX_LABEL, JOB_NAME_LABEL, format_indexes, parse_indexes  # noqa: E402
from inpars.launch.kueue import QueueRefusedError  # noqa: E402
from inpars.launch.plan import StageJob, plan_pipeline  # noqa: E402
from inpars.shards import SHARD_INDEXES_ENV  # noqa: E402

NS = "inpars"
ROOT = Path(__file__).resolve().parents[1]
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta1"


class KMockServer:
    """kmock's emulator on a loopback port, served from its own event loop thread."""

    def __init__(self) -> None:
        ready = threading.Event()
        self.error: BaseException | None = None

        async def main() -> None:
            async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
                # Declare the resources so that listing an empty kind answers [] (not 404).
                handler.resources["batch/v1/jobs"] = {}
                handler.resources["v1/pods"] = {}
                self.handler, self.url = handler, str(server.url).rstrip("/")
                self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
                ready.set()
                await self.stop_event.wait()

        def runner() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=runner, daemon=True)
        self.thread.start()
        assert ready.wait(20), "kmock did not start"
        if self.error:
            raise self.error

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


@pytest.fixture()
def server() -> Iterator[KMockServer]:
    srv = KMockServer()
    yield srv
    srv.close()


@pytest.fixture()
def api(server: KMockServer) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = server.url
    return client.ApiClient(cfg)


def executor(api: client.ApiClient, **kw) -> K8sExecutor:
    kw = {"check_interval": 1.0, "poll_interval": 0.1, **kw}
    return K8sExecutor(NS, "ghcr.io/inpars/inpars:cpu", api_client=api, watch_timeout=5, **kw)


def stage_job(stage: str = "generate", shards: int = 3) -> StageJob:
    return StageJob(stage=stage, shards=shards, command=["inpars", "worker", stage, "--run", "gs://b/runs/r1"])


def jobs_in(api: client.ApiClient) -> dict[str, dict]:
    items = client.BatchV1Api(api).list_namespaced_job(NS).items
    return {j.metadata.name: api.sanitize_for_serialization(j) for j in items}


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def set_status(api: client.ApiClient, name: str, status: dict) -> None:
    client.BatchV1Api(api).patch_namespaced_job_status(name, NS, {"status": status})


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def test_index_lists_round_trip():
    assert parse_indexes("1,3-5") == [1, 3, 4, 5]
    assert parse_indexes("") == [] and parse_indexes(None) == []
    assert format_indexes([5, 1, 3, 4]) == "1,3-5"
    assert format_indexes(parse_indexes("0-2,7,9-10")) == "0-2,7,9-10"


def test_submit_and_watch_progress(api):
    ex = executor(api)
    name = ex.submit(stage_job(), "r1")
    created = jobs_in(api)[name]
    assert created["metadata"]["namespace"] == NS
    assert created["spec"]["completionMode"] == "Indexed" and created["spec"]["completions"] == 3

    def controller() -> None:
        time.sleep(0.3)
        set_status(api, name, {"active": 2, "completedIndexes": "0"})
        time.sleep(0.2)
        set_status(api, name, {"active": 1, "completedIndexes": "0-1"})
        time.sleep(0.2)
        set_status(api, name, {"active": 0, "completedIndexes": "0-2", "conditions": [{"type": "Complete", "status": "True"}]})

    seen = []
    t = in_thread(controller)
    progress = ex.watch(name, lambda p: seen.append(list(p.completed)))
    t.join(5)
    assert not t.errors
    assert progress.state == "complete" and progress.completed == [0, 1, 2]
    assert seen[0] == [] and seen[-1] == [0, 1, 2]
    assert [0] in seen and [0, 1] in seen  # intermediate progress was reported, in order
    assert seen.index([0]) < seen.index([0, 1])


def test_failure_reports_failed_shards_with_logs(api, server):
    ex = executor(api)
    name = ex.submit(stage_job(shards=3), "r1")
    core = client.CoreV1Api(api)
    for index in (0, 1):
        pod = f"{name}-{index}-abcde"
        core.create_namespaced_pod(
            NS,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod,
                    "namespace": NS,
                    "labels": {JOB_NAME_LABEL: name, COMPLETION_INDEX_LABEL: str(index)},
                },
                "spec": {"containers": [{"name": "worker", "image": "x"}]},
            },
        )
    server.handler[f"get /api/v1/namespaces/{NS}/pods/{name}-1-abcde/log"] << b"loading corpus\nInputError: corpus.jsonl:17: missing _id\n"

    def controller() -> None:
        time.sleep(0.3)
        set_status(api, name, {"completedIndexes": "0", "failedIndexes": "1"})
        time.sleep(0.2)
        set_status(
            api,
            name,
            {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "Job has failed indexes"}]},
        )

    t = in_thread(controller)
    with pytest.raises(JobFailedError) as info:
        ex.watch(name)
    t.join(5)
    err = info.value
    assert err.progress.failed == [1] and err.progress.completed == [0]
    assert "failed shards: 1 of 3" in str(err)
    assert "corpus.jsonl:17: missing _id" in str(err)  # the failed shard's log tail
    assert "loading corpus" in err.logs[1]
    assert 0 not in err.logs  # only failed shards' logs
    # pod_logs(): per pod, and per shard; logs(): one printable text
    logs = ex.pod_logs("r1", "generate", index=1)
    assert list(logs) == [f"{name}-1-abcde"] and logs[f"{name}-1-abcde"][0] == 1
    assert "missing _id" in logs[f"{name}-1-abcde"][1]
    text = ex.logs("r1", "generate", index=1)
    assert text.startswith(f"==> {name}-1-abcde (shard 1) <==") and "missing _id" in text
    assert "no pods found" in ex.logs("r1", "generate", index=2)


def test_cancel_deletes_only_the_runs_jobs(api):
    ex = executor(api)
    a1 = ex.submit(stage_job("generate"), "run-a")
    a2 = ex.submit(stage_job("negatives"), "run-a")
    b1 = ex.submit(stage_job("generate"), "run-b")
    assert set(jobs_in(api)) == {a1, a2, b1}
    assert sorted(ex.cancel("run-a")) == sorted([a1, a2])
    assert set(jobs_in(api)) == {b1}
    assert [p.name for p in ex.status("run-b")] == [b1]
    assert ex.status("run-a") == []


def test_restarted_launcher_adopts_the_running_job(api):
    first = executor(api)
    job = stage_job(shards=2)
    name = first.submit(job, "r1")
    set_status(api, name, {"active": 2})
    # The launcher dies; a new one (new client objects, same cluster) resumes watching.
    second = executor(api)
    assert second.submit(job, "r1") == name  # 409 -> adopted, not an error
    assert [p.name for p in second.status("r1")] == [name]

    def controller() -> None:
        time.sleep(0.3)
        set_status(api, name, {"active": 0, "completedIndexes": "0-1", "conditions": [{"type": "Complete", "status": "True"}]})

    t = in_thread(controller)
    progress = second.run_stage(job, "r1", missing=[0, 1])
    t.join(5)
    assert progress.name == name and progress.completed == [0, 1]
    assert list(jobs_in(api)) == [name]  # nothing new was submitted


class FakeRun:
    """The workspace's view (what inpars.workspace.Run answers): committed shards per stage."""

    def __init__(self, run_id: str, done: dict[str, set[int]]):
        self.run_id, self.done = run_id, done
        self.lock = threading.Lock()

    def missing_shards(self, stage: str, n: int) -> list[int]:
        with self.lock:
            return [i for i in range(n) if i not in self.done.get(stage, set())]

    def commit(self, stage: str, shards: list[int]) -> None:
        with self.lock:
            self.done.setdefault(stage, set()).update(shards)


def auto_controller(api: client.ApiClient, run: FakeRun | None, stop: threading.Event, lose: set[str] = frozenset()) -> None:
    """Completes every Job it sees; its pods 'commit' their shards to the workspace."""
    handled: set[str] = set()
    while not stop.is_set():
        for name, obj in jobs_in(api).items():
            if name in handled or (obj.get("status") or {}).get("conditions"):
                continue
            handled.add(name)
            stage = obj["metadata"]["labels"]["inpars.io/stage"]
            shards = parse_indexes(obj["metadata"]["annotations"]["inpars.io/shard-indexes"])
            if run is not None and stage not in lose:
                run.commit(stage, shards)
            n = obj["spec"]["completions"]
            set_status(api, name, {"completedIndexes": format_indexes(range(n)), "conditions": [{"type": "Complete", "status": "True"}]})
        time.sleep(0.05)


def test_run_pipeline_skips_done_stages_and_resumes_missing_shards(api):
    config = PipelineConfig().override({"generate.shards": 4, "negatives.shards": 4})
    jobs = plan_pipeline(config, "gs://b/runs/r1")
    run = FakeRun("r1", {"prepare": {0}, "generate": {0, 1, 2, 3}, "filter": {0}, "negatives": {0, 2}})
    stop = threading.Event()
    t = in_thread(lambda: auto_controller(api, run, stop))
    messages: list[str] = []
    try:
        done = executor(api).run_pipeline(jobs, run, log=messages.append)
    finally:
        stop.set()
        t.join(5)
    submitted = jobs_in(api)
    stages = {o["metadata"]["labels"]["inpars.io/stage"]: o for o in submitted.values()}
    assert set(stages) == {"negatives", "train", "rerank", "evaluate"}  # prepare, generate, filter: done already
    neg = stages["negatives"]
    assert neg["spec"]["completions"] == 2
    env = {e["name"]: e.get("value") for e in neg["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[SHARD_INDEXES_ENV] == "1,3" and env["INPARS_SHARD_COUNT"] == "4"
    assert SHARD_INDEXES_ENV not in {e["name"] for e in stages["train"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert [p.stage for p in done] == ["negatives", "train", "rerank", "evaluate"]
    assert done[0].completed == [1, 3]  # reported as real shard numbers
    assert run.missing_shards("negatives", 4) == []
    assert any("resuming 2 of 4 shards (1,3)" in m for m in messages)
    assert any("generate: all 4 shards done, skipped" in m for m in messages)


def test_run_pipeline_trusts_the_workspace_over_the_job(api):
    jobs = [stage_job("generate", shards=2), stage_job("filter", shards=1)]
    run = FakeRun("r2", {})
    stop = threading.Event()
    t = in_thread(lambda: auto_controller(api, run, stop, lose={"generate"}))
    try:
        with pytest.raises(JobFailedError, match="not in the workspace"):
            executor(api).run_pipeline(jobs, run)
    finally:
        stop.set()
        t.join(5)
    assert [o["metadata"]["labels"]["inpars.io/stage"] for o in jobs_in(api).values()] == ["generate"]  # stopped there
    # The next launch submits a fresh attempt (the finished Job keeps its name until its TTL).
    run.commit("generate", [0])
    stop2 = threading.Event()
    t2 = in_thread(lambda: auto_controller(api, run, stop2))
    try:
        executor(api).run_pipeline(jobs, run)
    finally:
        stop2.set()
        t2.join(5)
    names = sorted(jobs_in(api))
    assert any(n.endswith("-generate-r1") for n in names), names
    retry = next(o for n, o in jobs_in(api).items() if n.endswith("-generate-r1"))
    assert retry["spec"]["completions"] == 1
    assert retry["metadata"]["annotations"]["inpars.io/shard-indexes"] == "1"


def test_kueue_queued_job_is_followed_through_admission(api, server):
    install_kueue(server, api)
    ex = executor(api, queue="inpars")
    name = ex.submit(stage_job(shards=1), "rq")
    obj = jobs_in(api)[name]
    assert obj["spec"]["suspend"] is True and obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "inpars"

    def kueue_then_controller() -> None:
        time.sleep(0.3)
        client.BatchV1Api(api).patch_namespaced_job(name, NS, {"spec": {"suspend": False}})  # admitted
        time.sleep(0.2)
        set_status(api, name, {"completedIndexes": "0", "conditions": [{"type": "Complete", "status": "True"}]})

    states: list[str] = []
    t = in_thread(kueue_then_controller)
    ex.watch(name, lambda p: states.append(p.state))
    t.join(5)
    assert states[0] == "queued" and states[-1] == "complete" and "running" in states


def test_a_job_deleted_while_watched_stops_the_pipeline(api):
    ex = executor(api)
    name = ex.submit(stage_job(shards=2), "rd")
    t = in_thread(lambda: (time.sleep(0.3), ex.cancel("rd")))
    with pytest.raises(JobFailedError, match="deleted"):
        ex.watch(name)
    t.join(5)
    assert not t.errors and jobs_in(api) == {}


# ---------------------------------------------------------------- Kueue, stuck work, vanished Jobs


def install_kueue(server: KMockServer, api: client.ApiClient, edit: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """k8s/kueue/kueue.yaml (optionally edited first) applied to kmock, as `kubectl apply -k k8s/kueue/` would."""
    for plural in ("resourceflavors", "clusterqueues", "localqueues", "workloads"):
        server.handler.resources[f"{KUEUE_GROUP}/{KUEUE_VERSION}/{plural}"] = {}
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s/kueue/kueue.yaml").read_text()) if d]
    if edit:
        edit(docs)
    custom = client.CustomObjectsApi(api)
    plurals = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "LocalQueue": "localqueues"}
    for d in docs:
        if d["kind"] == "LocalQueue":
            custom.create_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, NS, "localqueues", d)
        else:
            custom.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, plurals[d["kind"]], d)
    return docs


def cluster_queue(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "ClusterQueue")


def gpu_job(shards: int = 16, gpu_type: str = "nvidia-l4", parallelism: int | None = None, **res) -> StageJob:
    resources = ResourcesConfig(cpu="4", memory="16Gi", gpu=1, gpu_type=gpu_type, parallelism=parallelism, **res)
    return StageJob("generate", shards, ["inpars", "worker", "generate"], resources=resources, parallelism=parallelism or shards)


def test_a_queue_that_can_never_admit_is_refused_before_submission(api, server):
    def no_tpu_no_h100(docs: list[dict]) -> None:
        groups = cluster_queue(docs)["spec"]["resourceGroups"]
        groups[:] = [g for g in groups if g["coveredResources"] != ["google.com/tpu"]]
        for g in groups:
            g["flavors"] = [f for f in g["flavors"] if f["name"] != "nvidia-h100-80gb"]

    install_kueue(server, api, no_tpu_no_h100)
    ex = executor(api, queue="inpars")
    tpu = StageJob("train", 1, ["x"], resources=ResourcesConfig(cpu="8", memory="32Gi", tpu_type="tpu-v6e-slice", tpu_topology="2x4"))
    with pytest.raises(QueueRefusedError, match="no flavour for google.com/tpu"):
        ex.submit(tpu, "rq")
    with pytest.raises(
        QueueRefusedError, match=r"node label cloud.google.com/gke-accelerator=nvidia-l4 \(the pod selects nvidia-h100-80gb\)"
    ):
        ex.submit(gpu_job(2, "nvidia-h100-80gb"), "rq")
    with pytest.raises(QueueRefusedError, match="cannot admit even one pod for cpu"):
        ex.submit(StageJob("filter", 1, ["x"], resources=ResourcesConfig(cpu="200", memory="8Gi")), "rq")
    # 16 shards x 1 GPU, parallelism set explicitly, against an 8-GPU flavour: refused, with the fix.
    with pytest.raises(
        QueueRefusedError, match=r"16 pods at once exceed .* \(8\) for nvidia.com/gpu; set resources.generate.parallelism <= 8"
    ):
        ex.submit(gpu_job(16, parallelism=16), "rq")
    with pytest.raises(QueueRefusedError, match="LocalQueue 'nope' not found"):
        executor(api, queue="nope").submit(gpu_job(2), "rq")
    assert jobs_in(api) == {}  # nothing was submitted


def test_default_parallelism_is_lowered_to_what_the_quota_admits(api, server):
    install_kueue(server, api)
    messages: list[str] = []
    ex = executor(api, queue="inpars", log=messages.append)
    name = ex.submit(gpu_job(16), "rp")
    job = jobs_in(api)[name]
    assert job["spec"]["completions"] == 16 and job["spec"]["parallelism"] == 8  # the shipped nvidia-l4 quota
    assert any("parallelism 16 -> 8" in m and "nvidia.com/gpu" in m for m in messages)
    # A run-wide cap below the quota is kept as it is.
    capped = executor(api, queue="inpars", max_parallel_pods=3).submit(gpu_job(16), "rp2")
    assert jobs_in(api)[capped]["spec"]["parallelism"] == 3


def test_borrowing_from_the_cohort_counts(api, server):
    def cohort(docs: list[dict]) -> None:
        cq = cluster_queue(docs)
        cq["spec"]["cohort"] = "team"
        gpu = next(g for g in cq["spec"]["resourceGroups"] if g["coveredResources"] == ["nvidia.com/gpu"])
        gpu["flavors"][0]["resources"][0]["borrowingLimit"] = 8  # nvidia-l4: 8 + 8
        lender = {"apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "ClusterQueue", "metadata": {"name": "other"}}
        lender["spec"] = {"cohort": "team", "resourceGroups": []}
        docs.append(lender)

    install_kueue(server, api, cohort)
    name = executor(api, queue="inpars").submit(gpu_job(16, parallelism=16), "rb")
    assert jobs_in(api)[name]["spec"]["parallelism"] == 16


def create_pod(api: client.ApiClient, job: str, index: int, status: dict) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-{index}-x{index}",
            "namespace": NS,
            "labels": {JOB_NAME_LABEL: job, COMPLETION_INDEX_LABEL: str(index)},
        },
        "spec": {"containers": [{"name": "worker", "image": "x"}]},
        "status": status,
    }
    client.CoreV1Api(api).create_namespaced_pod(NS, pod)


def waiting(reason: str, message: str) -> dict:
    state = {"waiting": {"reason": reason, "message": message}}
    status = {"name": "worker", "image": "ghcr.io/inpars/inpars:cpu", "imageID": "", "ready": False, "restartCount": 0, "state": state}
    return {"phase": "Pending", "containerStatuses": [status]}


STUCK = {
    "ImagePullBackOff": waiting("ImagePullBackOff", 'Back-off pulling image "ghcr.io/inpars/inpars:cpu"'),
    "ErrImagePull": waiting("ErrImagePull", "manifest unknown"),
    "Unschedulable": {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    },
}


@pytest.mark.parametrize("reason", sorted(STUCK))
def test_pods_stuck_pending_are_reported_and_the_stage_fails(api, reason):
    ex = executor(api, check_interval=0.2)
    job = StageJob("generate", 2, ["x"], resources=ResourcesConfig(pending_deadline_seconds=1))
    name = ex.submit(job, "rs")
    set_status(api, name, {"active": 2})
    for index in (0, 1):
        create_pod(api, name, index, STUCK[reason])
    seen: list[list[str]] = []
    started = time.monotonic()
    with pytest.raises(JobStuckError) as info:
        ex.watch(name, lambda p: seen.append(list(p.waiting)))
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert f"2 pod(s) {reason}" in text and "pending deadline 1 s" in text and "pending_deadline_seconds" in text
    if reason == "Unschedulable":
        assert "0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in text  # the scheduler's own words
    assert any(w and reason in w[0] for w in seen)  # shown while waiting, before the failure
    assert jobs_in(api) == {}  # the stuck Job is deleted, not left to start unwatched


def test_a_job_kueue_never_admits_is_reported_with_the_workload_reason(api, server):
    install_kueue(server, api)
    ex = executor(api, queue="inpars", check_interval=0.2)
    name = ex.submit(gpu_job(2, parallelism=2, pending_deadline_seconds=1), "rk")
    workload = {
        "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}",
        "kind": "Workload",
        "metadata": {
            "name": f"job-{name}-1a2b3",
            "namespace": NS,
            "ownerReferences": [{"kind": "Job", "name": name, "apiVersion": "batch/v1", "uid": "u"}],
        },
        "status": {
            "conditions": [
                {
                    "type": "QuotaReserved",
                    "status": "False",
                    "reason": "Pending",
                    "message": "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor nvidia-l4, 2 more needed",
                }
            ]
        },
    }
    client.CustomObjectsApi(api).create_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, NS, "workloads", workload)
    with pytest.raises(JobStuckError, match="insufficient unused quota for nvidia.com/gpu") as info:
        ex.watch(name)
    assert info.value.progress.state == "failed" and "Kueue QuotaReserved=False" in str(info.value)
    assert jobs_in(api) == {}
    # Without a Workload to ask (e.g. RBAC), the suspended Job is still reported.
    name2 = ex.submit(gpu_job(2, parallelism=2, pending_deadline_seconds=1), "rk2")
    with pytest.raises(JobStuckError, match="waiting for Kueue to admit it"):
        ex.watch(name2)


def test_a_watch_that_expires_with_410_reconnects(api, server):
    ex = executor(api)
    name = ex.submit(stage_job(shards=2), "r410")
    server.handler[kmock.action.WATCH][:1] << 410  # the first watch request: 410 Gone

    def controller() -> None:
        time.sleep(0.5)
        set_status(api, name, {"completedIndexes": "0-1", "conditions": [{"type": "Complete", "status": "True"}]})

    t = in_thread(controller)
    progress = ex.watch(name)
    t.join(5)
    assert progress.state == "complete" and progress.completed == [0, 1]
    assert len(server.handler[kmock.action.WATCH]) >= 2  # it watched again after the 410


def break_watches(server: KMockServer) -> None:
    """Every watch request fails (a proxy dropping streams, a laptop asleep): only GETs tell the launcher anything."""
    server.handler[kmock.action.WATCH] << 503


def test_a_job_gone_by_ttl_whose_shards_are_committed_is_done(api, server):
    break_watches(server)
    run = FakeRun("rt", {})
    messages: list[str] = []

    def controller() -> None:  # the Job finishes and its TTL removes it while nobody watches
        [name] = wait_for(lambda: list(jobs_in(api)))
        time.sleep(0.3)
        run.commit("generate", [0, 1])
        client.BatchV1Api(api).delete_namespaced_job(name, NS)

    t = in_thread(controller)
    done = executor(api, ttl_seconds=0, log=messages.append).run_pipeline([stage_job("generate", 2)], run, log=messages.append)
    t.join(5)
    assert not t.errors
    assert [p.reason for p in done] == ["Committed"] and done[0].completed == [0, 1]
    assert any("the workspace holds its shards; going on" in m for m in messages)
    assert len(server.handler["post"]) == 1  # nothing was submitted again


def test_a_job_gone_by_ttl_without_its_shards_is_submitted_again(api, server):
    break_watches(server)
    run = FakeRun("rt2", {"generate": {1}})
    messages: list[str] = []
    stop = threading.Event()

    def controller() -> None:  # the first Job vanishes uncommitted; the next one is completed normally
        [name] = wait_for(lambda: list(jobs_in(api)))
        time.sleep(0.3)
        client.BatchV1Api(api).delete_namespaced_job(name, NS)
        wait_for(lambda: any(n.endswith("-r1") for n in jobs_in(api)))
        auto_controller(api, run, stop)

    t = in_thread(controller)
    try:
        done = executor(api, ttl_seconds=0, log=messages.append).run_pipeline([stage_job("generate", 3)], run, log=messages.append)
    finally:
        stop.set()
        t.join(5)
    assert not t.errors
    [retry] = [o for n, o in jobs_in(api).items() if n.endswith("-generate-r1")]
    assert retry["metadata"]["annotations"]["inpars.io/shard-indexes"] == "0,2"  # only what the workspace lacks
    assert any("shards 0,2 are not committed; submitting again" in m for m in messages)
    assert done[0].state == "complete" and run.missing_shards("generate", 3) == []


def test_a_job_gone_soon_after_it_was_seen_running_was_deleted_not_expired(api, server):
    break_watches(server)
    ex = executor(api)  # TTL one day: a Job seen running a moment ago cannot have expired
    job = stage_job("generate", 2)

    def controller() -> None:
        [name] = wait_for(lambda: list(jobs_in(api)))
        time.sleep(0.3)
        client.BatchV1Api(api).delete_namespaced_job(name, NS)

    t = in_thread(controller)
    with pytest.raises(JobDeletedError, match="deleted before it finished"):
        ex.run_stage(job, "rg", [0, 1], workspace=FakeRun("rg", {}))
    t.join(5)
    assert len(server.handler["post"]) == 1


def test_a_multi_host_tpu_stage_runs_as_a_jobset(api, server):
    server.handler.resources["jobset.x-k8s.io/v1alpha2/jobsets"] = {}
    ex = executor(api)
    job = StageJob("train", 1, ["inpars", "worker", "train"], resources=ResourcesConfig(tpu_type="tpu-v5p-slice", tpu_topology="2x2x2"))
    custom = client.CustomObjectsApi(api)

    def jobset_controller() -> None:
        items = wait_for(lambda: custom.list_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", NS, "jobsets")["items"])
        name = items[0]["metadata"]["name"]
        time.sleep(0.3)
        custom.patch_namespaced_custom_object_status(
            "jobset.x-k8s.io", "v1alpha2", NS, "jobsets", name, {"status": {"conditions": [{"type": "Completed", "status": "True"}]}}
        )

    t = in_thread(jobset_controller)
    progress = ex.run_stage(job, "rj", [0])
    t.join(5)
    assert not t.errors
    assert progress.kind == "JobSet" and progress.state == "complete" and progress.completed == [0]
    [found] = ex.find_jobs("rj")
    assert found["kind"] == "JobSet" and jobs_in(api) == {}  # a JobSet, not a batch/v1 Job
    assert ex.cancel("rj") == [found["metadata"]["name"]]
    assert ex.find_jobs("rj") == []


# --------------------------------------------------------------------------------------------
# The driver in the cluster (--detach): restarts, one driver per run, its Job, cancel and logs


def write_kubeconfig(tmp_path: Path, server: KMockServer) -> Path:
    """A kubeconfig for kmock: what `inpars-launch` (in this process or a child) loads like a real cluster's."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": server.url}}],
                "users": [{"name": "tester", "user": {}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": NS}}],
                "current-context": "kmock",
            }
        )
    )
    return path


def use_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: KMockServer) -> None:
    """In this process: the kubernetes client read $KUBECONFIG when it was imported, so point it at kmock directly."""
    import kubernetes.config
    import kubernetes.config.kube_config

    path = str(write_kubeconfig(tmp_path, server))
    monkeypatch.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", path)
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", path)


class Launcher:
    """``inpars-launch`` as a child process (a driver that can be killed), its output collected."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inpars.launch.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 90.0) -> None:
        print("WAIT", text, time.monotonic(), flush=True)
        wait_for(lambda: text in self.output or self.proc.poll() is not None, timeout)
        assert text in self.output, f"{text!r} not in the output:\n{self.output}"

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup, its lease is left to expire
        self.proc.wait(10)

    def wait(self, timeout: float = 90.0) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(5)
        return code


def job_posts(server: KMockServer) -> list:
    return [r for r in server.handler["post"] if r.url.path.endswith("/jobs")]


def test_a_driver_restarted_mid_stage_adopts_the_live_job_and_finishes(api, server, gcs_uri, tmp_path, monkeypatch):
    from inpars.launch.driver import DriverBusy, drive_exclusively, driver_holder
    from inpars.workspace import Run

    monkeypatch.setenv("INPARS_LEASE_SECONDS", "1")  # a dead driver's lease expires within a second
    run = Run.create(gcs_uri, PipelineConfig().override({"generate.shards": 2}), "restart-1")
    run.commit_shard("prepare", 0, 1, b"{}", ext="json")  # prepared already: the restart happens in generate
    env = {**os.environ, "KUBECONFIG": str(write_kubeconfig(tmp_path, server)), "COLUMNS": "200"}
    args = ["resume", run.uri, "--backend", "k8s", "--until", "filter"]  # what the driver Job's pod runs

    first = Launcher(args, env)
    [generate] = wait_for(lambda: [n for n in jobs_in(api) if n.endswith("-generate")], timeout=90)
    set_status(api, generate, {"active": 2})
    first.wait_for("0/2 shards done, 2 running")
    first.kill()  # the pod is deleted / its node lost, mid-stage

    second = Launcher(args, env)  # the Job controller starts a new driver pod
    second.wait_for("0/2 shards done, 2 running")  # it watches the live Job it found
    assert [n for n in jobs_in(api) if "-generate" in n] == [generate]
    with pytest.raises(DriverBusy, match="another driver"):  # a third driver is refused while the second drives
        drive_exclusively(Run.open(run.uri), None, wait=0)  # type: ignore[arg-type]

    for i in (0, 1):  # the stage's pods commit their shards, the Job completes
        run.commit_shard("generate", i, 2, f'{{"query": "q{i}"}}\n'.encode())
    set_status(api, generate, {"active": 0, "completedIndexes": "0-1", "conditions": [{"type": "Complete", "status": "True"}]})
    [filter_job] = wait_for(lambda: [n for n in jobs_in(api) if n.endswith("-filter")], timeout=60)
    run.commit_shard("filter", 0, 1, b'{"query": "q0"}\n')
    set_status(api, filter_job, {"completedIndexes": "0", "conditions": [{"type": "Complete", "status": "True"}]})

    assert second.wait() == 0, second.output
    assert sorted(jobs_in(api)) == sorted([generate, filter_job])
    assert len(job_posts(server)) == 2  # generate once (by the first driver), filter once: nothing twice
    assert run.missing_shards("generate", 2) == [] and run.missing_shards("filter", 1) == []
    assert driver_holder(run) is None  # the finished driver let the run go


def test_a_second_driver_waits_for_a_dead_ones_lease_then_takes_over(gcs_uri, monkeypatch):
    from inpars.launch.driver import DriverBusy, driver_holder, driver_lease, exclusive_driver
    from inpars.workspace import Run

    monkeypatch.setenv("INPARS_LEASE_SECONDS", "1")
    run = Run.create(gcs_uri, PipelineConfig(), "lease-1")
    dead = driver_lease(run)
    assert dead.try_acquire()  # held, never renewed: its driver died
    assert driver_holder(run) is not None
    messages: list[str] = []
    with exclusive_driver(run, say=messages.append) as lease:
        assert lease.held and lease.taken_over is not None
        with pytest.raises(DriverBusy):
            with exclusive_driver(Run.open(run.uri), wait=0):
                pass
    assert any("waiting up to" in m for m in messages) and any("took over" in m for m in messages)
    assert driver_holder(run) is None


def posted_driver(server: KMockServer) -> dict:
    """The driver Job exactly as the launcher sent it (the request body, before the server adds anything)."""
    [body] = [r.data for r in job_posts(server) if r.data["metadata"]["labels"]["inpars.io/stage"] == "driver"][-1:]
    return body


def assert_valid_driver(manifest: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from inpars.launch.k8s_manifests import validate_manifest

    for version in ("1.30.0", "1.35.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(manifest, version, strict=True)
    validate_manifest(manifest)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "inpars-launcher" and pod["restartPolicy"] == "Never"
    assert "queue-name" not in str(manifest["metadata"]["labels"])  # never queued behind its own stage Jobs
    for env in pod["containers"][0].get("env", []):
        assert set(env) == {"name", "value"} and not env["name"].endswith(("KEY", "TOKEN"))  # no secret at all


def test_run_detach_creates_the_run_and_submits_a_validated_driver(api, server, gcs_uri, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from inpars.launch.cli import app
    from inpars.workspace import Run

    secret = "sk-test-never-in-a-manifest-4242"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    use_kubeconfig(monkeypatch, tmp_path, server)
    args = ["run", "--backend", "k8s", "--detach", "--workspace", gcs_uri, "--run-id", "detached-1", "--image", "reg.io/inpars:cpu"]
    result = CliRunner().invoke(app, [*args, "--set", "generate.backend=openai", "--queue", "inpars"])
    assert result.exit_code == 0, result.output
    run = Run.open(f"{gcs_uri}/runs/detached-1")  # created here: its config is pinned before the driver starts
    assert run.config.generate.backend == "openai"
    assert "driver Job inpars-detached-1-driver submitted" in result.output
    assert f"inpars-launch logs {run.uri} driver --backend k8s" in result.output and "kubectl -n inpars logs -f job/" in result.output

    manifest = posted_driver(server)
    assert_valid_driver(manifest)
    assert secret not in yaml.safe_dump(manifest)
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    assert container["command"][:5] == ["inpars-launch", "resume", run.uri, "--backend", "k8s"]
    assert container["command"][container["command"].index("--queue") + 1] == "inpars"  # its stage Jobs are queued
    assert "--detach" not in container["command"]
    assert container["image"] == "reg.io/inpars:cpu"
    assert {r["action"] for r in manifest["spec"]["podFailurePolicy"]["rules"]} == {"Ignore", "FailJob"}

    # A second --detach of the same run while the driver is live: refused, nothing new submitted.
    again = CliRunner().invoke(app, ["resume", run.uri, "--backend", "k8s", "--detach"])
    assert again.exit_code == 75, again.output
    assert "a driver is already running for this run: Job inpars-detached-1-driver" in again.output
    assert list(jobs_in(api)) == ["inpars-detached-1-driver"]
    # Once that driver has finished, `resume --detach` replaces it.
    set_status(api, "inpars-detached-1-driver", {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    third = CliRunner().invoke(app, ["resume", run.uri, "--backend", "k8s", "--detach"])
    assert third.exit_code == 0, third.output
    assert "replacing the finished driver Job" in third.output
    assert not jobs_in(api)["inpars-detached-1-driver"].get("status", {}).get("conditions")  # a fresh one


def test_detach_is_refused_while_another_driver_holds_the_run(api, server, gcs_uri, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from inpars.launch.cli import app
    from inpars.launch.driver import exclusive_driver
    from inpars.workspace import Run

    use_kubeconfig(monkeypatch, tmp_path, server)
    run = Run.create(gcs_uri, PipelineConfig(), "held-1")
    with exclusive_driver(run):  # e.g. a laptop's attached `resume`
        result = CliRunner().invoke(app, ["resume", run.uri, "--backend", "k8s", "--detach"])
    assert result.exit_code == 75 and "already has a driver" in result.output
    assert job_posts(server) == []


def test_cancel_deletes_the_driver_first_then_the_stage_jobs(api, server):
    from inpars.launch.detach import beir_driver_manifest, beir_set_id, run_driver_manifest

    ex = executor(api)
    stage = ex.submit(stage_job("generate"), "rc")
    driver = ex.submit_driver(run_driver_manifest("gs://b/runs/rc", "rc", namespace=NS, image="i:cpu"))
    other = ex.submit(stage_job("generate"), "someone-else")
    assert sorted(ex.cancel("rc")) == sorted([driver, stage])
    deletes = [r.url.path.rsplit("/", 1)[-1] for r in server.handler["delete"]]
    assert deletes == [driver, stage]  # the driver cannot submit a stage after our listing
    assert list(jobs_in(api)) == [other]

    # A BEIR driver: cancelling its set cancels the runs it drives, and only those.
    a, b = ex.submit(stage_job("generate"), "ds-a"), ex.submit(stage_job("rerank"), "ds-b")
    beir = ex.submit_driver(beir_driver_manifest("gs://b/ws", ["ds-a", "ds-b"], namespace=NS, image="i:cpu"))
    assert sorted(ex.cancel(beir_set_id("gs://b/ws", ["ds-b", "ds-a"]))) == sorted([beir, a, b])
    assert list(jobs_in(api)) == [other]


def test_logs_of_the_driver_from_any_machine(api, server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from inpars.launch.cli import app
    from inpars.launch.detach import run_driver_manifest

    use_kubeconfig(monkeypatch, tmp_path, server)
    job = executor(api).submit_driver(run_driver_manifest("gs://b/ws/runs/rl", "rl", namespace=NS, image="i:cpu"))
    pod = f"{job}-x7k2p"
    client.CoreV1Api(api).create_namespaced_pod(
        NS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": NS, "labels": {JOB_NAME_LABEL: job}},
            "spec": {"containers": [{"name": "driver", "image": "i:cpu"}]},
        },
    )
    server.handler[f"get /api/v1/namespaces/{NS}/pods/{pod}/log"] << b"generate: 3/8 shards done, 5 running [running]\n"
    # No workspace access: the run need not be readable from here (this URI is not even real).
    result = CliRunner().invoke(app, ["logs", "gs://b/ws/runs/rl", "driver", "--backend", "k8s"])
    assert result.exit_code == 0, result.output
    assert f"==> {pod} <==" in result.output and "3/8 shards done" in result.output
    [request] = [r for r in server.handler["get"] if r.url.path.endswith(f"{pod}/log")]
    assert request.url.query.get("container") == "driver"


def test_beir_detach_pins_every_run_and_submits_one_driver(api, server, gcs_uri, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from inpars.launch.cli import app
    from inpars.storage import open_storage
    from inpars.workspace import Run

    use_kubeconfig(monkeypatch, tmp_path, server)
    sample = ROOT / "inpars" / "data" / "scifact-sample" / "corpus.jsonl"
    mirror = open_storage(f"{gcs_uri}/beir")
    for name in ("scifact", "nfcorpus"):  # a mirror without bioasq
        mirror.write_bytes(f"{name}/corpus.jsonl", sample.read_bytes())
    workspace = f"{gcs_uri}/ws"
    args = ["beir", "--backend", "k8s", "--workspace", workspace, "--corpus-root", f"{gcs_uri}/beir", "--image", "reg.io/inpars:cpu"]
    result = CliRunner().invoke(app, [*args, "--detach", "--datasets", "scifact,nfcorpus,bioasq", "--max-concurrent", "4"])
    assert result.exit_code == 42, result.output  # submitted, but a dataset is missing: the command says so
    assert "bioasq/corpus.jsonl: no such object or folder" in result.output and "1 dataset(s) missing" in result.output

    manifest = posted_driver(server)
    assert_valid_driver(manifest)
    command = manifest["spec"]["template"]["spec"]["containers"][0]["command"]
    ids = command[command.index("--runs") + 1].split(",")
    assert [i.rsplit("-", 1)[0] for i in ids] == ["scifact", "nfcorpus"]
    assert command[:2] == ["inpars-launch", "beir"] and command[command.index("--max-concurrent") + 1] == "4"
    assert manifest["metadata"]["annotations"]["inpars.io/run-ids"] == ",".join(ids)
    for run_id in ids:  # created here, configs pinned before the driver starts
        assert f"{run_id}\t{workspace}/runs/{run_id}" in result.output
        assert Run.open(f"{workspace}/runs/{run_id}").config.data.corpus.startswith(f"{gcs_uri}/beir/")
    assert f"driver Job {manifest['metadata']['name']} submitted for 2 run(s)" in result.output

    # The same request again while its driver is live: refused, nothing submitted.
    posts = len(job_posts(server))
    again = CliRunner().invoke(app, [*args, "--detach", "--datasets", "scifact,nfcorpus"])
    assert again.exit_code == 75 and "a driver is already running" in again.output
    assert len(job_posts(server)) == posts + 1 and len(jobs_in(api)) == 1  # one 409, still one driver


def test_beir_all_datasets_dry_run_on_k8s_validates_every_manifest(gcs_uri):
    from typer.testing import CliRunner

    from inpars.launch.cli import app
    from inpars.storage import open_storage

    workspace = f"{gcs_uri}/ws"
    config = ["--set", "generate.shards=64", "--set", "negatives.shards=64", "--set", "rerank.shards=64"]
    result = CliRunner().invoke(app, ["beir", "--backend", "k8s", "--workspace", workspace, "--dry-run", "--detach", *config])
    assert result.exit_code == 42, result.output  # four datasets are not in ir_datasets: reported, not fatal
    table = result.stderr
    for name in ("bioasq", "signal1m", "trec-news", "robust04"):
        assert any(line.startswith(name) and "missing: " in line for line in table.splitlines())
    assert "25/29 can run, 4 missing" in table
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    driver, stages = docs[0], docs[1:]
    assert (
        driver["metadata"]["labels"]["inpars.io/stage"] == "driver"
        and len(driver["metadata"]["annotations"]["inpars.io/run-ids"].split(",")) == 25
    )
    assert len(stages) == 25 * 7  # prepare, generate, filter, negatives, train, rerank, evaluate
    assert_valid_driver(driver)
    longest = max((d["metadata"]["name"] for d in stages), key=len)
    assert len(longest) + len("-63") <= 63  # the last pod's hostname of the longest name (64 shards)
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    run_label = next(d for d in stages if d["metadata"]["name"] == longest)["metadata"]["labels"]["inpars.io/run-id"]
    for doc in (d for d in stages if d["metadata"]["labels"]["inpars.io/run-id"] == run_label):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    assert open_storage(workspace).list("") == []  # a dry run creates nothing
