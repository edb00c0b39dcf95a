"""The whole pipeline through the real launcher, workers and models, on the embedded SciFact sample.

These are the slow end-to-end tests (CI runs them; `make test-fast` skips them). Settings are shrunk so
each run takes a minute or two on 2 CPU cores, but every stage runs for real.
"""

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
from inpars.errors import EXIT_PERMANENT
from inpars.workspace import Run

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent

# Small but real: 12 documents, 4-row checkpoints, a few training steps, a shallow rerank.
SMALL = {
    "generate.n_docs": 12,
    "generate.batch_size": 4,
    "generate.checkpoint_every": 4,
    "generate.max_new_tokens": 24,
    "generate.dtype": "float32",  # exact equality across shardings and restarts
    "filter.keep_fraction": 0.75,
    "filter.min_query_tokens": 2,
    "negatives.depth": 20,
    "train.max_steps": 3,
    "train.batch_size": 2,
    "train.max_length": 128,
    "train.held_out_fraction": 0.25,
    "rerank.depth": 5,
    "rerank.max_length": 128,
}


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the workers are the `inpars` script
    return env


def launch(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "inpars-launch"), *args], capture_output=True, text=True, timeout=timeout, env=_env())


def sets(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return out


def test_demo_pipeline_end_to_end(tmp_path):
    ws, pub = tmp_path / "ws", tmp_path / "published"
    res = launch("run", "--workspace", str(ws), "--run-id", "e2e", *sets({**SMALL, "publish.destination": str(pub)}))
    assert res.returncode == 0, res.stdout + res.stderr
    run = Run.open(str(ws / "runs" / "e2e"))
    generated = run.read_rows("generate", 1)
    assert len(generated) == 12 and all(r["query"].strip() and "\n" not in r["query"] for r in generated)
    kept = [json.loads(line) for line in run.read_shard("filter", 0, 1, "jsonl").decode().splitlines()]
    dropped = [json.loads(line) for line in run.get_file("filter", "dropped.jsonl").decode().splitlines()]
    assert len(kept) + len(dropped) == 12  # nothing vanishes: every row is kept or dropped with a reason
    assert all(r.get("drop_reason") for r in dropped)
    result = json.loads(run.read_shard("evaluate", 0, 1, "json"))
    assert {"bm25", "reranked"} <= set(result["systems"])
    for system in result["systems"].values():
        assert 0.0 <= system["aggregate"]["nDCG@10"] <= 1.0
        assert len(system["per_query"]["nDCG@10"]) == 60  # every judged sample query
    # The summary names both figures and where the artifacts are.
    assert "bm25" in res.stdout and "reranked" in res.stdout and "nDCG@10" in res.stdout
    assert str(ws / "runs" / "e2e") in res.stdout
    published = sorted(p.name for p in pub.iterdir())
    assert f"scifact_synthetic_queries_{len(kept)}.jsonl" in published and "manifest.json" in published
    # ... and the released InPars-v2 layout: every generated query, the kept ones, the training triples
    assert sorted(p.name for p in (pub / "scifact").iterdir()) == ["queries.jsonl", "queries_filtered_v2.jsonl", "triples_train_v2.tsv"]
    pub_manifest = json.loads((pub / "manifest.json").read_text())
    assert pub_manifest["counts"]["generated"] == 12 and pub_manifest["counts"]["filtered"] == len(kept)
    n_triples = sum(len(t["neg_doc_ids"]) for t in run.read_rows("negatives", 1))
    assert pub_manifest["files"]["scifact/triples_train_v2.tsv"]["rows"] == n_triples > 0
    # The model folder is a standard HF folder the `inpars rerank` command can load again.
    assert (ws / "runs" / "e2e" / "train" / "model" / "config.json").exists()
    # status reads the workspace alone
    st = launch("status", str(ws / "runs" / "e2e"))
    assert st.returncode == 0 and "evaluate" in st.stdout


def test_four_shards_equal_one_shard(tmp_path):
    ws = tmp_path / "ws"
    for shards, rid in ((1, "one"), (4, "four")):
        res = launch(
            "run",
            "--workspace",
            str(ws),
            "--run-id",
            rid,
            "--until",
            "negatives",
            "--parallel",
            "2",
            *sets({**SMALL, "generate.shards": shards, "negatives.shards": shards}),
        )
        assert res.returncode == 0, res.stdout + res.stderr
    one, four = Run.open(str(ws / "runs" / "one")), Run.open(str(ws / "runs" / "four"))
    # The same rows in the same order. Log-probs may differ in the last float digits: a shard batches
    # other neighbours, and padding to another width changes the summation order of the matmuls.
    # (Byte identity holds across restarts of the same layout: see the SIGKILL test.)
    for stage in ("generate", "filter"):
        merged = four.read_rows(stage, 4 if stage == "generate" else 1)
        single = one.read_rows(stage, 1)
        assert [_without_floats(r) for r in merged] == [_without_floats(r) for r in single]
        for a, b in zip(merged, single):
            assert a["log_probs"] == pytest.approx(b["log_probs"], abs=1e-4)
    assert one.read_rows("negatives", 1) == four.read_rows("negatives", 4)


def _without_floats(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("log_probs", "score")}


def _worker(run_uri: str, stage: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "inpars"), "worker", stage, "--run", run_uri],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_sigkill_mid_shard_resumes_to_identical_output(tmp_path):
    config = PipelineConfig().override({**SMALL, "generate.n_docs": 16})
    killed = Run.create(str(tmp_path / "ws"), config, "killed")
    clean = Run.create(str(tmp_path / "ws"), config, "clean")
    chunks = Path(killed.uri) / "generate" / "_checkpoints" / "shard-00000-of-00001"
    for run in (killed, clean):
        assert _worker(run.uri, "prepare").wait(timeout=300) == 0

    proc = _worker(killed.uri, "generate")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if chunks.exists() and len([p for p in chunks.iterdir() if p.name.startswith("chunk-")]) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the worker finished before it could be killed: " + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len([p for p in chunks.iterdir() if p.name.startswith("chunk-")])
    assert 2 <= saved < 4 and not killed.shard_done("generate", 0, 1)

    resumed = _worker(killed.uri, "generate")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    uninterrupted = _worker(clean.uri, "generate")
    _, err2 = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err2
    a, b = killed.read_shard("generate", 0, 1), clean.read_shard("generate", 0, 1)
    assert a == b  # byte for byte under greedy decoding: no row lost, none duplicated
    assert [json.loads(x)["doc_id"] for x in a.decode().splitlines()] == [json.loads(x)["doc_id"] for x in b.decode().splitlines()]


def test_bad_input_is_a_permanent_error_naming_file_and_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": broken}\n', encoding="utf-8")
    config = PipelineConfig().override({"data.corpus": str(corpus), "data.name": "bad"})
    run = Run.create(str(tmp_path / "ws"), config, "bad")
    proc = _worker(run.uri, "prepare")  # the corpus is read once, by prepare
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PERMANENT
    assert f"{corpus}:2" in err
