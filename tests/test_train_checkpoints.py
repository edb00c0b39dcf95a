"""Training checkpoints, resume, SIGTERM and multi-process (DDP over gloo) training, on tiny models
built in code: a resumed or two-process run must end with the weights of one uninterrupted process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import make_groups, sample, tiny_t5  # noqa: F401  (sample is a fixture)

from inpars import preemption
from inpars.checkpoints import MANIFEST, LocalCheckpointer, folder_manifest, verify_folder
from inpars.config import TrainConfig
from inpars.errors import EXIT_TRANSIENT, Preempted
from inpars.train import train_model

BIN = Path(sys.executable).parent
TIMING = ("seconds", "steps_per_second")


def tiny_bert(folder: Path, dropout: float = 0.0) -> str:
    """A tiny random BERT with MiniLM's tokenizer (dropout > 0 makes a resume depend on the RNG state)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from inpars.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6").name_or_path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def without_timing(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in TIMING}


@pytest.fixture(autouse=True)
def _no_stop_request():
    preemption.reset()
    yield
    preemption.reset()


# ----------------------------------------------------------------------------- the local checkpointer


def _state(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(payload)
    (folder / "state.json").write_text('{"step": 0}')
    return folder


def test_local_checkpointer_keeps_the_newest_and_skips_torn_ones(tmp_path):
    ck = LocalCheckpointer(tmp_path / "ck", keep=2)
    assert ck.latest() is None
    for step in (2, 4, 6):
        ck.save(step, _state(tmp_path / f"src{step}", b"x" * step))
    assert ck.steps() == [6, 4]  # step 2 pruned
    step, folder = ck.latest()
    assert step == 6 and (folder / "model.pt").read_bytes() == b"x" * 6
    assert verify_folder(folder, json.loads((folder / MANIFEST).read_text())) is None

    # A flipped byte (same size) and a trimmed file are both caught; the previous checkpoint is used.
    (folder / "model.pt").write_bytes(b"y" * 6)
    assert ck.latest()[0] == 4
    (tmp_path / "ck" / "step-000000004" / "model.pt").write_bytes(b"x" * 3)
    assert ck.latest() is None
    # A checkpoint whose manifest never got written (killed mid-save) is skipped too.
    ck.save(8, _state(tmp_path / "src8", b"z"))
    (tmp_path / "ck" / "step-000000008" / MANIFEST).unlink()
    (tmp_path / "ck" / "step-000000009").mkdir()
    assert ck.latest() is None
    ck.save(10, _state(tmp_path / "src10", b"w"))
    assert ck.latest()[0] == 10
    assert folder_manifest(tmp_path / "src10", 10)["files"]["model.pt"] == {"bytes": 1, "sha256": hashlib.sha256(b"w").hexdigest()}


# ----------------------------------------------------------------------------- resume, bit for bit


RESUME_CASES = {
    # dropout on, WiSE-FT on: the RNG state and the initial snapshot must come back from the checkpoint
    "cross-encoder-lce": dict(model_type="cross-encoder", loss="lce", keep_initial=0.3),
    "bi-encoder": dict(model_type="bi-encoder", loss="lce"),
    "monot5-bce": dict(model_type="monot5", loss="bce"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_stop_and_resume_gives_the_uninterrupted_weights(sample, tmp_path, case):  # noqa: F811
    docs = sample[0]
    rows = make_groups(sample, 7, n_neg=2)
    settings = RESUME_CASES[case]
    base = tiny_t5(tmp_path / "t5") if settings["model_type"] == "monot5" else tiny_bert(tmp_path / "bert", dropout=0.1)
    # 7 groups, batch 3: an epoch ends mid-run, so the data order must resume across the reshuffle.
    cfg = TrainConfig(model=base, batch_size=3, max_steps=8, max_length=48, learning_rate=1e-3, seed=3, checkpoint_every=2, **settings)

    clean = train_model(rows, docs, cfg, tmp_path / "clean")

    ck = LocalCheckpointer(tmp_path / "ck")

    def stop_at_5(step, total, loss):
        if step == 5:
            preemption.request()  # what the SIGTERM handler does

    with pytest.raises(Preempted, match="after step 6 of 8; checkpointed at step 6"):
        train_model(rows, docs, cfg, tmp_path / "resumed", on_progress=stop_at_5, checkpointer=ck)
    assert ck.steps() == [6, 4] and not (tmp_path / "resumed").exists()
    preemption.reset()
    seen = []
    resumed = train_model(rows, docs, cfg, tmp_path / "resumed", checkpointer=ck, on_progress=lambda s, t, loss: seen.append(s))
    assert seen == [7, 8]  # only the steps after the checkpoint ran
    assert without_timing(resumed) == without_timing(clean)  # the loss curve too
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    # The test can fail: resuming from the older checkpoint without its RNG and data order would not match.
    other = train_model(rows, docs, TrainConfig(**{**cfg.__dict__, "seed": 4}), tmp_path / "other")
    assert other["loss_curve"] != clean["loss_curve"]


def test_a_checkpoint_of_another_training_is_not_resumed(sample, tmp_path):  # noqa: F811
    docs = sample[0]
    rows = make_groups(sample, 4, n_neg=1)
    base = tiny_bert(tmp_path / "bert")
    cfg = TrainConfig(model=base, model_type="cross-encoder", batch_size=2, max_steps=4, max_length=48, checkpoint_every=2)
    ck = LocalCheckpointer(tmp_path / "ck")
    with pytest.raises(Preempted):
        train_model(rows, docs, cfg, tmp_path / "a", checkpointer=ck, on_progress=lambda s, t, loss: preemption.request())
    preemption.reset()
    assert ck.steps() == [2]  # asked during step 1, seen at the end of step 2
    seen = []
    other = TrainConfig(**{**cfg.__dict__, "learning_rate": 1e-2})
    train_model(rows, docs, other, tmp_path / "b", checkpointer=ck, on_progress=lambda s, t, loss: seen.append(s))
    assert seen == [1, 2, 3, 4]  # started over


# ----------------------------------------------------------------------------- SIGTERM to a real training process


@pytest.mark.slow  # two training processes of 100 steps and an in-process twin
def test_sigterm_to_a_training_process_checkpoints_and_a_rerun_resumes(sample, tmp_path):  # noqa: F811
    docs = sample[0]
    rows = make_groups(sample, 6, n_neg=1)
    triples = tmp_path / "triples.jsonl"
    triples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = tiny_bert(tmp_path / "bert", dropout=0.1)
    steps, every = 100, 10
    cmd = [
        str(BIN / "inpars"),
        "train",
        "--triples",
        str(triples),
        "--corpus",
        str(Path(__file__).resolve().parents[1] / "inpars/data/scifact-sample"),
    ]
    cmd += ["--output-dir", str(tmp_path / "out"), "--model", base, "--model-type", "cross-encoder", "--batch-size", "2"]
    cmd += ["--max-steps", str(steps), "--max-length", "48", "--learning-rate", "1e-3", "--seed", "5"]
    cmd += ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", str(every)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = LocalCheckpointer(tmp_path / "ck")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and ck.latest() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be stopped: " + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_TRANSIENT, err
    assert "preempted: training stopped after step" in err
    stopped_at = ck.latest()[0]
    assert every < stopped_at < steps and not (tmp_path / "out").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming training from step {stopped_at} of {steps}" in rerun.stderr

    cfg = TrainConfig(model=base, model_type="cross-encoder", batch_size=2, max_steps=steps, max_length=48, learning_rate=1e-3, seed=5)
    train_model(rows, docs, cfg, tmp_path / "clean")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()


def test_sigterm_outside_a_stoppable_section_ends_the_process_at_once():
    code = "import os, signal, time\nfrom inpars import preemption\npreemption.install()\nprint('ready', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # not swallowed by a flag nobody polls


# ----------------------------------------------------------------------------- two processes (DDP, gloo) = one


@pytest.mark.parametrize("model_type", ["cross-encoder", "bi-encoder"])
def test_two_ddp_processes_train_the_weights_of_one(sample, tmp_path, model_type):  # noqa: F811
    """The same global batches split over 2 CPU processes (gloo): DDP's averaged gradients equal the
    one-process gradient, for uneven splits too (7 groups in batches of 3: shares of 1 and 2, and of
    0 and 1 at the end of an epoch) and for the bi-encoder's in-batch negatives gathered across ranks."""
    docs = sample[0]
    rows = make_groups(sample, 7, n_neg=2)
    base = tiny_bert(tmp_path / "bert")
    cfg = TrainConfig(model=base, model_type=model_type, batch_size=3, max_steps=6, max_length=48, learning_rate=1e-3, seed=1)
    one = train_model(rows, docs, cfg, tmp_path / "one")
    two = train_model(rows, docs, cfg, tmp_path / "two", processes=2)
    assert two["device"] == "cpu x2 (ddp)" and one["device"] == "cpu"
    start = weights(Path(base))
    one_w, two_w = weights(tmp_path / "one"), weights(tmp_path / "two")
    # A control that differs for real (a 10% lower learning rate) to size the tolerance against.
    train_model(rows, docs, TrainConfig(**{**cfg.__dict__, "learning_rate": 9e-4}), tmp_path / "control")
    control = weights(tmp_path / "control")

    def relative_distance(x: dict, y: dict) -> float:
        """||x - y|| / ||x - start|| over every weight: how far apart, relative to how far training went."""
        num = sum(((x[k] - y[k]) ** 2).sum().item() for k in x)
        den = sum(((x[k] - start[k.removeprefix("bert.")]) ** 2).sum().item() for k in x if k.removeprefix("bert.") in start)
        return (num / den) ** 0.5

    # Float sums in another order (amplified by Adam where a gradient is almost 0), nothing more:
    # measured ~1e-3 for both families, against ~1e-1 for the control.
    assert relative_distance(one_w, two_w) < 1e-2 < relative_distance(one_w, control)
    assert one["loss_curve"]["window_means"] == pytest.approx(two["loss_curve"]["window_means"], abs=1e-4)


@pytest.mark.slow  # three 2-process trainings of 100 steps
def test_a_stop_request_reaches_every_ddp_process_and_the_run_resumes(sample, tmp_path):  # noqa: F811
    """SIGTERM to the parent is forwarded; the ranks agree on one step, rank 0 saves, Preempted comes
    back to the caller; the resumed 2-process run ends where an uninterrupted 2-process run does."""
    docs = sample[0]
    rows = make_groups(sample, 6, n_neg=1)
    base = tiny_bert(tmp_path / "bert")
    cfg = TrainConfig(
        model=base, model_type="cross-encoder", batch_size=2, max_steps=100, max_length=32, learning_rate=1e-3, checkpoint_every=10
    )
    ck = LocalCheckpointer(tmp_path / "ck")
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom inpars import preemption\nfrom inpars.checkpoints import LocalCheckpointer\n"
        "from inpars.config import TrainConfig\nfrom inpars.corpus import read_corpus\nfrom inpars.errors import Preempted, EXIT_TRANSIENT\n"
        "from inpars.train import train_model\n"
        "a = json.loads(sys.argv[1])\npreemption.install()\n"
        "try:\n    train_model(a['rows'], read_corpus(a['corpus']), TrainConfig(**a['cfg']), a['out'], checkpointer=LocalCheckpointer(a['ck']), processes=2)\n"
        "except Preempted:\n    sys.exit(EXIT_TRANSIENT)\n"
    )
    args = {
        "rows": rows,
        "corpus": str(Path(__file__).resolve().parents[1] / "inpars/data/scifact-sample"),
        "cfg": cfg.__dict__,
        "out": str(tmp_path / "out"),
        "ck": str(tmp_path / "ck"),
    }
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and ck.latest() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be stopped: " + proc.stderr.read()
    os.kill(proc.pid, signal.SIGTERM)  # the parent only, as Kubernetes signals PID 1
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_TRANSIENT, err
    stopped_at = ck.latest()[0]
    assert stopped_at < 100
    resumed = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    train_model(rows, docs, cfg, tmp_path / "clean", processes=2)
    a, b = weights(tmp_path / "out"), weights(tmp_path / "clean")
    assert all(torch.equal(a[k], b[k]) for k in a)
