"""Cluster-scale BEIR regeneration: planning (prompts, corpora) and the shared concurrency limit."""

from __future__ import annotations

import threading
import time

import pytest

from inpars.config import PipelineConfig
from inpars.errors import ConfigError
from inpars.launch.beir import (
    BEIR_DATASETS,
    CQADUPSTACK_FORUMS,
    RunResult,
    plan_beir,
    prompt_for,
    run_many,
    summary_table,
)
from inpars.launch.plan import plan_pipeline


def test_the_18_beir_datasets():
    names = [d.name for d in BEIR_DATASETS]
    assert len(names) == 18 == len(set(names))
    assert "msmarco" not in names  # the training set, not an evaluation set
    ids = {d.name: d.irds_id for d in BEIR_DATASETS}
    assert ids["scifact"] == "beir/scifact/test"
    assert ids["bioasq"] is None and ids["robust04"] is None


def test_prompt_is_promptagator_where_its_template_exists(tmp_path):
    (tmp_path / "promptagator-fiqa.yaml").write_text("x: 1\n")
    assert prompt_for("fiqa", tmp_path) == "promptagator-fiqa"
    assert prompt_for("nfcorpus", tmp_path) == "inpars"
    # Checked at call time: a template added later is picked up.
    (tmp_path / "promptagator-nfcorpus.yaml").write_text("x: 1\n")
    assert prompt_for("nfcorpus", tmp_path) == "promptagator-nfcorpus"
    # The packaged templates: scifact has one (written by the prompts module).
    assert prompt_for("scifact") == "promptagator-scifact"
    assert prompt_for("no-such-dataset") == "inpars"


def test_plan_beir_corpora_from_a_mirror_or_ir_datasets(tmp_path):
    base = PipelineConfig().override({"generate.n_docs": 50, "publish.destination": "gs://b/pub"})
    (tmp_path / "promptagator-scifact.yaml").write_text("x: 1\n")
    mirrored = plan_beir(["scifact", "nfcorpus"], base, "gs://bucket/beir/", templates_dir=tmp_path)
    assert [c.data.name for c in mirrored] == ["scifact", "nfcorpus"]
    assert [c.data.corpus for c in mirrored] == ["gs://bucket/beir/scifact", "gs://bucket/beir/nfcorpus"]
    assert [c.generate.prompt for c in mirrored] == ["promptagator-scifact", "inpars"]
    assert [c.publish.destination for c in mirrored] == ["gs://b/pub/scifact", "gs://b/pub/nfcorpus"]
    assert all(c.generate.n_docs == 50 for c in mirrored)  # the rest comes from the base config
    assert base.data.name == "scifact" and base.data.corpus == "builtin:scifact-sample"  # base untouched

    irds = plan_beir(["scifact", "webis-touche2020"], base, None, templates_dir=tmp_path)
    assert [c.data.corpus for c in irds] == ["irds:beir/scifact/test", "irds:beir/webis-touche2020/v2"]

    cqa = plan_beir(["cqadupstack"], base, "/data/beir", templates_dir=tmp_path)
    assert len(cqa) == len(CQADUPSTACK_FORUMS) == 12
    assert cqa[0].data.name == "cqadupstack-android" and cqa[0].data.corpus == "/data/beir/cqadupstack/android"
    one = plan_beir(["cqadupstack/tex"], base, None, templates_dir=tmp_path)
    assert [c.data.corpus for c in one] == ["irds:beir/cqadupstack/tex"]

    everything = plan_beir("all", base, "gs://m", templates_dir=tmp_path)
    assert len(everything) == 18 - 1 + 12
    for cfg in everything:  # every planned config renders into a valid pipeline plan
        assert plan_pipeline(cfg, f"gs://w/runs/{cfg.data.name}")

    with pytest.raises(ConfigError, match="not in ir_datasets"):
        plan_beir(["bioasq"], base, None)
    with pytest.raises(ConfigError, match="unknown BEIR dataset"):
        plan_beir(["scifacts"], base, None)


def test_run_many_respects_the_concurrency_limit_and_summarises():
    base = PipelineConfig()
    configs = plan_beir(["scifact", "nfcorpus", "fiqa", "arguana", "quora", "scidocs", "fever"], base, "gs://m")
    lock = threading.Lock()
    running = peak = 0
    threads = set()

    def start(cfg: PipelineConfig) -> RunResult:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        try:
            time.sleep(0.15)
            if cfg.data.name == "fiqa":
                raise RuntimeError("quota exceeded\nsecond line")
            return RunResult(
                cfg.data.name,
                "complete",
                run_id=f"{cfg.data.name}-1",
                queries_kept=70,
                metrics={"bm25": {"nDCG@10": 0.6761}, "reranked": {"nDCG@10": 0.7012}},
            )
        finally:
            with lock:
                running -= 1

    started = time.monotonic()
    results = run_many(configs, start, max_concurrent=3)
    elapsed = time.monotonic() - started
    assert peak == 3  # the limit was reached and never exceeded
    assert len(threads) == 3
    assert elapsed < 7 * 0.15  # they did run concurrently
    assert [r.name for r in results] == [c.data.name for c in configs]  # input order
    fiqa = results[2]
    assert fiqa.status == "failed" and "quota exceeded" in fiqa.error
    assert all(r.status == "complete" for i, r in enumerate(results) if i != 2)

    table = summary_table(results)
    assert "6/7 complete" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("scifact"))
    assert "complete" in line and "70" in line and "bm25 0.6761" in line and "reranked 0.7012" in line
    fline = next(ln for ln in table.splitlines() if ln.startswith("fiqa"))
    assert "failed" in fline and "RuntimeError: quota exceeded" in fline and "second line" not in table


def test_run_many_reads_a_finished_workspace_run():
    """start_run may return the workspace Run itself (what the CLI does); the summary reads it."""

    class FinishedRun:
        run_id = "scifact-1"

        def shard_marker(self, stage, index, count):
            return {"rows": 414} if stage == "filter" else None

        def shard_done(self, stage, index, count):
            return stage == "evaluate"

        def read_shard(self, stage, index, count, ext):
            return b'{"systems": {"bm25": {"aggregate": {"nDCG@10": 0.676, "R@100": 0.913}}}}'

    [result] = run_many(plan_beir(["scifact"], PipelineConfig(), "gs://m"), lambda cfg: FinishedRun(), max_concurrent=1)
    assert (result.status, result.run_id, result.queries_kept) == ("complete", "scifact-1", 414)
    assert result.metrics["bm25"]["nDCG@10"] == 0.676
    with pytest.raises(ConfigError):
        run_many([], lambda cfg: None, max_concurrent=0)
