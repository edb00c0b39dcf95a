"""The run workspace: manifest, exactly-once shard commits (racing worker processes), checkpoints and
resume after SIGKILL, on a local folder and on gs:// (fake-gcs-server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inpars.config import PipelineConfig
from inpars.errors import InParsError
from inpars.workspace import Checkpoint, Run, checkpointed_map, dumps_rows, new_run_id

WORKER = r"""
import os, sys, time
from inpars.errors import InParsError
from inpars.workspace import Run, checkpointed_map, dumps_rows

mode, run_uri = sys.argv[1], sys.argv[2]
run = Run.open(run_uri)
if mode == "commit":
    data, go = sys.argv[3].encode(), sys.argv[4]
    open(f"{go}.ready-{os.getpid()}", "w").close()
    while not os.path.exists(go):  # start line: both processes commit at the same moment
        time.sleep(0.002)
    try:
        created = run.commit_shard("generate", 0, 1, data)
    except InParsError as e:
        print("ERROR", e, flush=True)
        sys.exit(42)
    print("created" if created else "exists", flush=True)
elif mode == "map":
    calls, delay = sys.argv[3], float(sys.argv[4])
    def fn(chunk):
        out = []
        for i in chunk:
            time.sleep(delay)
            with open(calls, "a") as f:
                f.write(f"{i}\n")
            out.append({"i": i, "sq": i * i, "text": f"item {i} " * 5})
        return out
    cp = run.checkpoint("generate", 0, 1)
    rows = checkpointed_map(list(range(40)), fn, cp, chunk_size=5)
    run.commit_shard("generate", 0, 1, dumps_rows(rows))
    cp.clear()
"""


@pytest.fixture(params=["local", "gcs"])
def workspace(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ws")
    return request.getfixturevalue("gcs_uri")


@pytest.fixture
def run(workspace):
    return Run.create(workspace, PipelineConfig(), run_id="test-run")


@pytest.fixture
def worker_script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


# ----------------------------------------------------------------------------- manifest


def test_create_open_reuse_and_conflict(workspace):
    config = PipelineConfig()
    run = Run.create(workspace, config, run_id="scifact-a1")
    assert run.uri.endswith("/runs/scifact-a1") and run.run_id == "scifact-a1"
    m = Run.open(run.uri).manifest
    assert m["config"] == json.loads(json.dumps(config.to_dict()))
    assert m["code"]["inpars"] and "transformers" in m["packages"] and m["seed"] == 0
    assert m["model"]["generate"] == "smollm2-135m" and m["prompt"]["name"] == "inpars"
    assert Run.create(workspace, PipelineConfig(), run_id="scifact-a1").manifest["created_at"] == m["created_at"]
    other = PipelineConfig()
    other.generate.n_docs = 7
    with pytest.raises(InParsError, match=r"different config \(generate\.n_docs: 100 -> 7"):
        Run.create(workspace, other, run_id="scifact-a1")
    with pytest.raises(InParsError, match="no run"):
        Run.open(run.uri + "-nope")


def test_run_ids():
    rid = new_run_id("SciFact / BEIR")
    assert rid.startswith("scifact-beir-") and len(rid) < 40
    with pytest.raises(InParsError, match="lowercase"):
        Run.create("/tmp/unused-ws", PipelineConfig(), run_id="Bad_ID")


def test_no_secret_in_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-value")
    config = PipelineConfig()
    config.generate.base_url = "http://x/?key=sk-very-secret-value"  # a key pasted where it must not be
    with pytest.raises(InParsError, match="OPENAI_API_KEY"):
        Run.create(tmp_path, config, run_id="r1")
    assert not (tmp_path / "runs" / "r1" / "manifest.json").exists()
    ok = Run.create(tmp_path, PipelineConfig(), run_id="r2")
    assert "sk-very-secret-value" not in (Path(ok.uri) / "manifest.json").read_text()


def test_update_manifest_sections(run):
    run.update_manifest("usage", {"generate": {"prompt_tokens": 10}})
    run.update_manifest("cost", {"usd": 0.5})
    run.update_manifest("usage", {"generate": {"prompt_tokens": 12}})
    m = Run.open(run.uri).manifest
    assert m["usage"] == {"generate": {"prompt_tokens": 12}} and m["cost"] == {"usd": 0.5}
    with pytest.raises(InParsError):
        run.update_manifest("config", {})


# ----------------------------------------------------------------------------- shards


def test_commit_markers_and_status(run):
    data = dumps_rows([{"query": "a"}, {"query": "b"}])
    assert run.commit_shard("generate", 1, 3, data, stats={"usage": 5}) is True
    assert run.commit_shard("generate", 1, 3, data) is False  # identical: already committed
    marker = run.shard_marker("generate", 1, 3)
    assert marker["rows"] == 2 and marker["bytes"] == len(data) and marker["stats"] == {"usage": 5}
    assert run.shard_done("generate", 1, 3) and not run.shard_done("generate", 0, 3)
    assert run.missing_shards("generate", 3) == [0, 2]
    with pytest.raises(InParsError, match="filter needs generate shards 0, 2 of 3; run them first"):
        run.require_complete("generate", 3, needed_by="filter")
    with pytest.raises(InParsError, match="already committed .* different content"):
        run.commit_shard("generate", 1, 3, dumps_rows([{"query": "other"}]))
    run.commit_shard("generate", 0, 3, dumps_rows([{"query": "z"}]))
    run.commit_shard("generate", 2, 3, b"")
    run.require_complete("generate", 3)
    assert [r["query"] for r in run.read_rows("generate", 3)] == ["z", "a", "b"]
    status = run.stage_status("generate", 3)
    assert status["done"] == [0, 1, 2] and status["missing"] == [] and status["rows"] == 3
    with pytest.raises(InParsError, match="shard count of 3"):
        run.require_complete("generate", 4)
    # non-line formats: rows from stats (or null), never the lines of pretty-printed JSON
    run.commit_shard("train", 0, 1, b'{\n  "loss": 0.5\n}\n', ext="json", stats={"rows": 414})
    assert run.shard_marker("train", 0, 1)["rows"] == 414
    run.commit_shard("evaluate", 0, 1, b'{\n  "a": 1\n}\n', ext="json")
    assert run.shard_marker("evaluate", 0, 1)["rows"] is None
    assert run.read_shard("train", 0, 1, "json").startswith(b"{")


def test_marker_written_after_a_crash_between_output_and_marker(run):
    data = dumps_rows([{"q": 1}])
    run.storage.create_if_absent(Run.shard_key("negatives", 0, 1), data)  # output, no marker
    assert not run.shard_done("negatives", 0, 1)
    assert run.commit_shard("negatives", 0, 1, data) is False
    assert run.shard_done("negatives", 0, 1)


def test_read_shard_detects_corruption(run):
    run.commit_shard("generate", 0, 1, b'{"a": 1}\n')
    run.storage.write_bytes(Run.shard_key("generate", 0, 1), b'{"a": 2}\n')
    with pytest.raises(InParsError, match="sha256"):
        run.read_shard("generate", 0, 1)


def _race(run, worker_script, tmp_path, contents):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, str(worker_script), "commit", run.uri, c, str(go)], stdout=subprocess.PIPE, text=True)
        for c in contents
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready-*"))) < len(procs):  # every worker at the start line
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    return [(p.wait(timeout=60), p.stdout.read().strip()) for p in procs]


def test_two_processes_race_same_content(run, worker_script, tmp_path):
    results = _race(run, worker_script, tmp_path, ['{"q": 1}\n', '{"q": 1}\n'])
    assert [rc for rc, _ in results] == [0, 0]
    assert sorted(out for _, out in results) == ["created", "exists"]
    assert run.read_shard("generate", 0, 1) == b'{"q": 1}\n'


def test_two_processes_race_different_content(run, worker_script, tmp_path):
    results = _race(run, worker_script, tmp_path, ['{"q": 1}\n', '{"q": 2}\n'])
    assert sorted(rc for rc, _ in results) == [0, 42]
    loser = next(out for rc, out in results if rc == 42)
    assert "generate shard 0 of 1 is already committed" in loser and "different content" in loser
    winner = next(out for rc, out in results if rc == 0)
    assert winner == "created"
    assert run.read_shard("generate", 0, 1) in (b'{"q": 1}\n', b'{"q": 2}\n')


# ----------------------------------------------------------------------------- files


def test_attempts_of_one_process_within_a_second_keep_separate_records(run):
    # An in-process retry (or a shard that takes under a second) must not overwrite the first record.
    for outcome in ("failed", "committed", "already committed"):
        run.record_attempt("train", 0, 1, {"outcome": outcome})
    attempts = run.attempts("train", 0, 1)
    assert sorted(a["outcome"] for a in attempts) == ["already committed", "committed", "failed"]
    assert len({a["attempt"] for a in attempts}) == 3
    run.invalidate("train", 0, 1, "first")  # no record yet: nothing set aside
    for reason in ("first", "second"):
        run.commit_shard("train", 0, 1, b"{}", ext="json")
        run.invalidate("train", 0, 1, reason)
    assert len(run.storage.list("train/_invalid/")) == 2


def test_files_and_dirs(run, tmp_path):
    assert run.put_file("evaluate", "metrics.json", b"{}") is True
    assert run.put_file("evaluate", "metrics.json", b"{}") is False
    with pytest.raises(InParsError, match="different content"):
        run.put_file("evaluate", "metrics.json", b"{1}")
    assert run.put_file("evaluate", "metrics.json", b"{2}", exclusive=False) is True
    assert run.get_file("evaluate", "metrics.json") == b"{2}"
    with pytest.raises(InParsError, match="run the rerank stage first"):
        run.get_file("rerank", "run.trec")
    # A folder (the trained model) is committed as files of the train shard and fetched verified.
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "w.bin").write_bytes(b"\0" * 100)
    with pytest.raises(InParsError, match="not committed"):
        run.fetch("train", "model")
    files = {f"model/{p.name}": p for p in out.iterdir()}
    run.commit_shard("train", 0, 1, b"{}\n", ext="json", files=files)
    assert set(run.record("train", 0, 1)["files"]) == {"shard-00000-of-00001.json", "model/config.json", "model/w.bin"}
    got = run.fetch("train", "model", into=tmp_path / "dl")
    assert (got / "w.bin").read_bytes() == b"\0" * 100
    if run.is_local:
        assert run.fetch("train", "model") == Path(run.uri) / "train" / "model"  # no copy in a local workspace


# ----------------------------------------------------------------------------- checkpoints


def _rows(chunk, calls):
    calls.extend(chunk)
    return [{"i": i, "double": 2 * i} for i in chunk]


def test_checkpoint_resume_and_truncated_chunk(run):
    cp = run.checkpoint("generate", 0, 1)
    calls: list[int] = []
    full = checkpointed_map(list(range(10)), lambda c: _rows(c, calls), cp, chunk_size=3)
    assert [r["i"] for r in full] == list(range(10)) and calls == list(range(10))
    assert [len(c) for c in cp.load()] == [3, 3, 3, 1]
    # everything stored: nothing redone
    calls.clear()
    assert checkpointed_map(list(range(10)), lambda c: _rows(c, calls), cp, chunk_size=3) == full and calls == []
    # a torn write of chunk 1: detected, deleted and redone; chunks after the gap are ignored
    key = cp.key(1)
    data = run.storage.read_bytes(key)
    run.storage.write_bytes(key, data[: len(data) // 2])
    assert len(cp.load()) == 1 and not run.storage.exists(key)
    calls.clear()
    assert checkpointed_map(list(range(10)), lambda c: _rows(c, calls), cp, chunk_size=3) == full
    assert calls == list(range(3, 10))
    # an edited row (trailer intact) fails the sha256 check
    data = run.storage.read_bytes(cp.key(2))
    run.storage.write_bytes(cp.key(2), data.replace(b'"double": 12', b'"double": 13'))
    assert len(cp.load()) == 2
    # another chunk size: stored chunks no longer line up -> start over
    calls.clear()
    assert checkpointed_map(list(range(10)), lambda c: _rows(c, calls), cp, chunk_size=4) == full and calls == list(range(10))
    cp.clear()
    assert cp.load() == [] and run.storage.list(cp.prefix + "/") == []
    if run.is_local:  # no empty folders left behind, as in an object store
        assert not (Path(run.uri) / "generate" / "_checkpoints").exists() and (Path(run.uri) / "generate").is_dir() is False


def test_checkpoint_save_first_writer_wins(run):
    cp = run.checkpoint("generate", 0, 1)
    assert cp.save(0, [{"a": 1}], start=0, items=1) == [{"a": 1}]
    assert cp.save(0, [{"a": 1}], start=0, items=1) == [{"a": 1}]  # identical: fine
    assert cp.save(0, [{"a": 9}], start=0, items=1) == [{"a": 1}]  # racing loser adopts the stored chunk
    assert isinstance(cp, Checkpoint) and cp.load() == [[{"a": 1}]]


def _wait_for_chunks(run, n, proc, timeout=60):
    deadline = time.monotonic() + timeout
    prefix = "generate/_checkpoints/"
    while len(run.storage.list(prefix)) < n:
        assert proc.poll() is None, "the worker finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sigkill_resume_is_byte_identical(workspace, worker_script, tmp_path):
    config = PipelineConfig()
    # an uninterrupted run
    ref = Run.create(workspace, config, run_id="ref")
    subprocess.run([sys.executable, str(worker_script), "map", ref.uri, str(tmp_path / "ref-calls"), "0"], check=True, timeout=120)
    expected = ref.read_shard("generate", 0, 1)
    assert len(expected.splitlines()) == 40
    # a run killed with SIGKILL mid-way, then restarted
    run = Run.create(workspace, config, run_id="killed")
    calls = tmp_path / "calls"
    cmd = [sys.executable, str(worker_script), "map", run.uri, str(calls), "0.03"]
    proc = subprocess.Popen(cmd)
    _wait_for_chunks(run, 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not run.shard_done("generate", 0, 1)
    chunks_before = len(run.checkpoint("generate", 0, 1).load())
    assert 3 <= chunks_before < 8
    subprocess.run(cmd, check=True, timeout=120)
    assert run.read_shard("generate", 0, 1) == expected
    done = [int(x) for x in calls.read_text().split()]
    assert sorted(set(done)) == list(range(40))
    assert len(done) - 40 <= 5, "more than one chunk was redone"
    assert run.storage.list("generate/_checkpoints/") == []


def test_iter_rows_reads_a_slice_of_the_whole_stage(tmp_path):
    """A query shard's slice: shards before it are not read (their records count their rows), rows before it are skipped unparsed."""
    run = Run.create(str(tmp_path), PipelineConfig(), "slices")
    for i in range(3):
        body = "".join(json.dumps({"i": 10 * i + j}) + "\n" for j in range(4)) + "\n"  # a blank line is not a row
        run.commit_shard("generate", i, 3, body.encode())
    whole = [r["i"] for r in run.iter_rows("generate", 3)]
    assert whole == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    for start in range(13):
        for stop in range(start, 14):
            assert [r["i"] for r in run.iter_rows("generate", 3, start=start, stop=stop)] == whole[start:stop]
    (Path(run.uri) / "generate" / "shard-00000-of-00003.jsonl").write_text("torn")
    assert [r["i"] for r in run.iter_rows("generate", 3, start=4, stop=6)] == [10, 11]  # shard 0 is never opened


def test_fetch_hashes_a_large_input_once_per_machine_and_again_once_it_changed(tmp_path, monkeypatch):
    from inpars import workspace

    monkeypatch.setenv("INPARS_SCRATCH", str(tmp_path / "scratch"))
    run = Run.create(str(tmp_path / "ws"), PipelineConfig(), "stamps")
    run.commit_shard("prepare", 0, 1, b"{}", ext="json", files={"store/documents.arrow": b"x" * 4096})
    hashed = []
    real = workspace.file_sha256
    monkeypatch.setattr(workspace, "file_sha256", lambda path, *a, **k: hashed.append(Path(path).name) or real(path, *a, **k))
    for _ in range(3):  # three shards on one node
        run.fetch("prepare", "store")
    assert hashed == ["documents.arrow"]
    target = Path(run.uri) / "prepare" / "store" / "documents.arrow"
    target.write_bytes(b"y" + b"x" * 4095)  # a flipped byte, same size: hashed again, refused
    with pytest.raises(InParsError, match="does not match the sha256"):
        run.fetch("prepare", "store")
