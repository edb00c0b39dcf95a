"""Benchmark: BM25 mining of 10k queries against SciFact with top-1000 hits (bm25s backend).

The 10k queries are SciFact's 1,109 queries, then the corpus titles, then queries with one word
dropped (a cheap perturbation) until the count is reached. Prints index seconds, retrieval seconds
and queries/s, and writes them as JSON.

    python benchmarks/bm25_mining.py [--n-queries 10000] [--k 1000] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import SCIFACT, machine, scifact_missing, write_results  # this folder (see common.py)

REPO = Path(__file__).resolve().parents[1]


def make_queries(queries: dict[str, str], titles: list[str], n: int) -> dict[str, str]:
    pool = list(queries.values()) + [t for t in titles if t]
    out = pool[:n]
    i = 0
    while len(out) < n:  # perturbed copies: drop word (i mod length) of query i
        words = pool[i % len(pool)].split()
        out.append(" ".join(words[: i % len(words)] + words[i % len(words) + 1 :]) or words[0])
        i += 1
    return {f"b{j}": q for j, q in enumerate(out)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SCIFACT), help="SciFact BEIR folder")
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="retrieval threads (default: all cores)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bm25_mining.json"))
    args = parser.parse_args()

    data = Path(args.data)
    if scifact_missing(data):
        return 0

    from inpars.bm25 import BM25sIndex
    from inpars.corpus import read_corpus, read_queries

    docs = read_corpus(data)
    queries = make_queries(read_queries(data), [d.title for d in docs.values()], args.n_queries)

    t0 = time.perf_counter()
    index = BM25sIndex(n_threads=args.threads).build(list(docs.values()))
    index_s = time.perf_counter() - t0

    texts = list(queries.values())
    t0 = time.perf_counter()
    index.retrieve(texts, args.k)  # arrays only: tokenize + score + top-k
    retrieve_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    run = index.search(queries, args.k)  # the public API: a {query_id: {doc_id: score}} run
    search_s = time.perf_counter() - t0
    hits = sum(len(r) for r in run.values())

    result = {
        "backend": "bm25s",
        "corpus_docs": len(docs),
        "n_queries": len(queries),
        "k": args.k,
        "threads": index.n_threads,
        "index_seconds": round(index_s, 3),
        "retrieve_seconds": round(retrieve_s, 3),
        "retrieve_queries_per_second": round(len(queries) / retrieve_s, 1),
        "search_seconds": round(search_s, 3),
        "search_queries_per_second": round(len(queries) / search_s, 1),
        "run_hits": hits,
        "machine": machine(),
    }
    print(f"index: {index_s:.2f} s for {len(docs)} docs")
    print(f"retrieve (arrays): {retrieve_s:.2f} s, {len(queries) / retrieve_s:.0f} queries/s (top-{args.k}, {index.n_threads} threads)")
    print(f"search (run dict): {search_s:.2f} s, {len(queries) / search_s:.0f} queries/s, {hits} hits")
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
