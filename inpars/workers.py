"""The stage workers: find the shard, read its inputs through the workspace, call library functions, commit.

``inpars worker <stage> --run RUN_URI`` calls :func:`run_stage`; the local executor and the
Kubernetes pods run exactly that. Workers only move data: every method step (sampling, filtering,
mining, training, fusion, evaluation) is a library function that the file CLI and the benchmarks
call too. A worker reads its inputs from the workspace only (so a later stage can run on another
machine), refuses to start while an input shard is missing, holds the shard's lease while it works
(:mod:`inpars.leases`) and commits through :meth:`inpars.workspace.Run.commit_shard`, so a rerun, a
retry or a racing twin changes nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import corpus as corpus_io
from .config import PipelineConfig
from .datasets import fetch, resolve_dataset
from .errors import ConfigError, InputError
from .pipeline import get_stage, stage_shards
from .shards import shard_index_from_env, shard_name, take_shard
from .workspace import Checkpoint, Run, dumps_rows, new_attempt_id, scratch_root

log = logging.getLogger("inpars.workers")

FEWSHOT_IDS = "fewshot_query_ids.json"  # the filter's record of the query ids shown as few-shot examples
PROGRESS_EVERY = 5.0  # seconds between progress notes in the attempt record


@dataclass
class Shard:
    """One shard's work: where it commits, its lease, and what its attempt record will say."""

    run: Run
    stage: str
    index: int
    count: int
    lease: Any = None
    attempt: dict[str, Any] = field(default_factory=dict)  # uncommitted: timings, host, API retries
    _last_progress: float = 0.0

    @property
    def config(self) -> PipelineConfig:
        return self.run.config

    def shards_of(self, stage: str) -> int:
        return get_stage(stage).shards(self.config)

    def commit(self, data: bytes | None = None, **kwargs: Any) -> bool:
        """Commit the shard; True when this worker committed it, False when another one had already."""
        before = self.run.shard_done(self.stage, self.index, self.count)
        self.run.commit_shard(self.stage, self.index, self.count, data, lease=self.lease, **kwargs)
        self.attempt["outcome"] = "already committed" if before else "committed"
        return not before

    def checkpoint(self) -> Checkpoint:
        return self.run.checkpoint(self.stage, self.index, self.count)

    def progress(self, done: int, total: int | None = None, unit: str = "rows") -> None:
        """Note progress in the attempt record (at most every few seconds): what launchers show."""
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_EVERY and done != total:
            return
        self._last_progress = now
        self.attempt["progress"] = {"done": done, "total": total, "unit": unit, "at": time.time()}
        try:
            self.run.record_attempt(self.stage, self.index, self.count, self.attempt)
        except Exception as e:  # progress must never break the work
            log.debug("progress note failed: %s", e)


def evaluation_queries(run: Run, exclude: set[str]) -> dict[str, str]:
    """The run's judged evaluation queries (as prepare committed them), in id order, minus excluded (few-shot) ids."""
    from .evaluate import evaluation_queries as judged_queries

    queries, qrels = prepared_evaluation(run)
    return judged_queries(corpus_io.read_queries(queries), corpus_io.read_qrels(qrels), exclude, source=str(queries))


def prepared_file(run: Run, kind: str) -> Path | None:
    """The local path of a small file prepare copied into the run (``kind``: one of
    :data:`EVALUATION_FILES`), verified; None when the run has none."""
    name = (run.record("prepare", 0, 1) or {}).get("stats", {}).get("evaluation", {}).get(kind)
    return run.fetch("prepare", name) if name else None


def prepared_evaluation(run: Run) -> tuple[Path, Path]:
    """Local paths of the evaluation queries and qrels that prepare copied into the run."""
    queries, qrels = prepared_file(run, "queries"), prepared_file(run, "qrels")
    if queries is None or qrels is None:
        raise ConfigError("rerank/evaluate need evaluation queries and qrels: set data.queries and data.qrels")
    return queries, qrels


# One prepared store and index per worker process (a worker runs one shard; tests run several in one process).
_prepared: dict[str, tuple[Any, Any]] = {}


def prepared(run: Run):
    """``(store, index)``: the run's document store and BM25 index from the prepare stage, memory-mapped.

    On a gs:// workspace their files are streamed to scratch (``INPARS_SCRATCH`` / the cache, the pod's
    ``/scratch`` volume) and verified; a local workspace serves them in place (verified too). The store
    must be the pinned corpus: a store prepared from another corpus stops the worker.
    """
    from .prepare import INDEX_DIR, STORE_DIR, open_prepared

    if run.uri not in _prepared:
        folder = run.fetch("prepare", STORE_DIR).parent
        run.fetch("prepare", INDEX_DIR)
        store, index = open_prepared(folder)
        run.check_corpus(store.info.source_sha256 or "", f"the prepared store {run.storage.uri('prepare/' + STORE_DIR)}")
        _prepared[run.uri] = (store, index)
    return _prepared[run.uri]


def _read_fewshot_ids(run: Run) -> set[str]:
    if not run.config.evaluate.exclude_fewshot:
        return set()
    return set(json.loads(run.read_file("filter", FEWSHOT_IDS)))


# --------------------------------------------------------------------------- workers


# What prepare copies beside the store and index (small files: every later worker reads them from the run).
EVALUATION_FILES = ("queries", "qrels", "fewshot")


def prepare_worker(shard: Shard) -> None:
    from .prepare import prepare_corpus, prepared_files

    run = shard.run
    config = run.config
    ds = resolve_dataset(config)
    with tempfile.TemporaryDirectory(dir=scratch_root()) as tmp:
        folder = Path(tmp) / "prepared"
        stats = prepare_corpus(ds.corpus, folder, retriever=config.negatives.retriever, source=config.data.corpus)
        store = stats["store"]
        pin = {"source": config.data.corpus, "sha256": store["source_sha256"], "documents": store["documents"]}
        pin["bytes"] = corpus_io.resolve_corpus_file(ds.corpus).stat().st_size
        run.pin_corpus(pin)  # a corpus that changed since the run's first prepare stops here
        files: dict[str, Any] = {p.relative_to(folder).as_posix(): p for p in prepared_files(folder)}
        evaluation = {}
        for kind, path in zip(EVALUATION_FILES, (ds.queries, ds.qrels, ds.fewshot)):
            if path is None:
                continue
            if kind == "queries":
                corpus_io.read_queries(path)  # validated here: a bad line names file and line before anything is paid for
            elif kind == "qrels":
                corpus_io.read_qrels(path)
            name = f"{kind}{Path(path).suffix}"
            files[name], evaluation[kind] = Path(path), name
        stats = {**stats, "corpus": pin, "evaluation": evaluation, "rows": store["documents"]}
        shard.commit(json.dumps(stats, indent=2, sort_keys=True).encode(), ext="json", files=files, stats=stats)


def generate_worker(shard: Shard) -> None:
    from .backends import get_backend
    from .backends.journal import AnswerJournal, StorageJournalSink
    from .generate import generate_queries, sample_positions
    from .ledger import Ledger
    from .prompts import load_prompt
    from .usage import BudgetExceeded
    from .workspace import checkpointed_map

    run, index, count = shard.run, shard.index, shard.count
    cfg = run.config.generate
    store, _ = prepared(run)
    # The sample as store rows: this shard reads only its own documents, a checkpoint chunk at a time.
    mine = store.documents(take_shard(sample_positions(len(store), cfg.n_docs, cfg.seed), index, count))
    fewshot = prepared_file(run, "fewshot")
    prompt = load_prompt(_prompt_name(run.config), fewshot_file=str(fewshot) if fewshot else None)
    backend = get_backend(cfg.backend, cfg)
    name = shard_name(index, count, "jsonl")
    journal = ledger = None
    if backend.supports_journal:
        # Paid answers are journaled as they arrive (a local file, and segments in the workspace), so
        # a worker that crashed mid-chunk, here or on another machine, never pays twice for a document.
        local = Path(run.uri) / "generate" / "_journal" / name if run.is_local else scratch_root() / "journal" / run.run_id / name
        remote = None if run.is_local else StorageJournalSink(run.storage, f"generate/_journal/{name.removesuffix('.jsonl')}")
        journal = AnswerJournal(local, remote)
        backend.use_journal(journal)
    if cfg.budget_usd is not None:
        # One budget for the whole run, booked in the workspace by every shard, pod and retry.
        ledger = Ledger(run.storage, cfg.budget_usd, f"generate-{index:05d}-of-{count:05d}", shards=count)
        backend.use_ledger(ledger)
    checkpoint = shard.checkpoint()
    try:

        def generate_chunk(chunk):
            return generate_queries(
                chunk,
                backend,
                prompt,
                max_new_tokens=cfg.max_new_tokens,
                max_doc_tokens=cfg.max_doc_tokens,
                max_example_tokens=cfg.max_example_tokens,
                batch_size=cfg.batch_size,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=cfg.seed,
            )

        def progress(done: int, total: int) -> None:
            shard.progress(done, total, "documents")

        try:
            rows = checkpointed_map(mine, generate_chunk, checkpoint, cfg.checkpoint_every, on_progress=progress)
        except BudgetExceeded:
            # A clean stop: every finished chunk is checkpointed; only the unfinished chunk's
            # requests (at most generate.checkpoint_every documents) are made again on resume.
            done = sum(len(c) for c in checkpoint.load())
            raise BudgetExceeded(
                f"generate shard {index}/{count}: the run's budget of ${cfg.budget_usd} was reached after {done} of {len(mine)} "
                f"documents (checkpointed); raise it with `inpars-launch resume RUN --set generate.budget_usd=...`"
            ) from None
    finally:
        backend.close()
        if ledger is not None:
            ledger.release_unused(backend.usage_summary().get("cost_usd") or 0.0)
            shard.attempt["budget"] = ledger.summary()
    usage = {
        "prompt_tokens": sum(r.get("usage", {}).get("prompt_tokens", 0) for r in rows),
        "completion_tokens": sum(r.get("usage", {}).get("completion_tokens", 0) for r in rows),
    }
    backend_usage = backend.usage_summary()
    if backend_usage is not None:
        shard.attempt["api"] = backend_usage  # retries and timings differ between attempts: not committed
    shard.commit(dumps_rows(rows), ext="jsonl", stats={"rows": len(rows), "usage": usage})
    checkpoint.clear()
    if journal is not None:
        journal.clear()


def _prompt_name(config: PipelineConfig) -> str:
    # `promptagator` alone means the dataset's own template (promptagator-<dataset>).
    name = config.generate.prompt
    return f"promptagator-{config.data.name}" if name == "promptagator" else name


def filter_worker(shard: Shard) -> None:
    from .corpus import dumps_row
    from .evaluate import natural_key
    from .filter import filter_stream, load_scorer
    from .generate import fewshot_query_ids

    run = shard.run
    cfg = run.config.filter
    n_generate = shard.shards_of("generate")
    scorer, index_, docs = load_scorer(cfg), None, None
    if cfg.strategy == "consistency":
        docs, index_ = prepared(run)
    fewshot: set[str] = set()
    passes = 0

    def open_rows():
        # Read two or three times by the streaming filter; the few-shot ids are collected on the first pass.
        nonlocal passes
        passes += 1
        first = passes == 1
        for row in run.iter_rows("generate", n_generate, needed_by="filter"):
            if first:
                fewshot.update(fewshot_query_ids((row,)))
            yield row

    with tempfile.TemporaryDirectory(dir=scratch_root()) as tmp:
        kept_path, dropped_path = Path(tmp) / "kept.jsonl", Path(tmp) / "dropped.jsonl"
        with open(kept_path, "w", encoding="utf-8") as kept, open(dropped_path, "w", encoding="utf-8") as dropped:
            summary = filter_stream(
                open_rows,
                cfg,
                write_kept=lambda row: kept.write(dumps_row(row)),
                write_dropped=lambda row: dropped.write(dumps_row(row)),
                scorer=scorer,
                index=index_,
                docs=docs,
                spool_dir=tmp,
            )
        files = {
            "dropped.jsonl": dropped_path,
            "summary.json": json.dumps(summary, indent=2).encode(),
            # Written once here, so rerank and evaluate know the few-shot ids without reading generated rows.
            FEWSHOT_IDS: json.dumps(sorted(fewshot, key=natural_key)).encode(),
        }
        shard.commit(kept_path, ext="jsonl", files=files, stats=summary, rows=summary["n_kept"])


def negatives_worker(shard: Shard) -> None:
    from .negatives import mine_negatives, write_triples_tsv
    from .shards import shard_range

    run, index, count = shard.run, shard.index, shard.count
    cfg = run.config.negatives
    n_kept = int((run.record("filter", 0, 1) or {}).get("rows") or 0)
    mine_range = shard_range(n_kept, index, count)
    mine = list(run.iter_rows("filter", 1, needed_by="negatives", start=mine_range.start, stop=mine_range.stop))
    docs, bm25 = prepared(run)
    triples = mine_negatives(mine, bm25, depth=cfg.depth, n_negatives=cfg.n_negatives, skip_top=cfg.skip_top, seed=cfg.seed)
    with tempfile.TemporaryDirectory(dir=scratch_root()) as tmp:
        tsv = Path(tmp) / "triples.tsv"
        write_triples_tsv(triples, docs, tsv)
        files = {f"triples-{shard_name(index, count, 'tsv')}": tsv}
        shard.commit(dumps_rows(triples), ext="jsonl", files=files, stats={"rows": len(triples)})


# Training stats that say how long an attempt took, not what it made: kept out of committed bytes.
TIMING_STATS = ("seconds", "steps_per_second")


def train_worker(shard: Shard) -> None:
    from .checkpoints import StorageCheckpointer
    from .rerank import fusion_weight_on_held_out, load_reranker
    from .train import split_held_out, train_model

    run, config = shard.run, shard.run.config
    triples = run.read_rows("negatives", shard.shards_of("negatives"))
    train_rows, held_out = split_held_out(triples, config.train.held_out_fraction)
    if not train_rows:
        raise InputError("no training triples: the filter kept no queries (see filter/summary.json)")
    docs, bm25 = prepared(run)
    # Checkpoints in the workspace (SIGTERM saves one too): a training preempted or restarted on
    # another node resumes from the newest complete one, to the same weights.
    checkpointer = StorageCheckpointer(run.storage.uri("train/_checkpoints"), scratch_root() / "checkpoints" / run.run_id)
    with tempfile.TemporaryDirectory(dir=scratch_root()) as tmp:
        model_dir = Path(tmp) / "model"

        def progress(step: int, total: int, loss: float) -> None:
            shard.progress(step, total, "steps")

        stats = train_model(train_rows, docs, config.train, model_dir, on_progress=progress, checkpointer=checkpointer)
        shard.attempt["timing"] = {k: stats.pop(k) for k in TIMING_STATS if k in stats}
        fusion = {"weight": None, "reason": "no held-out synthetic queries"}
        if held_out and config.rerank.fusion:
            # The fusion weight is chosen on held-out *synthetic* queries, never on the evaluation queries.
            reranker = load_reranker(str(model_dir), batch_size=config.rerank.batch_size, max_length=config.rerank.max_length)
            fusion = fusion_weight_on_held_out(held_out, bm25, docs, reranker, config.rerank.depth)
        stats = {**stats, "n_train_queries": len(train_rows), "n_held_out": len(held_out), "fusion": fusion}
        files: dict[str, Any] = {f"model/{p.relative_to(model_dir).as_posix()}": p for p in sorted(model_dir.rglob("*")) if p.is_file()}
        files["held_out.jsonl"] = dumps_rows(held_out)
        files["fusion.json"] = json.dumps(fusion, indent=2).encode()
        shard.commit(json.dumps(stats, indent=2, sort_keys=True).encode(), ext="json", files=files, stats={"rows": len(train_rows)})
    checkpointer.clear()


def rerank_worker(shard: Shard) -> None:
    from .rerank import first_stage, load_reranker, rerank_run
    from .runs import format_run, fuse_runs, read_run, with_tail

    run, index, count = shard.run, shard.index, shard.count
    cfg = run.config.rerank
    queries = evaluation_queries(run, _read_fewshot_ids(run))
    mine = dict(take_shard(list(queries.items()), index, count))
    docs, bm25 = prepared(run)
    if cfg.first_stage == "bm25":
        first = first_stage(bm25, mine, cfg.depth) if mine else {}
    else:
        given = read_run(fetch(cfg.first_stage))
        first = {q: given[q] for q in mine if q in given}
    fusion = json.loads(run.read_file("train", "fusion.json"))
    model = run.fetch("train", "model")
    reranker = load_reranker(str(model), batch_size=cfg.batch_size, max_length=cfg.max_length, dtype=cfg.dtype, device=cfg.device)
    reranked = rerank_run(first, mine, docs, reranker, depth=cfg.depth)
    name = shard_name(index, count, "trec")
    files = {f"firststage-{name}": format_run(first, "firststage").encode()}
    if fusion.get("weight") is not None:
        head = {q: {d: first[q][d] for d in reranked[q]} for q in reranked}
        fused = with_tail(fuse_runs(head, reranked, fusion["weight"]), first)
        files[f"fused-{name}"] = format_run(fused, "fused").encode()
    reranked = with_tail(reranked, first)
    stats = {"rows": len(mine), "queries": len(mine), "unranked": sorted(q for q in mine if not first.get(q))}
    shard.commit(format_run(reranked, "reranked").encode(), ext="trec", files=files, stats=stats)


def _read_trec_shards(run: Run, prefix: str, count: int) -> dict | None:
    """One system's run from every rerank shard (``prefix``: "" reranked, "firststage-", "fused-")."""
    from .runs import parse_trec

    out: dict[str, dict[str, float]] = {}
    for i in range(count):
        name = f"{prefix}{shard_name(i, count, 'trec')}"
        if not run.has_file("rerank", name, i, count):
            return None
        data = run.read_file("rerank", name, i, count)
        for q, ranking in parse_trec(data.decode("utf-8").splitlines(), run.storage.uri(f"rerank/{name}")).items():
            out.setdefault(q, {}).update(ranking)
    return out


def evaluate_worker(shard: Shard) -> None:
    from .evaluate import compare_to_baseline, evaluate, format_table, natural_key

    run, config = shard.run, shard.run.config
    n_rerank = shard.shards_of("rerank")
    exclude = _read_fewshot_ids(run)
    qrels = corpus_io.read_qrels(prepared_evaluation(run)[1])
    systems = {"bm25": _read_trec_shards(run, "firststage-", n_rerank), "reranked": _read_trec_shards(run, "", n_rerank)}
    fused = _read_trec_shards(run, "fused-", n_rerank)
    if fused is not None:
        systems["fused"] = fused
    # Every rerank shard is committed (the driver checked), so a judged query without a ranking is one
    # the first stage found nothing for (no query term in the corpus): it scores 0, as trec_eval -c does.
    unranked = sorted({q for i in range(n_rerank) for q in (run.record("rerank", i, n_rerank) or {})["stats"].get("unranked", [])})
    results = {
        name: evaluate(r, qrels, config.evaluate.measures, exclude_queries=exclude, allow_missing=True) for name, r in systems.items()
    }
    bootstrap = compare_to_baseline(results, baseline="bm25", measure="nDCG@10")
    out = {
        "systems": results,
        "excluded_queries": sorted(exclude & set(qrels), key=natural_key),
        "unranked_queries": unranked,
        "bootstrap": bootstrap,
    }
    table = format_table({name: r["aggregate"] for name, r in results.items()})
    if unranked:
        table += f"{len(unranked)} judged queries had no first-stage hit (no query term in the corpus) and score 0\n"
    shard.commit(
        json.dumps(out, indent=2, sort_keys=True).encode(),
        ext="json",
        files={"table.txt": table.encode()},
        stats={"rows": len(qrels), "unranked": len(unranked), "nDCG@10": {k: v["aggregate"].get("nDCG@10") for k, v in results.items()}},
    )


def publish_worker(shard: Shard) -> None:
    from .publish import publish_dataset

    run, config = shard.run, shard.run.config
    n_negatives = shard.shards_of("negatives")
    summary = json.loads(run.read_file("filter", "summary.json"))
    with tempfile.TemporaryDirectory(dir=scratch_root()) as tmp:
        triples = Path(tmp) / "triples.tsv"
        with open(triples, "wb") as f:  # the shards' TSVs end in a newline: concatenated, they are one file
            for i in range(n_negatives):
                f.write(run.read_file("negatives", f"triples-{shard_name(i, n_negatives, 'tsv')}", i, n_negatives))
        manifest = publish_dataset(
            run.iter_rows("filter", 1),
            config.publish.destination,
            dataset=config.data.name,
            manifest=run.manifest,
            filter_stats=summary,
            generated=run.iter_rows("generate", shard.shards_of("generate")),
            triples_tsv=triples,
        )
    shard.commit(json.dumps(manifest, indent=2, sort_keys=True).encode(), ext="json", stats={"rows": manifest.get("rows")})


# --------------------------------------------------------------------------- running one shard


def run_stage(run_uri: str, stage: str, shard_index: int | None = None) -> bool:
    """Run one shard of ``stage`` of the run at ``run_uri``; False if it was already committed
    (before this worker started, or by a twin while this one waited for the shard's lease)."""
    spec = get_stage(stage)
    run = Run.open(run_uri)
    if not spec.enabled(run.config):
        raise ConfigError(f"stage {stage!r} is not part of this run (publish needs publish.destination)")
    count = spec.shards(run.config)
    index = shard_index if shard_index is not None else shard_index_from_env(default=0 if count == 1 else None)
    if not 0 <= index < count:
        raise ConfigError(f"shard index {index} is not in [0, {count}) for stage {stage}")
    if run.shard_done(stage, index, count):
        log.info("%s shard %d/%d is already committed; nothing to do", stage, index, count)
        return False
    shards = stage_shards(run.config)
    for upstream in spec.inputs:
        run.require_complete(upstream, shards[upstream], needed_by=stage)
    lease = run.lease(stage, index, count).acquire(done=lambda: run.shard_done(stage, index, count))
    if lease is None:
        log.info("%s shard %d/%d was committed by another worker while this one waited", stage, index, count)
        return False
    shard = Shard(run, stage, index, count, lease)
    started, cpu0 = time.time(), time.process_time()
    shard.attempt.update(attempt=new_attempt_id(), started_at=started, host=socket.gethostname())
    outcome = "failed"
    _watch_parent()
    try:
        with lease:
            module, _, name = spec.worker.partition(":")
            getattr(importlib.import_module(module), name)(shard)
            outcome = shard.attempt.get("outcome", "committed")
    except BaseException as e:
        shard.attempt["error"] = f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        shard.attempt.update(
            outcome=outcome,
            seconds=round(time.time() - started, 3),
            cpu_seconds=round(time.process_time() - cpu0, 3),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            bytes_read=run.bytes_read,
        )
        try:
            run.record_attempt(stage, index, count, shard.attempt)
        except Exception as e:  # the attempt record is a note: never mask the real outcome
            log.warning("could not store the attempt record: %s", e)
    return outcome == "committed"


def _watch_parent() -> None:
    """Die with the launcher: a local executor sets ``INPARS_PARENT_PID``; when that process is gone
    (this worker was re-parented), stop as if preempted, so a killed launcher leaves no worker
    paying for requests that a ``resume`` would make again."""
    parent = os.environ.get("INPARS_PARENT_PID")
    if not parent or not parent.isdigit():
        return

    def watch() -> None:
        import signal

        while True:
            time.sleep(1.0)
            if os.getppid() != int(parent):
                log.error("the launcher (pid %s) is gone: stopping", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
