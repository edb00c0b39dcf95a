"""The local executor with real subprocesses: retries, the permanent exit code, parallelism, skipping
committed shards, the failure message, env and secrets, status table and logs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from inpars.config import PipelineConfig
from inpars.errors import EXIT_PERMANENT
from inpars.launch.local import (
    StageFailed,
    read_logs,
    run_jobs,
    stage_rows,
    stage_table,
)
from inpars.launch.plan import StageJob
from inpars.workspace import Run


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# Writes one JSON line per attempt: shard, env it saw, start/end times.
RECORD = r"""
import json, os, sys, time
out = sys.argv[1]
i = int(os.environ["JOB_COMPLETION_INDEX"])
t0 = time.time()
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
rec = {"shard": i, "start": t0, "end": time.time(), "stage_env": os.environ.get("STAGE_SETTING"),
       "extra": os.environ.get("EXTRA"), "has_secret": bool(os.environ.get("INPARS_TEST_API_KEY")),
       "remap": os.environ.get("INPARS_SHARD_INDEXES")}
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
print("shard", i, "ok")
"""


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def job(stage: str, command: list[str], shards: int = 1, **kw) -> StageJob:
    return StageJob(stage=stage, shards=shards, command=command, **kw)


def test_runs_every_shard_with_env_and_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("INPARS_TEST_API_KEY", "sk-secret-abcdef")
    monkeypatch.setenv("INPARS_SHARD_INDEXES", "5,6,7")  # must not leak into local workers
    out = tmp_path / "rec.jsonl"
    events = []
    results = run_jobs(
        [
            job(
                "generate",
                py(RECORD) + [str(out)],
                shards=3,
                env={"STAGE_SETTING": "x"},
                secret_env={"INPARS_TEST_API_KEY": ("inpars-api-keys", "k")},
            )
        ],
        extra_env={"EXTRA": "y"},
        on_event=events.append,
        log_dir=tmp_path / "logs",
        progress=False,
    )
    recs = sorted(records(out), key=lambda r: r["shard"])
    assert [r["shard"] for r in recs] == [0, 1, 2]
    assert all(r["stage_env"] == "x" and r["extra"] == "y" and r["has_secret"] and r["remap"] is None for r in recs)
    assert [s.status for s in results[0].shards] == ["done"] * 3
    assert (tmp_path / "logs" / "generate" / "shard-2.attempt-0.log").read_text().strip() == "shard 2 ok"
    # the secret's value is written nowhere: not in logs, not in events
    for path in (tmp_path / "logs").rglob("*"):
        assert not path.is_file() or "sk-secret-abcdef" not in path.read_text()
    assert "sk-secret-abcdef" not in repr(events)
    assert [e.kind for e in events if e.kind.startswith("stage")] == ["stage_start", "stage_done"]


def test_missing_secret_warns(tmp_path, monkeypatch):
    monkeypatch.delenv("INPARS_TEST_API_KEY", raising=False)
    events = []
    run_jobs(
        [job("generate", py("pass"), secret_env={"INPARS_TEST_API_KEY": ("s", "k")})],
        on_event=events.append,
        log_dir=tmp_path,
        progress=False,
    )
    assert any(e.kind == "warning" and "INPARS_TEST_API_KEY" in e.message for e in events)


def test_transient_failure_is_retried(tmp_path):
    # fails the first time (per shard), then succeeds
    flaky = py(
        "import os, sys; m = sys.argv[1] + os.environ['JOB_COMPLETION_INDEX']\n"
        "if not os.path.exists(m):\n    open(m, 'w').close(); print('connection reset', file=sys.stderr); sys.exit(1)\n"
        "print('fine')"
    ) + [str(tmp_path / "seen-")]
    events = []
    results = run_jobs(
        [job("generate", flaky, shards=2, max_retries=2)],
        on_event=events.append,
        log_dir=tmp_path / "logs",
        retry_delay=0.01,
        progress=False,
    )
    assert [(s.status, s.attempts) for s in results[0].shards] == [("done", 2), ("done", 2)]
    assert sorted(e.shard for e in events if e.kind == "shard_retry") == [0, 1]
    assert "connection reset" in (tmp_path / "logs" / "generate" / "shard-0.attempt-0.log").read_text()
    assert (tmp_path / "logs" / "generate" / "shard-0.attempt-1.log").read_text().strip() == "fine"


def test_retries_are_bounded(tmp_path):
    count = tmp_path / "count"
    always = py(f"import sys; open({str(count)!r}, 'a').write('x'); sys.exit(3)")
    with pytest.raises(StageFailed) as err:
        run_jobs([job("negatives", always, max_retries=2)], log_dir=tmp_path, retry_delay=0.01, progress=False)
    assert count.read_text() == "xxx"  # 1 try + 2 retries
    assert err.value.result.failed[0].attempts == 3 and "after 3 attempt(s)" in str(err.value)


def test_permanent_failure_not_retried_and_stops_pipeline(tmp_path):
    count = tmp_path / "count"
    bad = py(
        f"import os, sys; open({str(count)!r}, 'a').write('x')\n"
        "if os.environ['JOB_COMPLETION_INDEX'] == '1':\n"
        "    print('Traceback (most recent call last):', file=sys.stderr)\n"
        "    print('inpars.errors.InputError: corpus.jsonl:3: malformed JSON', file=sys.stderr)\n"
        f"    sys.exit({EXIT_PERMANENT})\n"
    )
    after = tmp_path / "after"
    with pytest.raises(StageFailed) as err:
        run_jobs(
            [job("generate", bad, shards=3, max_retries=5), job("filter", py(f"open({str(after)!r}, 'w')"))],
            log_dir=tmp_path / "logs",
            retry_delay=0.01,
            progress=False,
        )
    msg = str(err.value)
    assert "stage generate failed" in msg and "generate shard 1 exited with 42 (permanent error, not retried)" in msg
    assert "corpus.jsonl:3: malformed JSON" in msg and "shard-1.attempt-0.log" in msg
    assert count.read_text() == "xxx"  # shards 0 and 2 ran, shard 1 once: no retry
    assert [s.status for s in err.value.result.shards] == ["done", "failed", "done"]
    assert not after.exists()  # the next stage never started


def test_parallelism(tmp_path):
    def max_overlap(recs):
        points = sorted([(r["start"], 1) for r in recs] + [(r["end"], -1) for r in recs], key=lambda p: (p[0], p[1]))
        best = cur = 0
        for _, d in points:
            cur += d
            best = max(best, cur)
        return best

    out = tmp_path / "p2.jsonl"
    t0 = time.monotonic()
    run_jobs([job("rerank", py(RECORD) + [str(out), "0.6"], shards=4, parallelism=4)], max_parallel=2, log_dir=tmp_path, progress=False)
    elapsed = time.monotonic() - t0
    assert max_overlap(records(out)) == 2
    assert elapsed < 4 * 0.6 + 2.5  # not serial... (two waves of two, plus interpreter start-up)
    out1 = tmp_path / "p1.jsonl"
    run_jobs([job("rerank", py(RECORD) + [str(out1), "0.3"], shards=3)], max_parallel=1, log_dir=tmp_path, progress=False)
    assert max_overlap(records(out1)) == 1
    # the job's own parallelism caps the local one too
    out3 = tmp_path / "p3.jsonl"
    run_jobs([job("rerank", py(RECORD) + [str(out3), "0.6"], shards=3, parallelism=1)], max_parallel=3, log_dir=tmp_path, progress=False)
    assert max_overlap(records(out3)) == 1


def test_skip_done_callable(tmp_path):
    out = tmp_path / "rec.jsonl"
    events = []
    results = run_jobs(
        [job("generate", py(RECORD) + [str(out)], shards=4)],
        skip_done=lambda stage, i: i in (0, 2),
        on_event=events.append,
        log_dir=tmp_path,
        progress=False,
    )
    assert sorted(r["shard"] for r in records(out)) == [1, 3]
    assert [s.status for s in results[0].shards] == ["skipped", "done", "skipped", "done"]
    assert sorted(e.shard for e in events if e.kind == "shard_skipped") == [0, 2]


WORKER = r"""
import os, sys
from inpars.workspace import Run
run = Run.open(sys.argv[1])
i = int(os.environ["JOB_COMPLETION_INDEX"])
run.commit_shard("generate", i, 3, ("{\"i\": %d}\n" % i).encode() * (i + 1))
"""


def test_resume_with_workspace_skips_committed_shards(tmp_path):
    run = Run.create(tmp_path / "ws", PipelineConfig(), run_id="exec-test")
    run.commit_shard("generate", 1, 3, b'{"i": 1}\n{"i": 1}\n')
    events = []
    jobs = [job("generate", py(WORKER) + [run.uri], shards=3)]
    run_jobs(jobs, run=run, on_event=events.append, progress=False)
    assert [e.shard for e in events if e.kind == "shard_start"] == [0, 2]
    assert (Path(run.uri) / "logs" / "generate" / "shard-0.attempt-0.log").exists()  # default: <run>/logs
    assert run.missing_shards("generate", 3) == []
    rows = stage_rows(run, jobs)
    assert rows == [{"stage": "generate", "shards": 3, "done": 3, "missing": [], "partial": [], "rows": 6}]
    # a second run does nothing at all
    events.clear()
    run_jobs(jobs, run=run, on_event=events.append, progress=True)  # the rich display must not break anything
    assert not [e for e in events if e.kind == "shard_start"]
    assert "shard-2.attempt-0.log" in read_logs(run, "generate", 2) and "shard-0" not in read_logs(run, "generate", 2)


def test_stage_table_from_workspace(tmp_path):
    from rich.console import Console

    run = Run.create(tmp_path / "ws", PipelineConfig(), run_id="status-test")
    run.commit_shard("generate", 0, 2, b'{"a": 1}\n')
    run.checkpoint("generate", 1, 2).save(0, [{"a": 2}], start=0, items=1)
    jobs = [job("generate", ["true"], shards=2), job("filter", ["true"])]
    rows = stage_rows(run, jobs)
    assert rows[0] == {"stage": "generate", "shards": 2, "done": 1, "missing": [1], "partial": [1], "rows": 1}
    assert rows[1]["done"] == 0 and rows[1]["missing"] == [0]
    console = Console(record=True, width=120)
    console.print(stage_table(run, jobs))
    text = console.export_text()
    assert "generate" in text and "1/2" in text and "0/1" in text
