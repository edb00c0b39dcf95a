"""Reranking speed: a plain scoring loop against :meth:`inpars.rerank.Reranker.score`, same pairs, same process.

Baselines (what a typical script does): fixed batches of 32 in input order, fp32, ``torch.no_grad()``,
padded either to ``max_length`` (``naive-maxlen``) or to each batch's longest pair (``naive-dynamic``).
Ours: each distinct query and document tokenized once, pairs sorted by length, dynamic padding, ``torch.inference_mode()``, bf16 weights where the
hardware computes bf16 natively. Prints pairs/s, speed-ups, and how far our scores are from the fp32
ones (max |difference|, Spearman and Kendall rank correlations); writes JSON to ``--out``.

    python benchmarks/rerank.py                       # MiniLM cross-encoder, 512 SciFact-sample pairs
    python benchmarks/rerank.py --model runs/x/train/model --device cuda
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))
from common import machine, write_results

from inpars.corpus import read_corpus, read_qrels, read_queries
from inpars.encoding import encode_pairs
from inpars.models import resolve_model
from inpars.rerank import load_reranker

SAMPLE = ROOT / "inpars" / "data" / "scifact-sample"


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (query, document) pairs from the packaged SciFact sample: each query's judged document
    and random others, shuffled (so input order says nothing about length)."""
    docs, queries = read_corpus(SAMPLE), read_queries(SAMPLE)
    qrels = read_qrels(SAMPLE / "qrels" / "test.tsv")
    rng = random.Random(seed)
    ids = sorted(docs)
    qids = sorted(q for q in qrels if q in queries)
    pairs = [(queries[q], docs[d].contents) for q in qids for d in sorted(qrels[q])]
    while len(pairs) < n:
        pairs.append((queries[rng.choice(qids)], docs[rng.choice(ids)].contents))
    pairs = pairs[:n]
    rng.shuffle(pairs)
    return pairs


def make_rerank_pairs(n: int, depth: int) -> list[tuple[str, str]]:
    """The reranking stage's own workload: each sample query with its BM25 top ``depth``, in run
    order (queries repeat ``depth`` times; popular documents recur across queries), ``n`` pairs."""
    from inpars.bm25 import build_index

    docs, queries = read_corpus(SAMPLE), read_queries(SAMPLE)
    qrels = read_qrels(SAMPLE / "qrels" / "test.tsv")
    qids = sorted(q for q in qrels if q in queries)
    run = build_index(docs).search({q: queries[q] for q in qids}, depth)
    pairs = [(queries[q], docs[d].contents) for q in qids for d in sorted(run[q], key=lambda d: -run[q][d])]
    return pairs[:n]


def naive_scores(model, tokenizer, pairs, *, batch_size: int, max_length: int, padding: str, device) -> list[float]:
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            enc = tokenizer(
                [q for q, _ in chunk], [d for _, d in chunk], padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            out += model(**enc).logits[:, 0].float().cpu().tolist()
    return out


def naive_prep(tokenizer, pairs, *, batch_size: int, max_length: int) -> None:
    """The plain loop's host side alone: tokenize and pad every batch of pairs."""
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        tokenizer([q for q, _ in chunk], [d for _, d in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def ours_prep(reranker, pairs) -> None:
    """Ours, host side alone: tokenize each distinct text once, assemble the pairs, pad sorted batches
    (the very steps of ``Reranker.score``, without the model)."""
    features = encode_pairs(reranker.tokenizer, reranker.model_type, [q for q, _ in pairs], [d for _, d in pairs], reranker.max_length)
    for _ in reranker.batches(features):
        pass


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Tau-a over all pairs (O(n^2), fine for a few thousand scores)."""
    sa = np.sign(a[:, None] - a[None, :])
    sb = np.sign(b[:, None] - b[None, :])
    n = len(a)
    return float((sa * sb)[np.triu_indices(n, 1)].sum() / (n * (n - 1) / 2))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6", help="cross-encoder folder, HF id or alias (alias: MiniLM + a seeded fresh head)")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument(
        "--depth",
        type=int,
        default=None,
        help="pairs = sample queries x their BM25 top DEPTH (the rerank stage's workload) instead of shuffled random pairs",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="ours: auto (bf16 where native) | float32 | bfloat16")
    ap.add_argument("--ours-batch-size", type=int, default=None, help="ours only (default: --batch-size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-maxlen", action="store_true", help="skip the (slowest) pad-to-max_length baseline")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rerank.json"))
    args = ap.parse_args(argv)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = make_rerank_pairs(args.pairs, args.depth) if args.depth else make_pairs(args.pairs, args.seed)
    where = resolve_model(args.model).name_or_path
    # The same weights for every contender: a fresh classification head (an alias or a bare encoder)
    # is drawn from the same seed for both.
    torch.manual_seed(args.seed)
    ours = load_reranker(
        where,
        model_type="cross-encoder",
        device=args.device,
        dtype=args.dtype,
        batch_size=args.ours_batch_size or args.batch_size,
        max_length=args.max_length,
    )
    torch.manual_seed(args.seed)
    base_model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=1).float().to(ours.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(where)

    warm = pairs[: args.batch_size]  # first-call costs (allocation, kernel choice) out of the timings
    naive_scores(base_model, tokenizer, warm, batch_size=args.batch_size, max_length=args.max_length, padding=True, device=ours.device)
    ours.score(warm)

    results: dict[str, dict] = {}
    contenders = [("naive-dynamic", True)] + ([] if args.skip_maxlen else [("naive-maxlen", "max_length")])
    scores: dict[str, list[float]] = {}
    for name, padding in contenders:
        scores[name], secs = timed(
            lambda padding=padding: naive_scores(
                base_model, tokenizer, pairs, batch_size=args.batch_size, max_length=args.max_length, padding=padding, device=ours.device
            )
        )
        results[name] = {"seconds": round(secs, 3), "pairs_per_s": round(len(pairs) / secs, 2)}
    scores["ours"], secs = timed(lambda: ours.score(pairs))
    results["ours"] = {
        "seconds": round(secs, 3),
        "pairs_per_s": round(len(pairs) / secs, 2),
        "dtype": str(ours.dtype).replace("torch.", ""),
    }

    # Host-side preparation alone (tokenize + pad): on a GPU it is most of a plain loop's time.
    _, naive_prep_s = timed(lambda: naive_prep(tokenizer, pairs, batch_size=args.batch_size, max_length=args.max_length))
    _, ours_prep_s = timed(lambda: ours_prep(ours, pairs))
    prep = {
        "naive_seconds": round(naive_prep_s, 4),
        "ours_seconds": round(ours_prep_s, 4),
        "naive_us_per_pair": round(1e6 * naive_prep_s / len(pairs), 1),
        "ours_us_per_pair": round(1e6 * ours_prep_s / len(pairs), 1),
        "speedup": round(naive_prep_s / ours_prep_s, 2),
    }

    ref = np.array(scores["naive-dynamic"])
    mine = np.array(scores["ours"])
    spread = float(ref.max() - ref.min())
    report = {
        "pairs": len(pairs),
        "workload": f"BM25 top {args.depth} per query" if args.depth else "shuffled (query, judged or random document) pairs",
        "model": args.model,
        "batch_size": args.batch_size,
        "ours_batch_size": ours.batch_size,
        "max_length": args.max_length,
        "device": str(ours.device),
        "machine": machine(),
        "torch": torch.__version__,
        "results": results,
        "host_prep": prep,
        "speedup_vs_naive_dynamic": round(results["naive-dynamic"]["seconds"] / results["ours"]["seconds"], 2),
        "speedup_vs_naive_maxlen": None if args.skip_maxlen else round(results["naive-maxlen"]["seconds"] / results["ours"]["seconds"], 2),
        "max_abs_diff": float(np.abs(mine - ref).max()),
        "score_spread": spread,
        "max_abs_diff_over_spread": float(np.abs(mine - ref).max() / spread) if spread else None,
        "spearman": spearman(mine, ref),
        "kendall_tau": kendall_tau(mine, ref),
    }
    if "naive-maxlen" in scores:
        report["max_abs_diff_maxlen_vs_dynamic"] = float(np.abs(np.array(scores["naive-maxlen"]) - ref).max())

    for name, r in results.items():
        print(f"{name:14s} {r['pairs_per_s']:9.1f} pairs/s  ({r['seconds']:.2f} s)")
    print(
        f"speed-up: {report['speedup_vs_naive_dynamic']}x vs naive-dynamic"
        + ("" if args.skip_maxlen else f", {report['speedup_vs_naive_maxlen']}x vs naive-maxlen")
    )
    print(
        f"host-side tokenize+pad: plain {prep['naive_us_per_pair']} us/pair, ours {prep['ours_us_per_pair']} us/pair ({prep['speedup']}x)"
    )
    print(
        f"max |score diff| {report['max_abs_diff']:.4g} (score spread {spread:.4g}); "
        f"Spearman {report['spearman']:.4f}, Kendall tau {report['kendall_tau']:.4f}"
    )
    write_results(report, args.out)
    return report


if __name__ == "__main__":
    main()
