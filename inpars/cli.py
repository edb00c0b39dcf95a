"""``inpars``: each stage as a command over files, the workspace ``worker``, and ``report``.

A thin shell: every command parses options, calls one library function and writes its result.
Permanent errors (bad input, bad config) print one clear line and exit with ``EXIT_PERMANENT``; a
worker or a training stopped by SIGTERM after saving its progress exits with ``EXIT_TRANSIENT``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from .config import FilterConfig, GenerateConfig, TrainConfig
from .errors import InParsError, cli_errors

app = typer.Typer(
    help="InPars stages over files; `inpars worker` runs one shard of a workspace run.", no_args_is_help=True, add_completion=False
)


def fetch(uri: str):
    """A local path for a corpus or queries given as a path or a gs:// URI (downloaded into the cache)."""
    from .datasets import fetch as fetch_uri

    return fetch_uri(uri)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)


@app.command()
@cli_errors
def generate(
    corpus: str = typer.Option(..., help="BEIR folder, JSONL, TSV or CSV corpus"),
    output: Path = typer.Option(..., help="output JSONL of generated queries"),
    prompt: str = typer.Option("inpars", help="inpars | inpars-gbq | promptagator-<dataset> | a YAML template"),
    model: str = typer.Option("smollm2-135m", help="packaged alias, HF hub id or local path"),
    backend: str = typer.Option("transformers", help="transformers | openai | vllm"),
    n_docs: int | None = typer.Option(100, help="documents to sample (0: all)"),
    seed: int = 0,
    fewshot_file: str | None = typer.Option(None, help="(query, document) pairs for promptagator prompts"),
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_doc_tokens: int = 256,
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    base_url: str | None = typer.Option(None, help="OpenAI-compatible server (backend openai)"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="name of the variable holding the API key"),
    concurrency: int = 8,
):
    """Write one synthetic query per sampled document, with its token log-probs."""
    from .backends import get_backend
    from .corpus import read_corpus, write_jsonl
    from .generate import generate_queries, sample_documents
    from .prompts import load_prompt

    cfg = GenerateConfig.of(
        "inpars generate",
        backend=backend,
        model=model,
        prompt=prompt,
        fewshot_file=fewshot_file,
        n_docs=n_docs or None,
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_doc_tokens=max_doc_tokens,
        temperature=temperature,
        base_url=base_url,
        api_key_env=api_key_env,
        concurrency=concurrency,
    )
    docs = sample_documents(read_corpus(fetch(corpus)), cfg.n_docs, seed)
    prompt_ = load_prompt(prompt, fewshot_file=fewshot_file)
    be = get_backend(backend, cfg)
    try:
        rows = generate_queries(
            docs,
            be,
            prompt_,
            max_new_tokens=max_new_tokens,
            max_doc_tokens=max_doc_tokens,
            max_example_tokens=cfg.max_example_tokens,
            batch_size=batch_size,
            temperature=temperature,
            seed=seed,
        )
    finally:
        be.close()
    write_jsonl(rows, output)
    typer.echo(f"{len(rows)} queries -> {output}")


@app.command("filter")
@cli_errors
def filter_(
    input: Path = typer.Option(..., help="generated queries (JSONL: ours, the toolkit's or the v1 release's)"),
    output: Path = typer.Option(..., help="kept queries (JSONL)"),
    dropped: Path | None = typer.Option(None, help="dropped queries with their reason (JSONL)"),
    strategy: str = typer.Option("scores", help="scores | reranker | consistency"),
    aggregate: str = typer.Option("mean", help="mean | sum of token log-probs"),
    keep_top_k: int | None = None,
    keep_fraction: float | None = 0.7,
    min_query_tokens: int = 3,
    max_query_tokens: int = 64,
    reranker_model: str | None = typer.Option(None, help="for --strategy reranker"),
    corpus: str | None = typer.Option(None, help="for --strategy consistency"),
    consistency_top_k: int = 10,
):
    """Keep the best synthetic queries; write the rest with the reason they were dropped."""
    from .corpus import read_corpus, write_jsonl
    from .filter import drop_counts, filter_queries, load_scorer
    from .queryfiles import read_query_rows

    cfg = FilterConfig.of(
        "inpars filter",
        strategy=strategy,
        aggregate=aggregate,
        keep_top_k=keep_top_k,
        keep_fraction=None if keep_top_k else keep_fraction,
        min_query_tokens=min_query_tokens,
        max_query_tokens=max_query_tokens,
        reranker_model=reranker_model,
        consistency_top_k=consistency_top_k,
    )
    scorer, index, docs = load_scorer(cfg), None, None
    if strategy == "consistency":
        from .bm25 import build_index

        if not corpus:
            raise InParsError("--strategy consistency needs --corpus")
        docs = read_corpus(fetch(corpus))
        index = build_index(docs)
    kept, drop = filter_queries(read_query_rows(input), cfg, scorer=scorer, index=index, docs=docs)
    write_jsonl(kept, output)
    if dropped:
        write_jsonl(drop, dropped)
    typer.echo(f"kept {len(kept)}, dropped {len(drop)} {dict(drop_counts(drop))} -> {output}")


@app.command()
@cli_errors
def negatives(
    input: Path = typer.Option(..., help="filtered queries (JSONL: ours, the toolkit's or the v1 release's)"),
    corpus: str = typer.Option(...),
    output: Path = typer.Option(..., help="triples with ids (JSONL)"),
    tsv: Path | None = typer.Option(None, help="also write query<TAB>positive<TAB>negative texts"),
    depth: int = 100,
    n_negatives: int = 3,
    skip_top: int = 0,
    seed: int = 0,
):
    """Mine BM25 hard negatives for every synthetic query."""
    from .bm25 import build_index
    from .corpus import read_corpus, write_jsonl
    from .negatives import mine_negatives, write_triples_tsv
    from .queryfiles import read_query_rows

    rows = read_query_rows(input)
    docs = read_corpus(fetch(corpus))
    index = build_index(docs)
    triples = mine_negatives(rows, index, depth=depth, n_negatives=n_negatives, skip_top=skip_top, seed=seed)
    write_jsonl(triples, output)
    if tsv:
        write_triples_tsv(triples, docs, tsv)
    typer.echo(f"{len(triples)} queries with negatives -> {output}")


@app.command()
@cli_errors
def train(
    triples: Path = typer.Option(..., help="triples JSONL from `inpars negatives`"),
    corpus: str = typer.Option(...),
    output_dir: Path = typer.Option(...),
    model_type: str = typer.Option("auto", help="auto (what --model already is) | cross-encoder | monot5 | bi-encoder"),
    model: str = typer.Option("minilm-l6", help="packaged alias, HF hub id (e.g. castorini/monot5-base-msmarco-10k) or local path"),
    loss: str = typer.Option("lce", help="lce (group softmax) | bce (pointwise)"),
    learning_rate: float | None = typer.Option(None, help="default 3e-4 for T5, 3e-5 otherwise"),
    batch_size: int = 8,
    epochs: float = 1.0,
    max_steps: int | None = None,
    max_length: int = 256,
    seed: int = 0,
    relevance_tokens: str = typer.Option("true,false", help="monoT5 target tokens; FLAN style: yes,no"),
    checkpoint_dir: Path | None = typer.Option(None, help="save training checkpoints here and resume from the newest one"),
    checkpoint_every: int = typer.Option(50, help="steps between checkpoints (a SIGTERM also saves one)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | tpu"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
):
    """Fine-tune a reranker (or a bi-encoder) on the triples; save a standard HF model folder.

    With --checkpoint-dir, a SIGTERM saves a checkpoint and exits with code 75; running the same
    command again resumes, and ends with the same weights as an uninterrupted run."""
    from . import preemption
    from .checkpoints import LocalCheckpointer
    from .corpus import read_corpus, read_jsonl
    from .train import train_model

    pos, _, neg = relevance_tokens.partition(",")
    cfg = TrainConfig.of(
        "inpars train",
        model_type=model_type,
        model=model,
        loss=loss,
        learning_rate=learning_rate,
        batch_size=batch_size,
        epochs=epochs,
        max_steps=max_steps,
        max_length=max_length,
        seed=seed,
        relevance_tokens=(pos, neg),
        checkpoint_every=checkpoint_every,
        device=device,
        dtype=dtype,
    )
    checkpointer = None
    if checkpoint_dir is not None:
        _setup_logging()
        preemption.install()
        checkpointer = LocalCheckpointer(checkpoint_dir)
    stats = train_model(read_jsonl(triples), read_corpus(fetch(corpus)), cfg, output_dir, checkpointer=checkpointer)
    typer.echo(json.dumps(stats, indent=2, default=str))


@app.command()
@cli_errors
def rerank(
    model: str = typer.Option(..., help="a trained model folder or an HF id"),
    corpus: str = typer.Option(...),
    queries: str = typer.Option(..., help="queries JSONL/TSV or a BEIR folder"),
    output: Path = typer.Option(..., help="TREC run to write"),
    run: Path | None = typer.Option(None, help="first-stage TREC run (default: BM25 over the corpus)"),
    qrels: Path | None = typer.Option(None, help="only rerank the queries judged here"),
    depth: int = 100,
    batch_size: int = 32,
    max_length: int = 256,
):
    """Rerank the top `depth` documents of a first stage with a trained model."""
    from .corpus import read_corpus, read_qrels, read_queries
    from .rerank import first_stage, load_reranker, rerank_run
    from .runs import read_run, with_tail, write_run

    docs = read_corpus(fetch(corpus))
    qs = read_queries(fetch(queries))
    if qrels:
        judged = read_qrels(qrels)
        qs = {q: t for q, t in qs.items() if q in judged}
    if run:
        first = read_run(run)
    else:
        from .bm25 import build_index

        first = first_stage(build_index(docs), qs, depth)
    reranked = rerank_run(first, qs, docs, load_reranker(model, batch_size=batch_size, max_length=max_length), depth=depth)
    reranked = with_tail(reranked, first)
    write_run(reranked, output, tag="reranked")
    typer.echo(f"{len(reranked)} queries reranked -> {output}")


@app.command()
@cli_errors
def evaluate(
    run: list[Path] = typer.Option(..., help="TREC run(s); repeat to compare"),
    qrels: Path = typer.Option(...),
    measures: str = typer.Option(
        "nDCG@10,RR@10,R@100,R@1000,AP,P@10,Judged@10", help="ir-measures names; RR (no cut-off) is trec_eval's recip_rank, RR@10 is not"
    ),
    exclude_fewshot: Path | None = typer.Option(None, help="generated queries JSONL: drop its few-shot example queries from the qrels"),
    json_out: Path | None = typer.Option(None, "--json", help="write all results as JSON"),
):
    """Evaluate runs with ir-measures; print a table."""
    from .corpus import read_qrels
    from .evaluate import evaluate as evaluate_
    from .evaluate import format_table
    from .generate import fewshot_query_ids
    from .queryfiles import iter_query_rows
    from .runs import read_run

    exclude = fewshot_query_ids(iter_query_rows(exclude_fewshot)) if exclude_fewshot else set()
    qrels_ = read_qrels(qrels)
    results = {p.stem: evaluate_(read_run(p), qrels_, measures.split(","), exclude_queries=exclude) for p in run}
    typer.echo(format_table({name: r["aggregate"] for name, r in results.items()}))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


@app.command()
@cli_errors
def publish(
    input: Path = typer.Option(..., help="filtered queries (JSONL: ours, the toolkit's or the v1 release's)"),
    destination: str = typer.Option(..., help="local folder or gs://bucket/prefix"),
    dataset: str = typer.Option(...),
    generated: Path | None = typer.Option(None, help="every generated query (JSONL), published as <dataset>/queries.jsonl"),
    triples: Path | None = typer.Option(
        None, help="triples TSV from `inpars negatives --tsv`, published as <dataset>/triples_train_v2.tsv"
    ),
):
    """Publish a dataset (queries in the InPars-v2 layout, triples, manifest, card), idempotently."""
    from .publish import publish_dataset
    from .queryfiles import iter_query_rows

    manifest = publish_dataset(
        iter_query_rows(input),
        destination,
        dataset=dataset,
        manifest={},
        generated=iter_query_rows(generated) if generated else None,
        triples_tsv=triples,
    )
    typer.echo(json.dumps(manifest, indent=2, default=str))


@app.command()
@cli_errors
def worker(
    stage: str = typer.Argument(..., help="generate | filter | negatives | train | rerank | evaluate | publish"),
    run: str = typer.Option(..., help="the run's URI: <workspace>/runs/<run-id> (local or gs://)"),
    shard_index: int | None = typer.Option(None, help="default: $JOB_COMPLETION_INDEX"),
):
    """Run one shard of a stage of a workspace run (what the executors and pods run)."""
    from . import preemption
    from .workers import run_stage

    _setup_logging()
    preemption.install()
    done = run_stage(run, stage, shard_index)
    typer.echo(f"{stage}: {'committed' if done else 'already committed'}", err=True)


@app.command()
@cli_errors
def report(
    run: str = typer.Argument(..., help="the run's URI"),
    out_dir: Path | None = typer.Option(None, help="default: <run>/report"),
):
    """Write a self-contained HTML report of a run (scores, lengths, samples, per-query nDCG)."""
    from .report import write_report

    typer.echo(str(write_report(run, out_dir)))


if __name__ == "__main__":
    app()
