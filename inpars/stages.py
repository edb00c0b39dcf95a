"""The stage workers: find the shard, run the library function on it, commit through the workspace.

``inpars worker <stage> --run RUN_URI`` calls :func:`run_stage`; the local executor and the
Kubernetes pods run exactly that. A worker reads its inputs from the workspace only (so a later stage
can run on another machine), refuses to start while an input shard is missing, and commits its
output create-only-if-absent, so a rerun or a racing twin changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import corpus as corpus_io
from .config import PipelineConfig
from .datasets import Dataset, fetch, resolve_dataset
from .errors import ConfigError, InputError
from .launch.plan import stage_shards
from .shards import shard_index_from_env, shard_name, take_shard
from .workspace import Run, dumps_rows

log = logging.getLogger("inpars.stages")

FIRST_STAGE_DEPTH = 1000  # first-stage hits kept per evaluation query (the top rerank.depth are rescored)


def fewshot_query_ids(rows) -> set[str]:
    """Ids of the queries shown as few-shot examples: never evaluated (no leakage)."""
    return {str(ex["query_id"]) for r in rows for ex in r.get("fewshot_examples") or [] if ex.get("query_id") is not None}


def evaluation_queries(config: PipelineConfig, ds: Dataset, exclude: set[str]) -> dict[str, str]:
    """The judged evaluation queries, in id order, minus excluded (few-shot) ids."""
    if ds.queries is None or ds.qrels is None:
        raise ConfigError("rerank/evaluate need evaluation queries and qrels: set data.queries and data.qrels")
    queries = corpus_io.read_queries(ds.queries)
    qrels = corpus_io.read_qrels(ds.qrels)
    corpus_io.check_ids(qrels, queries, what="qrels query", source=str(ds.queries))
    return {q: queries[q] for q in sorted(qrels, key=_natural) if q not in exclude}


def _natural(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def _bm25(config: PipelineConfig, docs):
    from .bm25 import build_index

    return build_index(docs, config.negatives.retriever)


# --------------------------------------------------------------------------- workers


def generate_worker(run: Run, index: int, count: int) -> None:
    from .backends import get_backend
    from .generate import generate_queries, sample_documents
    from .prompts import load_prompt
    from .usage import BudgetExceeded
    from .workspace import checkpointed_map

    cfg = run.config.generate
    ds = resolve_dataset(run.config)
    docs = corpus_io.read_corpus(ds.corpus)
    mine = take_shard(sample_documents(docs, cfg.n_docs, cfg.seed), index, count)
    prompt = load_prompt(_prompt_name(run.config), fewshot_file=str(ds.fewshot) if ds.fewshot else None)
    backend = get_backend(cfg.backend, cfg)
    journal = None
    if hasattr(backend, "use_journal"):
        # Paid API answers are journaled as they arrive, so a crash mid-chunk re-requests nothing.
        # (On a gs:// workspace the journal is local to the machine: a pod on another node starts afresh.)
        journal = run.local_dir("generate", "_journal") / f"{shard_name(index, count, 'jsonl')}"
        backend.use_journal(journal)
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

        checkpoint = run.checkpoint("generate", index, count)
        try:
            rows = checkpointed_map(mine, generate_chunk, checkpoint, cfg.checkpoint_every, on_progress=_progress("generate", len(mine)))
        except BudgetExceeded:
            # A clean stop: every finished chunk is checkpointed; only the unfinished chunk's
            # requests (at most generate.checkpoint_every documents) are made again on resume.
            done = sum(len(c) for c in checkpoint.load())
            raise BudgetExceeded(
                f"generate shard {index}/{count}: the budget of ${cfg.budget_usd} was reached after {done} of {len(mine)} "
                f"documents (checkpointed); raise generate.budget_usd and run `inpars-launch resume`"
            ) from None
    finally:
        backend.close()
    usage = {
        "prompt_tokens": sum(r.get("usage", {}).get("prompt_tokens", 0) for r in rows),
        "completion_tokens": sum(r.get("usage", {}).get("completion_tokens", 0) for r in rows),
    }
    stats = {"rows": len(rows), "usage": usage}
    backend_usage = getattr(backend, "usage_summary", None)
    if callable(backend_usage):
        stats["api"] = backend_usage()
    run.commit_shard("generate", index, count, dumps_rows(rows), ext="jsonl", stats=stats)
    checkpoint.clear()
    if journal is not None:
        journal.unlink(missing_ok=True)


def _prompt_name(config: PipelineConfig) -> str:
    # `promptagator` alone means the dataset's own template (promptagator-<dataset>).
    name = config.generate.prompt
    return f"promptagator-{config.data.name}" if name == "promptagator" else name


def filter_worker(run: Run, index: int, count: int) -> None:
    from .filter import drop_counts, filter_queries

    cfg = run.config.filter
    rows = run.read_rows("generate", stage_shards(run.config)["generate"])
    scorer = index_ = docs = None
    if cfg.strategy == "reranker":
        from .rerank import load_reranker

        if not cfg.reranker_model:
            raise ConfigError("filter.strategy=reranker needs filter.reranker_model")
        scorer = load_reranker(cfg.reranker_model)
    elif cfg.strategy == "consistency":
        docs = corpus_io.read_corpus(resolve_dataset(run.config).corpus)
        index_ = _bm25(run.config, docs)
    kept, dropped = filter_queries(rows, cfg, scorer=scorer, index=index_, docs=docs)
    summary = {
        "strategy": cfg.strategy,
        "aggregate": cfg.aggregate,
        "n_in": len(rows),
        "n_kept": len(kept),
        "dropped_by_reason": drop_counts(dropped),
        "threshold": min((r["score"] for r in kept), default=None),
    }
    run.put_file("filter", "dropped.jsonl", dumps_rows(dropped))
    run.put_file("filter", "summary.json", json.dumps(summary, indent=2).encode())
    run.commit_shard("filter", 0, 1, dumps_rows(kept), ext="jsonl", stats=summary)


def negatives_worker(run: Run, index: int, count: int) -> None:
    from .negatives import mine_negatives, write_triples_tsv

    cfg = run.config.negatives
    kept = run.read_rows("filter", 1)
    mine = take_shard(kept, index, count)
    docs = corpus_io.read_corpus(resolve_dataset(run.config).corpus)
    triples = mine_negatives(
        mine, _bm25(run.config, docs), depth=cfg.depth, n_negatives=cfg.n_negatives, skip_top=cfg.skip_top, seed=cfg.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "triples.tsv"
        write_triples_tsv(triples, docs, tsv)
        run.put_file("negatives", f"triples-{shard_name(index, count, 'tsv')}", tsv.read_bytes())
    run.commit_shard("negatives", index, count, dumps_rows(triples), ext="jsonl", stats={"rows": len(triples)})


def split_held_out(triples: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Keep a stable hash-chosen share of synthetic queries aside (fusion weight, validation)."""
    if fraction <= 0:
        return list(triples), []
    train, held = [], []
    for t in triples:
        h = int(hashlib.sha1(str(t["query_id"]).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < fraction else train).append(t)
    return train, held


def train_worker(run: Run, index: int, count: int) -> None:
    from .rerank import choose_fusion_weight, load_reranker, rerank_run
    from .train import train_model

    config = run.config
    triples = run.read_rows("negatives", stage_shards(config)["negatives"])
    train_rows, held_out = split_held_out(triples, config.train.held_out_fraction)
    if not train_rows:
        raise InputError("no training triples: the filter kept no queries (see filter/summary.json)")
    docs = corpus_io.read_corpus(resolve_dataset(config).corpus)
    from .checkpoints import LocalCheckpointer

    # Resumable training (SIGTERM saves too). A local folder: inside the run on a local workspace;
    # on gs:// it must become workspace-backed (create-only objects) to survive a pod on another node.
    checkpointer = LocalCheckpointer(run.local_dir("train", "_checkpoints"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        stats = train_model(train_rows, docs, config.train, model_dir, on_progress=_progress("train", None), checkpointer=checkpointer)
        fusion = {"weight": None, "reason": "no held-out synthetic queries"}
        if held_out and config.rerank.fusion:
            # The fusion weight is chosen on held-out *synthetic* queries (their source document is
            # the relevant one), never on the evaluation queries.
            queries = {t["query_id"]: t["query"] for t in held_out}
            qrels = {t["query_id"]: {t["pos_doc_id"]: 1} for t in held_out}
            first = _bm25(config, docs).search(queries, config.rerank.depth)
            reranker = load_reranker(str(model_dir), batch_size=config.rerank.batch_size, max_length=config.rerank.max_length)
            second = rerank_run(first, queries, docs, reranker, depth=config.rerank.depth)
            weight, scores = choose_fusion_weight(first, second, qrels)
            fusion = {"weight": weight, "measure": "RR@10", "n_queries": len(queries), "grid": scores}
        run.upload_dir("train", "model", model_dir)
    run.put_file("train", "held_out.jsonl", dumps_rows(held_out))
    run.put_file("train", "fusion.json", json.dumps(fusion, indent=2).encode())
    stats = {**stats, "n_train_queries": len(train_rows), "n_held_out": len(held_out), "fusion": fusion}
    run.commit_shard("train", 0, 1, json.dumps(stats, indent=2, sort_keys=True).encode(), ext="json", stats={"rows": len(train_rows)})
    checkpointer.clear()


def rerank_worker(run: Run, index: int, count: int) -> None:
    from .rerank import fuse_runs, load_reranker, rerank_run, with_tail

    config, cfg = run.config, run.config.rerank
    run.require_complete("train", 1)
    ds = resolve_dataset(config)
    generated = run.read_rows("generate", stage_shards(config)["generate"])
    queries = evaluation_queries(config, ds, fewshot_query_ids(generated) if config.evaluate.exclude_fewshot else set())
    mine = dict(take_shard(list(queries.items()), index, count))
    docs = corpus_io.read_corpus(ds.corpus)
    if cfg.first_stage == "bm25":
        # Retrieve deeper than we rerank, so recall measures (R@100, R@1000) stay meaningful.
        first = _bm25(config, docs).search(mine, max(cfg.depth, FIRST_STAGE_DEPTH)) if mine else {}
    else:
        given = corpus_io.read_run(fetch(cfg.first_stage))
        first = {q: given[q] for q in mine if q in given}
    fusion = json.loads(run.get_file("train", "fusion.json"))
    with tempfile.TemporaryDirectory() as tmp:
        run.download_dir("train", "model", Path(tmp) / "model")
        reranker = load_reranker(
            str(Path(tmp) / "model"), batch_size=cfg.batch_size, max_length=cfg.max_length, dtype=cfg.dtype, device=cfg.device
        )
        reranked = rerank_run(first, mine, docs, reranker, depth=cfg.depth)
    name = shard_name(index, count, "trec")
    run.put_file("rerank", f"firststage-{name}", corpus_io.format_run(first, "firststage").encode())
    if fusion.get("weight") is not None:
        head = {q: {d: first[q][d] for d in reranked[q]} for q in reranked}
        fused = with_tail(fuse_runs(head, reranked, fusion["weight"]), first)
        run.put_file("rerank", f"fused-{name}", corpus_io.format_run(fused, "fused").encode())
    reranked = with_tail(reranked, first)
    run.commit_shard("rerank", index, count, corpus_io.format_run(reranked, "reranked").encode(), ext="trec", stats={"rows": len(mine)})


def _read_trec_shards(run: Run, stage: str, prefix: str, count: int) -> dict | None:
    run_: dict[str, dict[str, float]] = {}
    for i in range(count):
        name = f"{prefix}{shard_name(i, count, 'trec')}"
        if prefix and not run.has_file(stage, name):
            return None
        data = run.get_file(stage, name) if prefix else run.read_shard(stage, i, count, "trec")
        for line in data.decode().splitlines():
            q, _, d, _, s, _ = line.split()
            run_.setdefault(q, {})[d] = float(s)
    return run_


def evaluate_worker(run: Run, index: int, count: int) -> None:
    from .evaluate import evaluate, format_table, paired_bootstrap

    config = run.config
    n_rerank = stage_shards(config)["rerank"]
    run.require_complete("rerank", n_rerank)
    ds = resolve_dataset(config)
    generated = run.read_rows("generate", stage_shards(config)["generate"])
    exclude = fewshot_query_ids(generated) if config.evaluate.exclude_fewshot else set()
    qrels = corpus_io.read_qrels(ds.qrels)
    systems = {
        "bm25": _read_trec_shards(run, "rerank", "firststage-", n_rerank),
        "reranked": _read_trec_shards(run, "rerank", "", n_rerank),
    }
    fused = _read_trec_shards(run, "rerank", "fused-", n_rerank)
    if fused is not None:
        systems["fused"] = fused
    results = {name: evaluate(r, qrels, config.evaluate.measures, exclude_queries=exclude) for name, r in systems.items()}
    bootstrap = {
        name: paired_bootstrap(results["bm25"]["per_query"]["nDCG@10"], results[name]["per_query"]["nDCG@10"])
        for name in results
        if name != "bm25" and "nDCG@10" in results[name]["per_query"]
    }
    out = {"systems": results, "excluded_queries": sorted(exclude & set(qrels), key=_natural), "bootstrap": bootstrap}
    table = format_table({name: r["aggregate"] for name, r in results.items()})
    run.put_file("evaluate", "table.txt", table.encode())
    run.commit_shard(
        "evaluate",
        0,
        1,
        json.dumps(out, indent=2, sort_keys=True).encode(),
        ext="json",
        stats={"rows": len(qrels), "nDCG@10": {k: v["aggregate"].get("nDCG@10") for k, v in results.items()}},
    )


def publish_worker(run: Run, index: int, count: int) -> None:
    from .publish import publish_dataset

    config = run.config
    kept = run.read_rows("filter", 1)
    summary = json.loads(run.get_file("filter", "summary.json")) if run.has_file("filter", "summary.json") else {}
    manifest = publish_dataset(kept, config.publish.destination, dataset=config.data.name, manifest=run.manifest, filter_stats=summary)
    run.commit_shard("publish", 0, 1, json.dumps(manifest, indent=2, sort_keys=True).encode(), ext="json", stats={"rows": len(kept)})


WORKERS: dict[str, Callable[[Run, int, int], None]] = {
    "generate": generate_worker,
    "filter": filter_worker,
    "negatives": negatives_worker,
    "train": train_worker,
    "rerank": rerank_worker,
    "evaluate": evaluate_worker,
    "publish": publish_worker,
}

# What a stage reads: it refuses to start while any shard of these is missing.
INPUTS = {
    "generate": (),
    "filter": ("generate",),
    "negatives": ("filter",),
    "train": ("negatives",),
    "rerank": ("train", "generate"),
    "evaluate": ("rerank",),
    "publish": ("filter",),
}


def run_stage(run_uri: str, stage: str, shard_index: int | None = None) -> bool:
    """Run one shard of ``stage`` of the run at ``run_uri``; False if it was already committed."""
    if stage not in WORKERS:
        raise ConfigError(f"unknown stage {stage!r}; stages: {list(WORKERS)}")
    run = Run.open(run_uri)
    shards = stage_shards(run.config)
    if stage not in shards:
        raise ConfigError(f"stage {stage!r} is not part of this run (publish needs publish.destination)")
    count = shards[stage]
    index = shard_index if shard_index is not None else shard_index_from_env(default=0 if count == 1 else None)
    if not 0 <= index < count:
        raise ConfigError(f"shard index {index} is not in [0, {count}) for stage {stage}")
    if run.shard_done(stage, index, count):
        log.info("%s shard %d/%d is already committed; nothing to do", stage, index, count)
        return False
    for upstream in INPUTS[stage]:
        run.require_complete(upstream, shards[upstream])
    WORKERS[stage](run, index, count)
    return True


def _progress(stage: str, total: int | None):
    """A tqdm bar on stderr (the executor keeps it in the shard's log)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=stage, unit="row" if total else "step", mininterval=2.0)

    def update(done, *args):
        bar.n = done
        bar.refresh()

    return update
