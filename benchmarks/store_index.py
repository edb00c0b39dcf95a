"""Memory and fixed cost of a negatives-shaped worker: document store + saved BM25 index vs today's path.

For each size (default 100k, 300k and 1M documents) the script builds a synthetic corpus from SciFact's
text (unique ids; titles and texts are words drawn from SciFact's word frequencies, with SciFact's
length distribution), written as JSONL into a temporary folder (``--work``), never committed. Then,
each in a fresh process so that its peak RSS is its own:

1. **prepare**: validate the corpus into a document store (``write_store_from_corpus``) and build and
   save the BM25 index over it (``BM25sIndex(directory=...).build(store)``);
2. **worker, store path**: open the store and load the index memory-mapped (the *fixed cost*), mine
   BM25 negatives (top ``--depth``, 3 each) for ``--queries`` queries and fetch the texts of every
   positive and negative by id (``write_triples_tsv``), as a negatives or rerank shard does;
3. **worker, today's path** (sizes up to ``--baseline-max``): ``read_corpus`` into a dict and a fresh
   bm25s build in memory (``bm25s.tokenize`` + ``bm25s.BM25.index``, as ``inpars/bm25.py`` did at
   commit 3b6414e), then the same mining and fetching.

Peak RSS is the process's ``VmHWM``; ``RssAnon``/``RssFile`` at its end split private memory from
file pages of the memory maps (clean, shared, reclaimable). Targets (issue 12): a negatives or rerank
worker <= 0.5 GB at 300k documents and <= 1 GB at 1M; its fixed cost nearly flat from 100k to 1M.

    python benchmarks/store_index.py [--sizes 100000,300000,1000000] [--queries 500] [--baseline-max 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SCIFACT, machine, scifact_missing, write_results  # this folder (see common.py)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- synthetic corpus


def make_corpus(scifact: Path, n_docs: int, path: Path, seed: int = 0) -> dict:
    """``n_docs`` documents of SciFact words (frequencies and lengths as in SciFact), as JSONL."""
    import numpy as np

    from inpars.corpus import read_corpus

    docs = list(read_corpus(scifact).values())
    words = np.array([w for d in docs for w in f"{d.title} {d.text}".split()], dtype=object)
    title_lens = np.array([len(d.title.split()) for d in docs])
    text_lens = np.array([len(d.text.split()) for d in docs])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n_docs, 10_000):
            n = min(10_000, n_docs - start)
            tl, xl = rng.choice(title_lens, n), rng.choice(text_lens, n)
            picks = words[rng.integers(0, len(words), int(tl.sum() + xl.sum()))]
            at = 0
            lines = []
            for i in range(n):
                title = " ".join(picks[at : at + tl[i]])
                text = " ".join(picks[at + tl[i] : at + tl[i] + xl[i]])
                at += tl[i] + xl[i]
                lines.append(json.dumps({"_id": f"syn-{start + i:08d}", "title": title, "text": text or "empty"}))
            f.write("\n".join(lines) + "\n")
    return {"documents": n_docs, "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- the measured processes


def _memory() -> dict:
    """This process's peak and current memory from /proc/self/status, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _rows(doc_ids: list[str], scifact: Path, n_queries: int) -> list[dict]:
    """``n_queries`` SciFact queries, each paired with a synthetic document as its positive."""
    import random

    from inpars.corpus import read_queries

    texts = list(read_queries(scifact).values())[:n_queries]
    rng = random.Random(1)
    return [{"query_id": f"q{i}", "query": t, "doc_id": rng.choice(doc_ids)} for i, t in enumerate(texts)]


def prepare(corpus: Path, out: Path) -> dict:
    from inpars.bm25 import BM25sIndex
    from inpars.store import DocumentStore, write_store_from_corpus

    t0 = time.perf_counter()
    info = write_store_from_corpus(corpus, out / "store")
    t_store = time.perf_counter() - t0
    after_store = _memory()
    store = DocumentStore.open(out / "store")
    t0 = time.perf_counter()
    index = BM25sIndex(directory=out / "bm25").build(store)
    t_index = time.perf_counter() - t0
    index_bytes = sum(p.stat().st_size for p in (out / "bm25").iterdir())
    return {
        "store_seconds": round(t_store, 1),
        "index_seconds": round(t_index, 1),
        "store_bytes": info.bytes,
        "index_bytes": index_bytes,
        "index_stats": index.stats,
        "memory_after_store_mb": after_store,
        "memory_mb": _memory(),
    }


def worker_store(out: Path, scifact: Path, n_queries: int, depth: int) -> dict:
    t0 = time.perf_counter()
    import bm25s  # noqa: F401  (imported by the first index: timed here, apart from opening)
    import pyarrow  # noqa: F401

    import inpars.negatives  # noqa: F401  (timed with the imports, not with mining)
    from inpars.bm25 import load_index
    from inpars.store import DocumentStore

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = DocumentStore.open(out / "store")
    index = load_index(out / "bm25", store=store)
    t_open = time.perf_counter() - t0
    after_open = _memory()
    sample = store.ids_at(list(range(0, len(store), max(1, len(store) // 5000))))
    rows = _rows(sample, scifact, n_queries)
    opened = {"import_seconds": round(t_import, 2), "open_seconds": round(t_open, 3), "memory_after_open_mb": after_open}
    return {**opened, **_mine_and_write(rows, index, store, depth)}


def _mine_and_write(rows: list[dict], index, texts, depth: int) -> dict:
    """What both paths do once their data is open: mine negatives, then write the triples (texts by id)."""
    from inpars.negatives import mine_negatives, write_triples_tsv

    t0 = time.perf_counter()
    triples = mine_negatives(rows, index, depth=depth, n_negatives=3, seed=0)
    t_mine = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        n = write_triples_tsv(triples, texts, Path(tmp) / "triples.tsv")
    t_fetch = time.perf_counter() - t0
    return {
        "mine_seconds": round(t_mine, 2),
        "fetch_seconds": round(t_fetch, 2),
        "triples": n,
        "memory_mb": _memory(),
        "negatives": [t["neg_doc_ids"] for t in triples[:20]],
    }


class TodaysIndex:
    """BM25 as ``inpars/bm25.py`` built it at commit 3b6414e: every token list in memory, ids in a list."""

    def __init__(self, docs):
        import bm25s
        import numpy as np
        import Stemmer

        self.stemmer = Stemmer.Stemmer("english")
        tokens = bm25s.tokenize([d.contents for d in docs], stopwords="en", stemmer=self.stemmer, return_ids=True, show_progress=False)
        self.retriever = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
        self.retriever.index(tokens, show_progress=False)
        self.ids = [d.doc_id for d in docs]
        self.id_set = set(self.ids)
        self.np = np

    def __contains__(self, doc_id) -> bool:
        return doc_id in self.id_set

    def search(self, queries, k):
        import bm25s

        np = self.np
        qids = list(queries)
        tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False)
        vocab = self.retriever.vocab_dict
        ids = [[vocab[t] for t in q if t in vocab] for q in tokens]
        live = [i for i, q in enumerate(ids) if q]
        indices = np.zeros((len(ids), k), dtype=np.int64)
        scores = np.zeros((len(ids), k), dtype=np.float32)
        if live:
            docs, sc = self.retriever.retrieve([ids[i] for i in live], k=k, n_threads=os.cpu_count(), show_progress=False)
            indices[live], scores[live] = docs, sc
        names = np.asarray(self.ids, dtype=object)
        return {qid: dict(zip(names[indices[r][scores[r] > 0]].tolist(), scores[r][scores[r] > 0].tolist())) for r, qid in enumerate(qids)}


def worker_today(corpus: Path, scifact: Path, n_queries: int, depth: int) -> dict:
    from inpars.corpus import read_corpus

    t0 = time.perf_counter()
    docs = read_corpus(corpus)
    index = TodaysIndex(list(docs.values()))
    t_open = time.perf_counter() - t0
    after_open = _memory()
    all_ids = list(docs)
    rows = _rows(all_ids[:: max(1, len(all_ids) // 5000)], scifact, n_queries)
    return {"open_seconds": round(t_open, 1), "memory_after_open_mb": after_open, **_mine_and_write(rows, index, docs, depth)}


def _child(args: argparse.Namespace) -> None:
    """Runs one measured step in this (fresh) process and prints its result as JSON."""
    out, corpus, scifact = Path(args.child_dir), Path(args.child_dir) / "corpus.jsonl", Path(args.data)
    if args.child == "prepare":
        result = prepare(corpus, out)
    elif args.child == "store":
        result = worker_store(out, scifact, args.queries, args.depth)
    else:
        result = worker_today(corpus, scifact, args.queries, args.depth)
    print("RESULT " + json.dumps(result))


def _run_child(step: str, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--child-dir", str(folder), "--data", args.data]
    cmd += ["--queries", str(args.queries), "--depth", str(args.depth)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "wall_seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SCIFACT), help="SciFact BEIR folder")
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--baseline-max", type=int, default=1_000_000, help="largest size also run through today's path")
    parser.add_argument("--work", default=None, help="folder for the synthetic corpora (default: a temporary one, deleted)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "store_index.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return 0
    if scifact_missing(args.data, ("corpus.jsonl", "queries.jsonl"), who="store_index"):
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for n in sizes:
            folder = Path(work) / f"n{n}"
            folder.mkdir()
            row: dict = {"documents": n, "corpus": make_corpus(Path(args.data), n, folder / "corpus.jsonl")}
            print(f"{n}: corpus {row['corpus']['bytes'] / 1e6:.0f} MB in {row['corpus']['seconds']} s", flush=True)
            row["prepare"] = _run_child("prepare", folder, args)
            print(f"{n}: prepare {row['prepare']['wall_seconds']} s, peak {row['prepare']['memory_mb']['VmHWM']} MB", flush=True)
            row["store_path"] = _run_child("store", folder, args)
            print(
                f"{n}: store path peak {row['store_path']['memory_mb']['VmHWM']} MB, open {row['store_path']['open_seconds']} s", flush=True
            )
            if n <= args.baseline_max:
                row["todays_path"] = _run_child("today", folder, args)
                same = row["todays_path"].pop("negatives") == row["store_path"]["negatives"]
                row["same_negatives_first_20"] = same
                print(
                    f"{n}: today's path peak {row['todays_path']['memory_mb']['VmHWM']} MB, open {row['todays_path']['open_seconds']} s",
                    flush=True,
                )
            row["store_path"].pop("negatives")
            results.append(row)
            for p in folder.iterdir():  # free the disk before the next size
                if p.is_file():
                    p.unlink()

    print()
    print(
        f"{'docs':>9} | {'prepare s':>9} {'peak MB':>8} | {'store: open s':>13} {'peak MB':>8} {'anon MB':>8} {'mine s':>7} | {'today: open s':>13} {'peak MB':>8} {'mine s':>7}"
    )
    for r in results:
        p, s, t = r["prepare"], r["store_path"], r.get("todays_path")
        line = (
            f"{r['documents']:>9} | {p['wall_seconds']:>9} {p['memory_mb']['VmHWM']:>8} | {s['open_seconds']:>13} "
            f"{s['memory_mb']['VmHWM']:>8} {s['memory_mb']['RssAnon']:>8} {s['mine_seconds']:>7} | "
        )
        line += f"{t['open_seconds']:>13} {t['memory_mb']['VmHWM']:>8} {t['mine_seconds']:>7}" if t else f"{'-':>13} {'-':>8} {'-':>7}"
        print(line)
    write_results({"queries": args.queries, "depth": args.depth, "sizes": results, "machine": machine()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
