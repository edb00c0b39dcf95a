"""Rebuild the embedded SciFact sample from a BEIR copy of SciFact (run from the repo root).

    python -m inpars.data.build_scifact_sample ../shared/data/scifact

Takes 60 seeded test queries with every document they judge, fills the corpus to 600 documents
with seeded random ones, and keeps 40 train (claim, document) pairs as few-shot examples for the
``promptagator-scifact`` prompt. Deterministic: the same source gives the same files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from inpars.corpus import read_qrels, read_queries

N_TEST_QUERIES, N_DOCS, N_FEWSHOT, SEED = 60, 600, 40, 13


def main(source: str, dest: str = str(Path(__file__).parent / "scifact-sample")) -> None:
    src, out = Path(source), Path(dest)
    rng = random.Random(SEED)
    raw = {}
    with open(src / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            raw[obj["_id"]] = {"_id": obj["_id"], "title": obj["title"], "text": obj["text"]}
    queries = read_queries(src / "queries.jsonl")
    test, train = read_qrels(src / "qrels" / "test.tsv"), read_qrels(src / "qrels" / "train.tsv")

    test_ids = rng.sample(sorted(test, key=int), N_TEST_QUERIES)
    doc_ids = {d for q in test_ids for d in test[q]}
    pool = sorted(set(raw) - doc_ids)
    doc_ids |= set(rng.sample(pool, N_DOCS - len(doc_ids)))
    order = [d for d in raw if d in doc_ids]  # keep the source's order

    out.joinpath("qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in order:
            f.write(json.dumps(raw[d], ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in sorted(test_ids, key=int):
            f.write(json.dumps({"_id": q, "text": queries[q]}, ensure_ascii=False) + "\n")
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in sorted(test_ids, key=int):
            for d, rel in sorted(test[q].items()):
                f.write(f"{q}\t{d}\t{rel}\n")
    # Few-shot pairs from the *train* split: never evaluated, and recorded in every generated row.
    train_ids = rng.sample(sorted(train, key=int), N_FEWSHOT)
    with open(out / "fewshot.jsonl", "w", encoding="utf-8") as f:
        for q in sorted(train_ids, key=int):
            d = sorted(train[q])[0]
            row = {"query_id": q, "query": queries[q], "doc_id": d, "title": raw[d]["title"], "text": raw[d]["text"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(order)} docs, {len(test_ids)} test queries, {N_FEWSHOT} few-shot pairs -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
