"""SIGTERM (a Spot/TPU preemption, a drain, a cancel): the work so far is saved, the worker exits with
the retryable EXIT_TRANSIENT, and a rerun ends with the output of an uninterrupted run. Also: which
device ``auto`` picks from the pod's resources, and how training uses several devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inpars import preemption
from inpars.config import PipelineConfig
from inpars.devices import auto_device_name, resolve_device
from inpars.distributed import LaunchPlan, World, launch_plan, loss_scale, share
from inpars.errors import EXIT_PERMANENT, EXIT_TRANSIENT, ConfigError, Preempted, TransientError
from inpars.storage import open_storage
from inpars.workers import run_stage
from inpars.workspace import Checkpoint, Run, checkpointed_map

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _no_stop_request():
    preemption.reset()
    yield
    preemption.reset()


def test_exit_codes_and_the_preempted_error():
    assert EXIT_TRANSIENT not in (0, EXIT_PERMANENT, 128 + signal.SIGTERM)  # told apart from a plain kill
    assert issubclass(Preempted, TransientError)  # retried, never a permanent failure


# ----------------------------------------------------------------------------- checkpointed_map


def test_checkpointed_map_stops_after_the_chunk_in_progress_and_resumes(tmp_path):
    checkpoint = Checkpoint(open_storage(str(tmp_path)), "generate/_checkpoints/shard-00000-of-00001")
    calls = []

    def fn(chunk):
        calls.append(list(chunk))
        if len(calls) == 2:
            preemption.request()  # SIGTERM arrives while the second chunk is being generated
        return [{"x": i, "sq": i * i} for i in chunk]

    with pytest.raises(Preempted, match="6 of 10 items are checkpointed"):
        checkpointed_map(list(range(10)), fn, checkpoint, 3)
    assert len(checkpoint.load()) == 2  # the chunk in progress was finished and saved, nothing more started
    preemption.reset()
    calls.clear()
    rows = checkpointed_map(list(range(10)), fn, checkpoint, 3)
    assert calls == [[6, 7, 8], [9]]
    assert rows == [{"x": i, "sq": i * i} for i in range(10)]


def test_a_stop_during_the_last_chunk_finishes_the_shard(tmp_path):
    checkpoint = Checkpoint(open_storage(str(tmp_path)), "c")

    def fn(chunk):
        preemption.request()
        return [{"x": i} for i in chunk]

    assert len(checkpointed_map(list(range(2)), fn, checkpoint, 5)) == 2  # committing beats restarting


# ----------------------------------------------------------------------------- a real generate worker


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _worker(run_uri: str, stage: str) -> subprocess.Popen:
    cmd = [str(BIN / "inpars"), "worker", stage, "--run", run_uri]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # three generations of 8 documents with the packaged SmolLM2 on CPU
def test_sigterm_to_a_generate_worker_saves_the_chunk_and_exits_retryable(tmp_path):
    small = {
        "generate.n_docs": 8,
        "generate.batch_size": 2,
        "generate.checkpoint_every": 2,
        "generate.max_new_tokens": 12,
        "generate.dtype": "float32",
    }
    config = PipelineConfig().override(small)
    stopped = Run.create(str(tmp_path / "ws"), config, "stopped")
    clean = Run.create(str(tmp_path / "ws"), config, "clean")
    chunks = Path(stopped.uri) / "generate" / "_checkpoints" / "shard-00000-of-00001"

    def saved() -> int:
        return len([p for p in chunks.iterdir() if p.name.startswith("chunk-")]) if chunks.exists() else 0

    for run in (stopped, clean):
        assert run_stage(run.uri, "prepare", 0) is True  # the store the generate workers sample from
    proc = _worker(stopped.uri, "generate")
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and proc.poll() is None and saved() < 1:
        time.sleep(0.1)
    assert proc.poll() is None, "the worker finished before it could be stopped: " + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == EXIT_TRANSIENT, err
    assert "preempted: stopped on request (SIGTERM)" in err
    assert 1 <= saved() < 4 and not stopped.shard_done("generate", 0, 1)

    resumed = _worker(stopped.uri, "generate")
    _, err = resumed.communicate(timeout=1800)
    assert resumed.returncode == 0, err
    uninterrupted = _worker(clean.uri, "generate")
    _, err = uninterrupted.communicate(timeout=1800)
    assert uninterrupted.returncode == 0, err
    a, b = stopped.read_shard("generate", 0, 1), clean.read_shard("generate", 0, 1)
    assert a == b  # byte for byte under greedy decoding
    assert len(a.decode().splitlines()) == 8 and len({json.loads(x)["doc_id"] for x in a.decode().splitlines()}) == 8


# ----------------------------------------------------------------------------- devices from the pod's resources


def test_auto_device_follows_the_launcher_and_torch_xla(monkeypatch):
    monkeypatch.delenv("INPARS_DEVICE", raising=False)
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    assert auto_device_name() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("PJRT_DEVICE", "TPU")  # torch_xla's switch (the TPU image sets it)
    assert auto_device_name() == "tpu"
    monkeypatch.setenv("INPARS_DEVICE", "cpu")  # the launcher's word wins
    assert auto_device_name() == "cpu" and resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("INPARS_DEVICE", "tpu")
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        # A TPU pod without a working torch_xla fails loudly instead of training on the host CPU.
        with pytest.raises(ConfigError, match="torch_xla"):
            resolve_device("auto")
    if not torch.cuda.is_available():
        monkeypatch.setenv("INPARS_DEVICE", "cuda")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("auto")


def test_launch_plans(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cuda, xla, cpu = torch.device("cuda"), torch.device("xla", 0), torch.device("cpu")
    assert launch_plan(cuda, 4) == LaunchPlan("ddp", 4, 4, "nccl")  # every GPU of the pod
    assert launch_plan(cuda, 1) == LaunchPlan("single")
    assert launch_plan(xla, 4) == LaunchPlan("spmd", 1, 4)  # every chip of the host, one process
    assert launch_plan(xla, 1) == LaunchPlan("single")
    assert launch_plan(cpu, 1) == LaunchPlan("single")
    assert launch_plan(cpu, 1, processes=2) == LaunchPlan("ddp", 2, 2, "gloo")
    with pytest.raises(ConfigError, match="SPMD"):
        launch_plan(xla, 4, processes=4)
    with pytest.raises(ConfigError, match="sees 2 GPU"):
        launch_plan(cuda, 2, processes=4)
    monkeypatch.setenv("WORLD_SIZE", "8")  # under torchrun: its world is the plan
    monkeypatch.setenv("RANK", "3")
    assert launch_plan(cuda, 8) == LaunchPlan("ddp", 8, 8, "nccl")


def test_each_rank_takes_a_contiguous_share_and_the_loss_scale_restores_the_global_mean():
    batch = list("abcdefg")
    shares = [share(batch, World(r, 3)) for r in range(3)]
    assert sum(shares, []) == batch and [len(s) for s in shares] == [2, 2, 3]
    assert [share(list("a"), World(r, 2)) for r in range(2)] == [[], ["a"]]
    # DDP averages over ranks: sum_r scale * (sum of rank r's losses) == global sum / units.
    losses = [0.5, 1.0, 2.0, 4.0, 0.25, 3.0, 1.5]
    per_rank = [sum(losses[i] for i in range(7) if batch[i] in s) for s in shares]
    assert sum(loss_scale(World(r, 3), 7) * per_rank[r] for r in range(3)) / 3 == pytest.approx(sum(losses) / 7)
