"""Preparing a corpus once: store + BM25 index, their statistics and files, reopened by a worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inpars.bm25 import build_index
from inpars.corpus import read_corpus, read_queries
from inpars.errors import InputError
from inpars.prepare import open_prepared, prepare_corpus, prepared_files

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


def test_prepare_then_open_gives_todays_corpus_and_rankings(tmp_path):
    stats = prepare_corpus(SAMPLE, tmp_path / "prepared")
    docs = read_corpus(SAMPLE)
    assert stats["store"]["documents"] == len(docs) and len(stats["store"]["source_sha256"]) == 64
    assert stats["index"]["backend"] == "bm25s" and stats["index"]["stats"]["documents"] == len(docs)
    files = prepared_files(tmp_path / "prepared")
    assert files[-1].name == "inpars_index.json" and all(p.is_file() for p in files)
    assert sum(p.stat().st_size for p in files if p.parent.name == "bm25") == stats["index"]["bytes"]
    store, index = open_prepared(tmp_path / "prepared", verify=True)
    assert dict(store) == docs
    queries = read_queries(SAMPLE)
    assert index.search(queries, 100) == build_index(docs).search(queries, 100)


def test_a_bad_corpus_line_stops_prepare_before_any_index_work(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "text": "fine"}) + "\n" + "{not json\n")
    with pytest.raises(InputError, match=rf"{corpus}:2: malformed JSON"):
        prepare_corpus(corpus, tmp_path / "prepared")
    assert not (tmp_path / "prepared" / "bm25").exists()


# --------------------------------------------------------------------------- the prepare stage in a run


def small_corpus(path: Path, n: int, extra: str = "") -> Path:
    """The first ``n`` sample documents as a corpus file (``extra``: one more line, to change it)."""
    lines = (SAMPLE / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    path.write_text("".join(lines) + extra, encoding="utf-8")
    return path


def prepared_run(tmp_path: Path, corpus: Path, run_id: str = "r"):
    from inpars.config import PipelineConfig
    from inpars.workers import run_stage
    from inpars.workspace import Run

    config = PipelineConfig().override({"data.corpus": str(corpus), "data.name": "mini"})
    run = Run.create(str(tmp_path / "ws"), config, run_id)
    assert run_stage(run.uri, "prepare", 0) is True
    return Run.open(run.uri)


def test_the_prepare_stage_pins_the_corpus_and_commits_store_index_and_statistics(tmp_path):
    from inpars.files import file_sha256
    from inpars.workers import prepared

    corpus = small_corpus(tmp_path / "corpus.jsonl", 40)
    run = prepared_run(tmp_path, corpus)
    pin = run.manifest["corpus"]
    assert pin == {"source": str(corpus), "sha256": file_sha256(corpus), "bytes": corpus.stat().st_size, "documents": 40}
    stats = run.record("prepare", 0, 1)["stats"]
    assert stats["store"]["documents"] == 40 and stats["store"]["source"] == str(corpus)
    assert stats["store"]["columns"]["text"]["tokens"] > 0  # token counts, for sizing and the report
    store, index = prepared(run)
    assert dict(store) == read_corpus(corpus)
    queries = {"q": "cancer stem cells", "r": "vitamin D deficiency"}
    assert index.search(queries, 10) == build_index(read_corpus(corpus)).search(queries, 10)


def test_a_changed_corpus_stops_a_redone_prepare_and_a_resume(tmp_path):
    from inpars.launch.driver import drive
    from inpars.launch.local import LocalExecutor
    from inpars.workers import run_stage

    corpus = small_corpus(tmp_path / "corpus.jsonl", 40)
    run = prepared_run(tmp_path, corpus)
    small_corpus(corpus, 40, extra=json.dumps({"_id": "new", "text": "a document added after the run started"}) + "\n")
    # A resume stops before anything is submitted, naming both corpora.
    with pytest.raises(InputError, match=r"the corpus changed: this run was prepared from .*corpus\.jsonl with sha256 .* \(40 documents\)"):
        drive(run, LocalExecutor(max_parallel=1))
    # A prepare redone after its output was set aside (verify --repair) refuses the other corpus too,
    # so no shard of this run ever reads documents of two corpora.
    run.invalidate("prepare", 0, 1, "test: set aside")
    with pytest.raises(InputError, match="the corpus changed"):
        run_stage(run.uri, "prepare", 0)
    assert not run.shard_done("prepare", 0, 1)
    # Restoring the corpus lets the run go on.
    small_corpus(corpus, 40)
    assert run_stage(run.uri, "prepare", 0) is True


def test_prepare_of_a_corpus_with_bad_lines_names_each_and_commits_nothing(tmp_path):
    from inpars.config import PipelineConfig
    from inpars.workers import run_stage
    from inpars.workspace import Run

    corpus = small_corpus(tmp_path / "corpus.jsonl", 5, extra='{"_id": "x", "text": ""}\n')
    run = Run.create(str(tmp_path / "ws"), PipelineConfig().override({"data.corpus": str(corpus), "data.name": "mini"}), "bad")
    with pytest.raises(InputError, match=rf"{corpus}:6: document x has empty text"):
        run_stage(run.uri, "prepare", 0)
    assert not run.shard_done("prepare", 0, 1) and run.corpus_pin() is None


def test_filter_and_negatives_workers_on_the_prepared_store_give_the_same_triples_for_1_and_3_shards(tmp_path):
    """The workers' own data path, fast: streamed filter output (one row a line, best first, few-shot ids
    written once) and negatives shards that each read only their slice of the kept rows."""
    from inpars.config import PipelineConfig
    from inpars.corpus import iter_corpus
    from inpars.workers import FEWSHOT_IDS, run_stage
    from inpars.workspace import Run, dumps_rows

    rows = []
    for i, doc in enumerate(list(iter_corpus(SAMPLE))[:20]):
        words = (doc.title or doc.text).split()[:6]
        rows.append(
            {
                "query": " ".join(reversed(words)),
                "doc_id": doc.doc_id,
                "doc_text": doc.contents,
                "log_probs": [-0.01 * ((7 * i) % 13 + 1)] * len(words),
                "prompt_text": "",
                "model": "fake",
                "prompt": "inpars",
                "fewshot_examples": [{"query_id": "q-shown", "query": "shown", "doc_id": "d"}],
                "seed": 0,
                "query_id": f"{doc.doc_id}-0",
            }
        )
    triples = {}
    for shards in (1, 3):
        config = PipelineConfig().override({"filter.keep_fraction": 0.5, "filter.min_query_tokens": 2, "negatives.shards": shards})
        run = Run.create(str(tmp_path / "ws"), config, f"n{shards}")
        assert run_stage(run.uri, "prepare", 0) is True
        run.commit_shard("generate", 0, 1, dumps_rows(rows), stats={"rows": len(rows)})
        assert run_stage(run.uri, "filter", 0) is True
        kept_file = (Path(run.uri) / "filter" / "shard-00000-of-00001.jsonl").read_text(encoding="utf-8")
        assert kept_file.endswith("\n") and "\n\n" not in kept_file  # one row a line
        kept = [json.loads(line) for line in kept_file.splitlines()]
        assert len(kept) == 10 and [r["score"] for r in kept] == sorted((r["score"] for r in kept), reverse=True)
        assert json.loads(run.read_file("filter", FEWSHOT_IDS)) == ["q-shown"]
        for i in range(shards):
            assert run_stage(run.uri, "negatives", i) is True
        triples[shards] = run.read_rows("negatives", shards)
        assert [t["query_id"] for t in triples[shards]] == [r["query_id"] for r in kept]
    assert triples[1] == triples[3]
