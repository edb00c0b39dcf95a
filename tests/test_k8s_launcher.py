"""The Kubernetes executor against kmock, a real in-memory HTTP API server.

kmock has no Job controller, so each test plays it: it patches Job status (completedIndexes,
failedIndexes, conditions) through the same API the launcher uses, and creates pods with the labels
the real controller sets. The official client talks HTTP to kmock, run in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest

kmock = pytest.importorskip("kmock")
from kubernetes import client  # noqa: E402

from inpars.config import PipelineConfig  # noqa: E402
from inpars.launch.k8s import JobFailedError, K8sExecutor  # noqa: E402
from inpars.launch.k8s_manifests import COMPLETION_INDEX_LABEL, JOB_NAME_LABEL, format_indexes, parse_indexes  # noqa: E402
from inpars.launch.plan import StageJob, plan_pipeline  # noqa: E402
from inpars.shards import SHARD_INDEXES_ENV  # noqa: E402

NS = "inpars"


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
    run = FakeRun("r1", {"generate": {0, 1, 2, 3}, "filter": {0}, "negatives": {0, 2}})
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
    assert set(stages) == {"negatives", "train", "rerank", "evaluate"}  # generate, filter: done already
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


def test_kueue_queued_job_is_followed_through_admission(api):
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
