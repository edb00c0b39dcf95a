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


# --------------------------------------------------------------------------------------------
# At cluster scale: deterministic runs, the corpus preflight, resuming after a crash, exit codes


def test_all_datasets_plan_without_aborting_on_the_four_not_in_ir_datasets():
    from inpars.launch.beir import check_corpora, plan_datasets

    plans = plan_datasets("all", PipelineConfig(), None)
    assert len(plans) == 18 - 1 + 12
    missing = {p.name for p in plans if p.missing}
    assert missing == {"bioasq", "signal1m", "trec-news", "robust04"}
    assert all("mirror it under --corpus-root" in p.missing for p in plans if p.missing)
    ids = [p.run_id for p in plans if p.config is not None]
    assert len(set(ids)) == len(ids) and all(len(i) <= 63 for i in ids)
    assert ids == [p.run_id for p in plan_datasets("all", PipelineConfig(), None) if p.config is not None]  # deterministic
    # Workers elsewhere (k8s) and no ir_datasets here: the irds ids are left to the images to read.
    import importlib.util

    if importlib.util.find_spec("ir_datasets") is None:
        assert len(check_corpora(plans, runs_here=False)) == 25
        local = plan_datasets(["scifact"], PipelineConfig(), None)
        assert check_corpora(local, runs_here=True) == [] and "inpars[irds]" in local[0].missing


def test_runtime_settings_of_a_rerun_reach_the_existing_run(tmp_path):
    from inpars.launch.beir import open_run, runtime_changes

    base = PipelineConfig().override({"generate.backend": "openai", "generate.model": "gpt-4o-mini", "generate.budget_usd": 5})
    raised = base.override({"generate.budget_usd": 20, "resources.generate": {"cpu": "8", "memory": "16Gi"}})
    assert runtime_changes(base, raised) == {"generate.budget_usd": 20, "resources.generate": raised.resources["generate"].model_dump()}
    assert runtime_changes(base, base.override({"generate.n_docs": 7})) == {}  # outputs change: a new run, not a setting
    first = open_run(str(tmp_path), base)
    again = open_run(str(tmp_path), raised)
    assert again.run_id == first.run_id and again.config.generate.budget_usd == 20


def beir_folder(root, name: str) -> None:
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"
    folder = root / name
    (folder / "qrels").mkdir(parents=True)
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (folder / rel).write_bytes((sample / rel).read_bytes())


class CommittingExecutor:
    """Plays every stage's workers: commits the shards it is given, records each call, and can crash a
    dataset at one stage (as a pod that keeps failing would)."""

    def __init__(self, crash: dict[str, str] | None = None):
        self.crash = crash or {}
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []
        self.lock = threading.Lock()

    def run_shards(self, job, shards, run):
        from inpars.launch.driver import StageFailed

        name = run.config.data.name
        with self.lock:
            self.calls.append((name, job.stage, tuple(shards)))
        if self.crash.get(name) == job.stage:
            raise StageFailed(f"stage {job.stage}: shards failed (transient)", permanent=False)
        for i in shards:
            if job.stage == "evaluate":
                body = b'{"systems": {"bm25": {"aggregate": {"nDCG@10": 0.5}, "per_query": {}}}}'
                run.commit_shard(job.stage, i, job.shards, body, ext="json")
            else:
                run.commit_shard(job.stage, i, job.shards, f'{{"{job.stage}": {i}}}\n'.encode())

    def stages(self, name: str) -> list[str]:
        return [stage for n, stage, _ in self.calls if n == name]


def test_beir_again_after_a_crash_redoes_nothing_finished_and_reports_the_missing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from inpars.launch import cli

    root = tmp_path / "beir"
    for name in ("scifact", "nfcorpus", "fiqa"):
        beir_folder(root, name)
    workspace = tmp_path / "ws"
    common = ["beir", "--workspace", str(workspace), "--corpus-root", str(root), "--set", "generate.shards=2", "--max-concurrent", "2"]

    # 1. nfcorpus crashes at negatives (generate and filter committed); only transient failures: exit 75.
    crashing = CommittingExecutor(crash={"nfcorpus": "negatives"})
    monkeypatch.setattr(cli, "_executor", lambda backend, **kw: crashing)
    first = CliRunner().invoke(cli.app, [*common, "--datasets", "scifact,nfcorpus,fiqa"])
    assert first.exit_code == 75, first.output
    assert crashing.stages("nfcorpus") == ["prepare", "generate", "filter", "negatives"]
    lines = {ln.split()[0]: ln for ln in first.output.splitlines() if ln.split() and ln.split()[0] in ("scifact", "nfcorpus", "fiqa")}
    assert "complete" in lines["scifact"] and "complete" in lines["fiqa"] and "failed" in lines["nfcorpus"]
    assert "2/3 complete" in first.output

    # The dry run says where each dataset stands, and submits and creates nothing.
    dry = CliRunner().invoke(cli.app, [*common, "--datasets", "scifact,nfcorpus,bioasq", "--dry-run"])
    assert dry.exit_code == 42, dry.output  # bioasq's corpus is missing
    rows = {ln.split()[0]: ln for ln in dry.output.splitlines() if ln.split()}
    assert "complete" in rows["scifact"] and "partial: negatives 0/1" in rows["nfcorpus"]
    assert "missing:" in rows["bioasq"] and "bioasq/corpus.jsonl" in rows["bioasq"]
    runs_before = sorted(p.name for p in (workspace / "runs").iterdir())

    # 2. Again, with bioasq (no corpus in the mirror): nothing finished is redone, nfcorpus resumes at
    #    negatives, bioasq is reported missing while the others run; a missing dataset: exit 42.
    counting = CommittingExecutor()
    monkeypatch.setattr(cli, "_executor", lambda backend, **kw: counting)
    second = CliRunner().invoke(cli.app, [*common, "--datasets", "scifact,nfcorpus,fiqa,bioasq"])
    assert second.exit_code == 42, second.output
    assert counting.stages("scifact") == [] and counting.stages("fiqa") == []  # nothing run, nothing paid twice
    assert counting.stages("nfcorpus") == ["negatives", "train", "rerank", "evaluate"]
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == runs_before  # the same runs, resumed
    table = {ln.split()[0]: ln for ln in second.output.splitlines() if ln.split()}
    assert all("complete" in table[n] for n in ("scifact", "nfcorpus", "fiqa"))
    assert "missing: " in table["bioasq"]
    assert "3/4 complete, 1 missing" in second.output
    assert "bm25 0.5000" in table["nfcorpus"]  # its evaluation, read from the workspace


def test_beir_exit_codes():
    from inpars.launch.beir import exit_code

    done = RunResult("a", "complete")
    assert exit_code([done]) == 0
    assert exit_code([done, RunResult("b", "failed", error="x")]) == 75
    assert exit_code([done, RunResult("b", "failed", error="x", permanent=True)]) == 42
    assert exit_code([done, RunResult("b", "missing: no corpus", permanent=True)]) == 42
