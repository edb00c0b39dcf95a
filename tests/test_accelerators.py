"""The GPU and TPU paths, for a machine that has them (skipped everywhere else).

    python -m pytest -q tests/test_accelerators.py -k cuda              # a node with 1+ (best 2+) GPUs
    PJRT_DEVICE=TPU python -m pytest -q tests/test_accelerators.py -k tpu   # a TPU VM / GKE TPU pod

The CPU versions of the same properties (DDP over gloo equals one process; resume is bit-identical)
run everywhere in tests/test_train_checkpoints.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_train import make_groups, sample  # noqa: F401  (sample is a fixture)
from test_train_checkpoints import tiny_bert, weights

from inpars import preemption
from inpars.checkpoints import LocalCheckpointer
from inpars.config import TrainConfig
from inpars.errors import Preempted
from inpars.train import train_model


def _has_tpu() -> bool:
    if os.environ.get("PJRT_DEVICE", "").upper() != "TPU":
        return False
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than 2 CUDA GPUs")
tpu = pytest.mark.skipif(not _has_tpu(), reason="no TPU (set PJRT_DEVICE=TPU on a TPU host with torch_xla)")


def _config(base: str, **kw) -> TrainConfig:
    settings = dict(model=base, model_type="cross-encoder", batch_size=4, max_steps=8, max_length=48, learning_rate=1e-3, seed=2)
    return TrainConfig(**{**settings, **kw})


def _stop_and_resume(rows, docs, cfg, tmp_path) -> dict[str, torch.Tensor]:
    ck = LocalCheckpointer(tmp_path / "ck")

    def stop(step, total, loss):
        if step == 3:
            preemption.request()

    with pytest.raises(Preempted):
        train_model(rows, docs, cfg, tmp_path / "resumed", checkpointer=ck, on_progress=stop)
    preemption.reset()
    train_model(rows, docs, cfg, tmp_path / "resumed", checkpointer=ck)
    return weights(tmp_path / "resumed")


@cuda
def test_cuda_auto_device_and_resume(sample, tmp_path):  # noqa: F811
    from inpars.devices import resolve_device

    assert resolve_device("auto").type == "cuda"
    docs = sample[0]
    rows = make_groups(sample, 10, n_neg=2)
    base = tiny_bert(tmp_path / "bert")
    cfg = _config(base, dtype="float32", checkpoint_every=2)
    stats = train_model(rows, docs, cfg, tmp_path / "clean", processes=1)
    assert stats["device"].startswith("cuda") and math.isfinite(stats["final_loss"])
    resumed = _stop_and_resume(rows, docs, TrainConfig(**{**cfg.__dict__}), tmp_path)
    clean = weights(tmp_path / "clean")
    # GPU kernels may sum in a different order between runs (atomics): equal up to rounding.
    assert all(torch.allclose(clean[k], resumed[k], atol=1e-5) for k in clean)


@two_gpus
@pytest.mark.parametrize("model_type", ["cross-encoder", "bi-encoder"])
def test_every_gpu_is_used_and_ddp_equals_one_gpu(sample, tmp_path, model_type):  # noqa: F811
    docs = sample[0]
    rows = make_groups(sample, 11, n_neg=2)
    base = tiny_bert(tmp_path / "bert")
    cfg = _config(base, model_type=model_type, dtype="float32", batch_size=5)
    one = train_model(rows, docs, cfg, tmp_path / "one", processes=1)
    every = train_model(rows, docs, cfg, tmp_path / "every")  # default: one DDP process per GPU (NCCL)
    n = torch.cuda.device_count()
    assert one["device"].startswith("cuda") and every["device"] == f"cuda x{n} (ddp)"
    a, b = weights(tmp_path / "one"), weights(tmp_path / "every")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@tpu
def test_tpu_training_uses_every_chip_and_resumes(sample, tmp_path):  # noqa: F811
    import torch_xla.runtime as xr

    from inpars.devices import resolve_device

    assert resolve_device("auto").type == "xla"
    chips = xr.global_runtime_device_count()
    docs = sample[0]
    rows = make_groups(sample, 16, n_neg=3)
    base = tiny_bert(tmp_path / "bert")
    cfg = _config(base, batch_size=8, max_steps=12, checkpoint_every=4)  # dtype auto: bf16 on TPU
    stats = train_model(rows, docs, cfg, tmp_path / "clean")
    assert stats["device"] == (f"xla x{chips} (spmd)" if chips > 1 else "xla:0"), stats["device"]
    assert stats["dtype"] == "bfloat16" and math.isfinite(stats["final_loss"])
    assert stats["loss_curve"]["last"] < stats["loss_curve"]["first"]
    resumed = _stop_and_resume(rows, docs, cfg, tmp_path)
    clean = weights(tmp_path / "clean")
    assert all(torch.allclose(clean[k], resumed[k], atol=1e-3) for k in clean)


@tpu
def test_tpu_reranker_scores_on_the_chips(sample, tmp_path):  # noqa: F811
    from inpars.rerank import load_reranker

    docs = sample[0]
    rows = make_groups(sample, 4, n_neg=1)
    base = tiny_bert(tmp_path / "bert")
    train_model(rows, docs, _config(base, max_steps=2), tmp_path / "model")
    reranker = load_reranker(str(tmp_path / "model"), max_length=48)  # device auto: the TPU
    scores = reranker.score([(r["query"], docs[r["pos_doc_id"]].contents) for r in rows])
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
