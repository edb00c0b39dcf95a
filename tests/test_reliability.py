"""Every retry safe, every artifact verified (issue 15): a trainer killed between its files and its
record, twin trainers, corrupted artifacts found and redone, a killed launcher's workers, hostile
object names, secrets in payloads.

The upstream stages are real workers on the embedded sample with a tiny random BERT as the model to
train, and generation replaced by committed rows, so that the model-heavy steps take seconds.
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
from inpars.errors import InParsError, InputError
from inpars.launch.driver import drive
from inpars.launch.local import LocalExecutor
from inpars.workers import run_stage
from inpars.workspace import Run, dumps_rows

BIN = Path(sys.executable).parent
SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


def tiny_bert(folder: Path) -> str:
    """A tiny random bare BERT (a bi-encoder) with MiniLM's tokenizer: trains in a second on a CPU."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from inpars.models import resolve_model

    BertModel(
        BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("minilm-l6").name_or_path).save_pretrained(folder)
    return str(folder)


def small_config(model: str) -> PipelineConfig:
    return PipelineConfig().override(
        {
            "generate.n_docs": 24,
            "filter.min_query_tokens": 2,
            "filter.keep_fraction": 1.0,
            "negatives.depth": 10,
            "train.model": model,
            "train.max_steps": 3,
            "train.batch_size": 4,
            "train.max_length": 64,
            "train.held_out_fraction": 0.25,
            "rerank.depth": 5,
            "rerank.max_length": 64,
        }
    )


def fake_generation(run: Run) -> None:
    """Commit the generate shard as a worker would, with queries made of each title's words."""
    from inpars.corpus import read_corpus
    from inpars.generate import sample_documents

    cfg = run.config.generate
    rows = []
    for doc in sample_documents(read_corpus(SAMPLE), cfg.n_docs, cfg.seed):
        words = (doc.title or doc.text).split()[:6]
        rows.append(
            {
                "query": " ".join(reversed(words)),  # not a copy of the document (the filter drops those)
                "doc_id": doc.doc_id,
                "doc_text": doc.contents,
                "log_probs": [-0.1 * (i + 1) for i in range(len(words))],
                "prompt_text": "",
                "fewshot_examples": [],
                "model": "fake",
                "prompt": "inpars",
                "seed": cfg.seed,
                "query_id": f"{doc.doc_id}-{cfg.seed}",
            }
        )
    run.commit_shard("generate", 0, 1, dumps_rows(rows), stats={"rows": len(rows)})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture
def run(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("INPARS_LEASE_SECONDS", "4")
    run = Run.create(tmp_path / "ws", small_config(model_dir), run_id="rel")
    assert run_stage(run.uri, "prepare", 0) is True
    fake_generation(run)
    for stage in ("filter", "negatives"):
        assert run_stage(run.uri, stage, 0) is True
    return run


def files_of(run: Run, stage: str) -> dict:
    return run.record(stage, 0, 1)["files"]


def test_train_killed_between_its_files_and_its_record_resumes_to_the_same_bytes(run):
    assert run_stage(run.uri, "train", 0) is True
    before = files_of(run, "train")
    assert any(name.startswith("model/") and name.endswith(".safetensors") for name in before)
    assert "seconds" not in json.loads(run.read_shard("train", 0, 1, "json"))  # timings are not committed
    # A trainer that died after writing every file but before its record: the files stay, no record.
    run.storage.delete(Run.record_key("train", 0, 1))
    assert not run.shard_done("train", 0, 1)
    assert run_stage(run.uri, "train", 0) is True  # the retry trains again, finds the same bytes, commits
    assert files_of(run, "train") == before
    assert run_stage(run.uri, "train", 0) is False  # already committed: nothing to do
    attempts = run.attempts("train", 0, 1)
    assert len(attempts) == 2 and all("seconds" in a and "timing" in a for a in attempts)


def _worker(run: Run, stage: str, env: dict | None = None) -> subprocess.Popen:
    full = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {}))
    return subprocess.Popen(
        [str(BIN / "inpars"), "worker", stage, "--run", run.uri, "--shard-index", "0"],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_twin_trainers_both_succeed_and_only_one_commits(run):
    twins = [_worker(run, "train"), _worker(run, "train")]
    outputs = [p.communicate(timeout=600) for p in twins]
    assert [p.returncode for p in twins] == [0, 0], outputs
    said = sorted(err.strip().splitlines()[-1] for _, err in outputs)
    assert said == ["train: already committed", "train: committed"]
    assert len([a for a in run.attempts("train", 0, 1) if a.get("outcome") == "committed"]) == 1


@pytest.mark.slow
def test_corrupted_artifacts_are_found_and_redone(run):
    executor = LocalExecutor(max_parallel=2, retry_delay=0.1, progress=False)
    drive(run, executor)
    reference = json.loads(run.read_shard("evaluate", 0, 1, "json"))
    root = Path(run.uri)
    # 1. a deleted shard file, 2. a trimmed TREC run, 3. a record with a missing key
    (root / "negatives" / "shard-00000-of-00001.jsonl").unlink()
    trec = root / "rerank" / "firststage-shard-00000-of-00001.trec"
    trec.write_bytes(trec.read_bytes()[:-40])
    record = json.loads((root / "filter" / "shard-00000-of-00001.done.json").read_text())
    del record["files"], record["key"]
    (root / "filter" / "shard-00000-of-00001.done.json").write_text(json.dumps(record))
    status = {s: run.stage_status(s, 1) for s in ("filter", "negatives", "rerank")}
    assert status["negatives"]["invalid"] == [0] and status["rerank"]["invalid"] == [0] and status["filter"]["invalid"] == [0]
    outcomes = {o.stage: o for o in drive(run, executor)}
    assert outcomes["filter"].redone == [0] and outcomes["negatives"].redone == [0] and outcomes["rerank"].redone == [0]
    assert json.loads(run.read_shard("evaluate", 0, 1, "json")) == reference
    # 4. a flipped model byte (the size stays): only a reader's sha256 check sees it; the driver then
    # checks the inputs fully, sets the train shard aside and redoes it.
    weights = next((root / "train" / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    problems = run.verify_shard("train", 0, 1)
    assert problems and "sha256" in problems[0]
    run.invalidate("rerank", 0, 1, "test: rerank again")
    outcomes = {o.stage: o for o in drive(run, executor)}
    assert outcomes["train"].status == "done" and run.verify_shard("train", 0, 1) == []
    assert json.loads(run.read_shard("evaluate", 0, 1, "json")) == reference


@pytest.mark.slow
def test_a_sigkilled_launcher_leaves_no_worker_running(run, tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", INPARS_LEASE_SECONDS="4")
    launcher = subprocess.Popen(
        [str(BIN / "inpars-launch"), "resume", run.uri, "--until", "train", "--set", "resources.train.cpu=1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    lease_key = "train/_leases/shard-00000-of-00001.json"
    deadline = time.monotonic() + 300
    while not run.storage.exists(lease_key):  # the train worker has started and holds its shard
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    worker_pid = json.loads(run.storage.read_bytes(lease_key))["pid"]
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 30
    while _alive(worker_pid):
        assert time.monotonic() < deadline, "the worker outlived its launcher"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) is not running
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_hostile_object_names_never_leave_the_target_folder(gcs_uri, tmp_path):
    from inpars.storage import open_storage

    store = open_storage(gcs_uri)
    store.write_bytes("train/model/config.json", b"{}")
    # Object names a client library would happily create: an empty segment, a parent reference.
    for hostile in ("train/model//abs/path", "train/model/../../escape"):
        store.client.bucket(store.bucket_name).blob(f"{store.prefix}/{hostile}").upload_from_string(b"x")
        target = tmp_path / "dl"
        with pytest.raises(InputError, match="refusing object"):
            store.download_dir("train/model", target)
        assert not (tmp_path / "escape").exists() and not Path("/abs/path").exists()
        store.client.bucket(store.bucket_name).blob(f"{store.prefix}/{hostile}").delete()
    # A record that lists a hostile name is refused before anything is fetched.
    run = Run.create(gcs_uri, PipelineConfig(), run_id="hostile")
    run.storage.write_bytes(
        Run.record_key("train", 0, 1),
        json.dumps(
            {"stage": "train", "shard": 0, "count": 1, "rows": 0, "stats": {}, "files": {"model//x": {"bytes": 1, "sha256": "0"}}}
        ).encode(),
    )
    with pytest.raises(InputError, match="invalid key"):
        run.fetch("train", "model", into=tmp_path / "f")


def test_secrets_never_reach_the_workspace(tmp_path, monkeypatch):
    key = "sk-live-0123456789abcdefghij"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    run = Run.create(tmp_path / "ws", PipelineConfig(), run_id="secret")
    row = {"query": f"echo Bearer {key}", "doc_id": "d1"}
    with pytest.raises(InParsError, match=r"\$OPENAI_API_KEY") as err:
        run.commit_shard("generate", 0, 1, dumps_rows([row]))
    assert key not in str(err.value) and "generate/shard-00000-of-00001.jsonl" in str(err.value)
    assert not run.storage.exists("generate/shard-00000-of-00001.jsonl")
    with pytest.raises(InParsError, match=r"\$OPENAI_API_KEY"):
        run.update_manifest("notes", {"text": key})
    with pytest.raises(InParsError, match=r"\$OPENAI_API_KEY"):
        run.checkpoint("generate", 0, 1).save(0, [row], start=0, items=1)


def test_a_committed_file_is_scanned_block_by_block_and_hashed_on_the_same_read(tmp_path, monkeypatch):
    # A file output (the filter's kept rows: gigabytes at a million rows) is scanned whole lines at a
    # time, so a secret deep in it is still refused while memory stays one block.
    import inpars.workspace as workspace_module
    from inpars.files import file_sha256

    key = "sk-live-0123456789abcdefghij"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setattr(workspace_module, "SCAN_BLOCK", 64)
    run = Run.create(tmp_path / "ws", PipelineConfig(), run_id="secret-file")
    clean = [{"query_id": f"q{i}", "query": f"query number {i}", "doc_id": f"d{i}"} for i in range(200)]
    leaky = tmp_path / "kept.jsonl"
    leaky.write_bytes(dumps_rows([*clean, {"query_id": "q-last", "query": f"echo {key}", "doc_id": "d0"}]))
    with pytest.raises(InParsError, match=r"\$OPENAI_API_KEY") as err:
        run.commit_shard("filter", 0, 1, leaky)
    assert key not in str(err.value) and not run.storage.exists("filter/shard-00000-of-00001.jsonl")
    fine = tmp_path / "fine.jsonl"
    fine.write_bytes(dumps_rows(clean))
    assert run.commit_shard("filter", 0, 1, fine) is True
    assert run.record("filter", 0, 1)["files"]["shard-00000-of-00001.jsonl"]["sha256"] == file_sha256(fine)
