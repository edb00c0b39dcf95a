#!/usr/bin/env python
"""Quality benchmark: does the InPars method beat BM25 on the full SciFact (5,183 docs, 300 test claims)?

Runs the whole method with the library's own functions and prints one table:

1. few-shot pool  (claim, abstract) pairs from SciFact's *train* split, for ``promptagator-scifact``;
2. generate       one synthetic query per document (or ``--queries-per-doc K``), from the corpus only;
3. filter         variants: ``scores`` (mean log-prob, top ``--keep-fraction``), ``consistency``
                  (source document in BM25's top ``--consistency-top-k``), ``none`` (sanity checks only);
4. negatives      BM25 top ``--neg-depth``, ``--n-negatives`` sampled; a ``deep`` variant skips the top
                  ``--deep-skip-top`` ranks ("negatives from deeper BM25 ranks");
5. train + rerank each ``--configs`` entry, then rerank BM25's top 100 of the test queries, alone and
                  fused with BM25 (min-max); the fusion weight is chosen on HELD-OUT SYNTHETIC queries
                  (``split_held_out``, 10%), never on test queries;
6. baselines      BM25 (bm25s, k1=0.9 b=0.4: 0.676), zero-shot dense (untrained MiniLM bi-encoder, mean
                  pooling, cosine, exact search over every document), zero-shot hybrid (BM25 + that);
7. table          nDCG@10, delta vs BM25 with a paired-bootstrap 95% CI, wins/losses/ties, R@100.

No test query or test qrel is read before step 5's test reranking; test qrels are read only in step 7.
Few-shot query ids come from the train split and are excluded from evaluation (asserted).

Configurations (``--configs``, comma-separated): a model, then optional ``+levers``:
  ``ce-lce``  MiniLM cross-encoder, group softmax over (positive + negatives)   [InPars-light]
  ``ce-bce``  MiniLM cross-encoder, pointwise BCE                              [the guide: learns nothing]
  ``bi``      MiniLM bi-encoder, in-batch + hard negatives; evaluated as a DENSE RETRIEVER over the whole
              corpus (the headline row) and, for free from the same embeddings, as a reranker of BM25@100
  levers: ``+deep`` (negatives from deeper BM25 ranks), ``+cons`` (consistency filter instead of
  scores), ``+nofilter`` (sanity checks only), ``+wise`` (WiSE-FT: the trained weights averaged with
  the starting ones, ``--keep-initial``, default 0.5), e.g. ``ce-lce+deep+cons``, ``bi+deep+wise``.

Every step is cached under ``--work-dir`` (keyed by the settings that shape it), so a rerun resumes and
the generation can run on a GPU machine (``--generate-only``) and the rest elsewhere (same work dir, or
``--generated FILE``).

    python benchmarks/quality_scifact.py --device cuda --n-docs 5183           # the full benchmark (GPU)
    python benchmarks/quality_scifact.py --n-docs 200 --eval-queries 50 --configs ce-lce --max-steps 20  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .` (e.g. the GPU machine)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when loaded by the tests
from common import SCIFACT, scifact_missing

DEFAULT_WORK = REPO / "benchmarks" / "results" / "quality_scifact"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "quality_scifact.json"
FULL_TEST_QUERIES = 300
BM25_REFERENCE = 0.676  # the guide's bm25s figure on SciFact test (Pyserini flat: 0.679)
HYBRID_REFERENCE = 0.734  # the guide's untrained MiniLM bi-encoder fused with BM25

MODELS = {"ce-lce": ("cross-encoder", "lce"), "ce-bce": ("cross-encoder", "bce"), "bi": ("bi-encoder", "lce")}
LEVERS = ("deep", "cons", "nofilter", "wise")
MEASURES = ["nDCG@10", "RR@10", "R@100"]


# --------------------------------------------------------------------------- small helpers


def _key(settings: Mapping) -> str:
    """A short stable hash of the settings that shape a cached output."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _natural(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


class Timer:
    """Wall-clock seconds per step; a cached step is recorded as such."""

    def __init__(self) -> None:
        self.steps: dict[str, dict] = {}

    @contextmanager
    def step(self, name: str, detail: str = ""):
        print(f"[{time.strftime('%H:%M:%S')}] {name} {detail}".rstrip(), flush=True)
        started = time.perf_counter()
        record = {"seconds": None, "cached": False}
        self.steps[name] = record
        try:
            yield record
        finally:
            record["seconds"] = round(time.perf_counter() - started, 2)
            note = " (cached)" if record["cached"] else ""
            print(f"    {name}: {record['seconds']:.1f} s{note}", flush=True)

    def table(self) -> str:
        width = max((len(n) for n in self.steps), default=4)
        lines = [f"{'step'.ljust(width)}  seconds  note"]
        for name, r in self.steps.items():
            extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("seconds", "cached"))
            note = "cached" + (f"; {extra}" if extra else "") if r["cached"] else extra
            lines.append(f"{name.ljust(width)}  {r['seconds']:7.1f}  {note}")
        return "\n".join(lines)


def parse_config(name: str) -> dict:
    """``ce-lce+deep+cons`` -> {"name", "model", "model_type", "loss", "filter", "negatives"}."""
    from inpars.errors import ConfigError

    model, *levers = name.split("+")
    if model not in MODELS:
        raise ConfigError(f"unknown configuration {name!r}: the model must be one of {', '.join(MODELS)}")
    bad = [lv for lv in levers if lv not in LEVERS]
    if bad or len(set(levers)) != len(levers) or ({"cons", "nofilter"} <= set(levers)):
        raise ConfigError(f"configuration {name!r}: levers are +{', +'.join(LEVERS)} (cons and nofilter exclude each other)")
    model_type, loss = MODELS[model]
    return {
        "name": name,
        "model": model,
        "model_type": model_type,
        "loss": loss,
        "filter": "consistency" if "cons" in levers else "none" if "nofilter" in levers else "scores",
        "negatives": "deep" if "deep" in levers else "top",
        "wise": "wise" in levers,  # average the trained weights with the starting ones (--keep-initial)
    }


# --------------------------------------------------------------------------- the benchmark


class Benchmark:
    def __init__(self, args: argparse.Namespace):
        from inpars.corpus import read_corpus, read_queries

        self.args = args
        self.timer = Timer()
        self.data = Path(args.data)
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        # Models and runs are large and machine-specific: keep them out of git wherever the folder is.
        (self.work / ".gitignore").write_text("*\n", encoding="utf-8")
        with self.timer.step("load corpus"):
            self.docs = read_corpus(self.data)
            self.all_queries = read_queries(self.data / "queries.jsonl")
        self._index = None
        self._dense0 = None

    # ----------------------------------------------------------------- shared resources

    @property
    def index(self):
        if self._index is None:
            from inpars.bm25 import get_index

            with self.timer.step("bm25 index", f"({len(self.docs)} docs)"):
                self._index = get_index("bm25s").build(list(self.docs.values()))
        return self._index

    # ----------------------------------------------------------------- 1. few-shot pool

    def fewshot_pool(self) -> Path:
        """(claim, abstract) pairs from the TRAIN split: one per train claim, its first relevant doc."""
        from inpars.corpus import read_qrels, write_jsonl

        path = self.work / "fewshot-train.jsonl"
        with self.timer.step("1 few-shot pool") as t:
            if path.exists():
                t["cached"] = True
            else:
                train = read_qrels(self.data / "qrels" / "train.tsv")
                rows = []
                for qid in sorted(train, key=_natural):
                    did = min(train[qid], key=_natural)
                    doc = self.docs[did]
                    rows.append({"query_id": qid, "query": self.all_queries[qid], "doc_id": did, "title": doc.title, "text": doc.text})
                write_jsonl(rows, path)
            ids = {json.loads(line)["query_id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
            # Only the *ids* of the test split are read here (no text, no judgements): the pool must be disjoint.
            test_ids = self._test_query_ids()
            assert not ids & test_ids, f"few-shot pool holds test query ids: {sorted(ids & test_ids)[:5]}"
            t["pairs"] = len(ids)
        self.fewshot_ids = ids
        return path

    def _test_query_ids(self) -> set[str]:
        ids = set()
        with open(self.data / "qrels" / "test.tsv", encoding="utf-8") as f:
            for n, line in enumerate(f):
                parts = line.split()
                if parts and not (n == 0 and parts[0].lower() in ("query-id", "query_id", "qid")):
                    ids.add(parts[0])
        return ids

    # ----------------------------------------------------------------- 2. generate

    def gen_settings(self) -> dict:
        a = self.args
        if a.generated:
            return {"file": str(Path(a.generated).resolve()), "size": Path(a.generated).stat().st_size}
        return {
            "prompt": a.prompt,
            "model": a.model,
            "n_docs": a.n_docs,
            "queries_per_doc": a.queries_per_doc,
            "temperature": a.temperature,
            "seed": a.seed,
            "max_new_tokens": a.max_new_tokens,
            "n_examples": a.n_examples,
            "max_doc_tokens": 256,
            "max_example_tokens": 128,
        }

    @property
    def gen_dir(self) -> Path:
        s = self.gen_settings()
        if self.args.generated:
            name = f"gen-file-{Path(self.args.generated).stem}-{_key(s)}"
        else:
            model = Path(s["model"]).name.replace("/", "_")
            name = f"gen-{s['prompt']}-{model}-n{s['n_docs'] or 'all'}-k{s['queries_per_doc']}-{_key(s)}"
        return self.work / name

    def generate(self, fewshot: Path) -> list[dict]:
        from inpars.corpus import read_jsonl, write_jsonl
        from inpars.errors import ConfigError, InputError

        a, gen_dir = self.args, self.gen_dir
        out = gen_dir / "generated.jsonl"
        _write_json(gen_dir / "settings.json", self.gen_settings())
        with self.timer.step("2 generate", f"-> {out.relative_to(self.work)}") as t:
            if out.exists():
                t["cached"] = True
                rows = read_jsonl(out)
            elif a.generated:
                rows = read_jsonl(a.generated)
                for n, r in enumerate(rows, 1):
                    if not r.get("query_id") or not r.get("doc_id") or "query" not in r:
                        raise InputError("generated row needs query_id, query and doc_id", path=a.generated, line=n)
                    if str(r["doc_id"]) not in self.docs:
                        raise InputError(f"doc_id {r['doc_id']!r} is not in the corpus", path=a.generated, line=n)
                write_jsonl(rows, out)
            else:
                if a.queries_per_doc > 1 and a.temperature == 0 and not a.prompt.startswith("promptagator"):
                    raise ConfigError(
                        "--queries-per-doc > 1 with a fixed-example prompt needs --temperature > 0 "
                        "(greedy decoding would repeat the same query)"
                    )
                rows = self._generate_chunks(fewshot, gen_dir, t)
                write_jsonl(rows, out)
            t["rows"] = len(rows)
        return rows

    def _generate_chunks(self, fewshot: Path, gen_dir: Path, t: dict) -> list[dict]:
        from inpars.backends import get_backend
        from inpars.config import GenerateConfig
        from inpars.corpus import read_jsonl, write_jsonl
        from inpars.generate import generate_queries, sample_documents
        from inpars.prompts import load_prompt

        a = self.args
        n_docs = None if not a.n_docs or a.n_docs >= len(self.docs) else a.n_docs
        sample = sample_documents(self.docs, n_docs, a.seed)
        sample = list(sample.values()) if isinstance(sample, Mapping) else list(sample)
        prompt = load_prompt(a.prompt, fewshot_file=str(fewshot) if a.prompt.startswith("promptagator") else None, n_examples=a.n_examples)
        cfg = GenerateConfig(
            backend="transformers",
            model=a.model,
            prompt=a.prompt,
            n_docs=n_docs,
            seed=a.seed,
            max_new_tokens=a.max_new_tokens,
            batch_size=a.batch_size,
            temperature=a.temperature,
            device=a.device,
        )
        backend = None
        rows: list[dict] = []
        chunk = a.chunk_docs
        generated_docs, started = 0, time.perf_counter()
        try:
            for k in range(a.queries_per_doc):
                seed = a.seed + k  # each round its own seed: its own few-shot draw and sampling
                for start in range(0, len(sample), chunk):
                    path = gen_dir / "chunks" / f"seed{seed}-{start // chunk:05d}.jsonl"
                    if path.exists():
                        rows += read_jsonl(path)
                        continue
                    if backend is None:
                        backend = get_backend("transformers", cfg)
                    docs = sample[start : start + chunk]
                    done_before = generated_docs

                    def progress(n: int, _seed=seed, _start=start, _before=done_before) -> None:
                        rate = (_before + n) / max(1e-9, time.perf_counter() - started)
                        print(f"    seed {_seed}: {_start + n}/{len(sample)} docs ({rate:.2f} docs/s)", flush=True)

                    part = generate_queries(
                        docs,
                        backend,
                        prompt,
                        max_new_tokens=a.max_new_tokens,
                        max_doc_tokens=256,
                        max_example_tokens=128,
                        batch_size=a.batch_size,
                        temperature=a.temperature,
                        top_p=1.0,
                        seed=seed,
                        on_progress=progress,
                    )
                    write_jsonl(part, path)
                    rows += part
                    generated_docs += len(docs)
        finally:
            if backend is not None:
                backend.close()
        if generated_docs:
            t["docs_per_s"] = round(generated_docs / (time.perf_counter() - started), 3)
        return rows

    # ----------------------------------------------------------------- 3. filter, 4. negatives

    def data_settings(self) -> dict:
        a = self.args
        return {
            "keep_fraction": a.keep_fraction,
            "keep_top_k": a.keep_top_k,
            "consistency_top_k": a.consistency_top_k,
            "neg_depth": a.neg_depth,
            "n_negatives": a.n_negatives,
            "deep_skip_top": a.deep_skip_top,
            "held_out_fraction": a.held_out_fraction,
            "seed": a.seed,
        }

    @property
    def data_dir(self) -> Path:
        return self.gen_dir / f"data-{_key(self.data_settings())}"

    def filter_variants(self, rows: list[dict]) -> dict[str, list[dict]]:
        from inpars.config import FilterConfig
        from inpars.corpus import read_jsonl, write_jsonl
        from inpars.filter import drop_counts, filter_queries

        a = self.args
        configs = {
            "scores": FilterConfig(strategy="scores", keep_fraction=None if a.keep_top_k else a.keep_fraction, keep_top_k=a.keep_top_k),
            "consistency": FilterConfig(strategy="consistency", keep_fraction=None, consistency_top_k=a.consistency_top_k),
            "none": FilterConfig(strategy="scores", keep_fraction=None),
        }
        _write_json(self.data_dir / "settings.json", self.data_settings())
        kept_by: dict[str, list[dict]] = {}
        summary_path = self.data_dir / "filter-summary.json"
        with self.timer.step("3 filter") as t:
            summary = _read_json(summary_path) if summary_path.exists() else {}
            for name, cfg in configs.items():
                path = self.data_dir / f"filter-{name}.jsonl"
                if path.exists() and name in summary:
                    kept_by[name] = read_jsonl(path)
                    continue
                kept, dropped = filter_queries(rows, cfg, index=self.index if name == "consistency" else None, docs=self.docs)
                write_jsonl(kept, path)
                summary[name] = {"n_in": len(rows), "n_kept": len(kept), "dropped_by_reason": drop_counts(dropped)}
                kept_by[name] = kept
            t["cached"] = summary_path.exists()
            summary["diagnostics"] = summary.get("diagnostics") or self._diagnostics(rows)
            _write_json(summary_path, summary)
            t.update({name: summary[name]["n_kept"] for name in configs})
        self.filter_summary = summary
        for name in configs:
            s = summary[name]
            print(f"    {name:12s} kept {s['n_kept']:5d} of {s['n_in']}  dropped {s['dropped_by_reason']}")
        d = summary["diagnostics"]
        print(
            f"    source doc at BM25 rank 1: {d['bm25_rank1']:.1%}, in top 10: {d['bm25_top10']:.1%};"
            f" questions (end with '?'): {d['questions']:.1%}; mean words {d['mean_words']:.1f}"
        )
        return kept_by

    def _diagnostics(self, rows: list[dict]) -> dict:
        """How lexically easy and how question-like the generated queries are (the guide: 71.5% rank 1)."""
        live = [r for r in rows if str(r.get("query", "")).strip()]
        if not live:
            return {"bm25_rank1": 0.0, "bm25_top10": 0.0, "questions": 0.0, "mean_words": 0.0}
        run = self.index.search({str(r["query_id"]): str(r["query"]) for r in live}, k=10)
        ranks = []
        for r in live:
            ranked = sorted(run.get(str(r["query_id"]), {}).items(), key=lambda kv: (-kv[1], kv[0]))
            ranks.append(next((i for i, (d, _) in enumerate(ranked, 1) if d == str(r["doc_id"])), None))
        return {
            "bm25_rank1": sum(1 for x in ranks if x == 1) / len(live),
            "bm25_top10": sum(1 for x in ranks if x) / len(live),
            "questions": sum(1 for r in live if str(r["query"]).strip().endswith("?")) / len(live),
            "mean_words": sum(len(str(r["query"]).split()) for r in live) / len(live),
            "examples": [str(r["query"]) for r in live[:5]],
        }

    def negatives(self, filter_name: str, kept: list[dict], variant: str) -> list[dict]:
        from inpars.corpus import read_jsonl, write_jsonl
        from inpars.negatives import mine_negatives

        a = self.args
        path = self.data_dir / f"negatives-{filter_name}-{variant}.jsonl"
        if path.exists():
            return read_jsonl(path)
        skip = a.deep_skip_top if variant == "deep" else 0
        with self.timer.step(f"4 negatives {filter_name}/{variant}", f"(depth {a.neg_depth}, n={a.n_negatives}, skip_top={skip})") as t:
            triples = mine_negatives(kept, self.index, depth=a.neg_depth, n_negatives=a.n_negatives, skip_top=skip, seed=a.seed)
            write_jsonl(triples, path)
            t["rows"] = len(triples)
        return triples

    def held_out(self, kept_by: dict[str, list[dict]]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
        """The held-out synthetic queries (scores-filtered, hash-chosen) and their qrels (source doc = 1).

        ``split_held_out`` hashes query ids, so a query held out here is held out of every
        configuration's training set too, whatever its filter.
        """
        from inpars.train import split_held_out

        _, held = split_held_out(kept_by["scores"], self.args.held_out_fraction)
        if not held:
            raise SystemExit("no held-out synthetic queries (too few generated queries): raise --n-docs")
        self.held_out_ids = {str(r["query_id"]) for r in held}
        return {str(r["query_id"]): str(r["query"]) for r in held}, {str(r["query_id"]): {str(r["doc_id"]): 1} for r in held}

    # ----------------------------------------------------------------- test queries (no qrels)

    def test_queries(self) -> dict[str, str]:
        """The evaluation queries (text only; their qrels are read in the final step)."""
        ids = sorted(self._test_query_ids(), key=_natural)
        if self.args.eval_queries and self.args.eval_queries < len(ids):
            ids = sorted(random.Random(self.args.seed).sample(ids, self.args.eval_queries), key=_natural)
        return {q: self.all_queries[q] for q in ids if q not in self.fewshot_ids}

    @property
    def first_depth(self) -> int:
        """First-stage depth: at least 100 (R@100 is reported), at least the rerank depth."""
        return max(100, self.args.rerank_depth)

    @property
    def eval_key(self) -> str:
        n = self.args.eval_queries
        return "all" if not n or n >= FULL_TEST_QUERIES else f"sub{n}-s{self.args.seed}"

    def bm25_run(self, name: str, queries: dict[str, str], depth: int) -> dict:
        from inpars.runs import read_run, write_run

        path = self.work / "baselines" / f"bm25-{name}-{_key(sorted(queries.items()))}-d{depth}.trec"
        if path.exists():
            return read_run(path)
        run = self.index.search(queries, k=depth)
        write_run(run, path, "bm25")
        return run

    # ----------------------------------------------------------------- dense (bi-encoder) helpers

    def _dense(self, model_path: str, cache_dir: Path, queries: dict[str, str], label: str):
        """Query x corpus cosine matrix with an exact search; corpus embeddings cached per model."""
        import torch

        from inpars.rerank import load_reranker

        encoder = load_reranker(
            model_path, model_type="bi-encoder", device=self.args.device, batch_size=self.args.rerank_batch_size, max_length=256
        )
        ids = list(self.docs)
        emb_path = cache_dir / "corpus-embeddings.pt"
        emb = None
        if emb_path.exists():
            saved = torch.load(emb_path)
            # Reuse only if it embeds exactly these documents in this order.
            if isinstance(saved, dict) and saved.get("doc_ids") == ids:
                emb = saved["embeddings"]
            elif isinstance(saved, torch.Tensor) and saved.shape[0] == len(ids):
                emb = saved
        if emb is None:
            with self.timer.step(f"encode corpus ({label})", f"({len(ids)} docs)") as t:
                began = time.perf_counter()
                emb = encoder.encode([self.docs[d].contents for d in ids])
                emb_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"doc_ids": ids, "embeddings": emb}, emb_path)
                t["docs_per_s"] = round(len(ids) / (time.perf_counter() - began), 1)
        qids = list(queries)
        q = encoder.encode([queries[x] for x in qids]) if qids else torch.zeros(0, emb.shape[1])
        return qids, ids, q @ emb.T

    def dense_runs(self, model_path: str, cache_dir: Path, queries: dict[str, str], rerank_of: dict | None, label: str):
        """(dense top-``depth`` run, bi-encoder scores of ``rerank_of``'s documents)."""
        qids, ids, sims = self._dense(model_path, cache_dir, queries, label)
        pos = {d: i for i, d in enumerate(ids)}
        k = min(self.first_depth, len(ids))
        top = sims.topk(k, dim=1) if qids else None
        dense = {q: {ids[j]: float(s) for s, j in zip(top.values[i].tolist(), top.indices[i].tolist())} for i, q in enumerate(qids)}
        reranked = None
        if rerank_of is not None:
            from inpars.runs import top_docs

            depth = self.args.rerank_depth
            reranked = {q: {d: float(sims[i, pos[d]]) for d in top_docs(rerank_of.get(q, {}), depth)} for i, q in enumerate(qids)}
        return dense, reranked

    # ----------------------------------------------------------------- 5. train + rerank

    def train_settings(self, cfg: dict) -> dict:
        a = self.args
        return {
            "config": cfg["name"],
            "epochs": a.epochs,
            "max_steps": a.max_steps,
            "batch_size": a.train_batch_size,
            "learning_rate": a.lr,
            "max_length": 256,
            "seed": a.seed,
            "keep_initial": self.keep_initial(cfg),
        }

    def keep_initial(self, cfg: dict) -> float:
        return self.args.keep_initial if cfg.get("wise") else 0.0

    def run_config(self, cfg: dict, kept_by, held_queries, held_qrels, test_queries, bm25_test, bm25_held) -> dict:
        from inpars.config import TrainConfig
        from inpars.rerank import load_reranker, rerank_run
        from inpars.runs import choose_fusion_weight, fuse_runs, read_run, write_run
        from inpars.train import split_held_out, train_model

        a, name = self.args, cfg["name"]
        triples = self.negatives(cfg["filter"], kept_by[cfg["filter"]], cfg["negatives"])
        train_rows, _ = split_held_out(triples, a.held_out_fraction)
        # The same query ids are held out whatever the filter (hash split); say so if that ever breaks.
        assert not {str(t["query_id"]) for t in train_rows} & self.held_out_ids, "a held-out query is in the training set"
        model_dir = self.data_dir / "models" / f"{name}-{_key(self.train_settings(cfg))}"
        _write_json(model_dir.parent / f"{model_dir.name}.settings.json", self.train_settings(cfg))
        stats_path = model_dir / "train_stats.json"
        with self.timer.step(f"5 train {name}", f"({len(train_rows)} queries)") as t:
            if stats_path.exists():
                t["cached"] = True
                stats = _read_json(stats_path)
            elif cfg.get("wise") and (stats := self._average_with_start(cfg, model_dir)) is not None:
                t["from"] = "the trained twin without +wise"
                _write_json(stats_path, stats)
            else:
                tc = TrainConfig(
                    model_type=cfg["model_type"],
                    model="minilm-l6",
                    loss=cfg["loss"],
                    learning_rate=a.lr,
                    batch_size=a.train_batch_size,
                    epochs=a.epochs,
                    max_steps=a.max_steps,
                    max_length=256,
                    seed=a.seed,
                    device=a.device,
                    held_out_fraction=a.held_out_fraction,
                    keep_initial=self.keep_initial(cfg),
                )
                stats = train_model(train_rows, self.docs, tc, model_dir)
                _write_json(stats_path, stats)
            t.update(steps=stats.get("steps"), final_loss=round(stats.get("final_loss", float("nan")), 4))
        result = {
            "config": cfg,
            "train": {
                k: stats.get(k)
                for k in ("examples", "steps", "epochs", "learning_rate", "final_loss", "loss_curve", "seconds", "device", "dtype")
            },
        }

        d = f"d{a.rerank_depth}"  # runs depend on the depth too
        held_path, test_path = model_dir / f"heldout-{d}.trec", model_dir / f"test-{self.eval_key}-{d}.trec"
        fusion_path = model_dir / "fusion.json"
        with self.timer.step(f"5 rerank {name}", f"(held-out {len(held_queries)} + test {len(test_queries)} queries)") as t:
            if held_path.exists() and test_path.exists():
                t["cached"] = True
                held_run, test_run = read_run(held_path), read_run(test_path)
                extra = read_run(model_dir / f"test-rerank-{self.eval_key}-{d}.trec") if cfg["model_type"] == "bi-encoder" else None
            elif cfg["model_type"] == "bi-encoder":
                held_run, _ = self.dense_runs(str(model_dir), model_dir, held_queries, None, name)
                test_run, extra = self.dense_runs(str(model_dir), model_dir, test_queries, bm25_test, name)
                write_run(extra, model_dir / f"test-rerank-{self.eval_key}-{d}.trec", name)
            else:
                reranker = load_reranker(str(model_dir), device=a.device, batch_size=a.rerank_batch_size, max_length=256)
                held_run = rerank_run(bm25_held, held_queries, self.docs, reranker, depth=a.rerank_depth)
                test_run = rerank_run(bm25_test, test_queries, self.docs, reranker, depth=a.rerank_depth)
                extra = None
            write_run(held_run, held_path, name)
            write_run(test_run, test_path, name)
        # Fusion weight of BM25, chosen on the held-out synthetic queries only.
        weight, grid = choose_fusion_weight(bm25_held, held_run, held_qrels)
        _write_json(fusion_path, {"weight_bm25": weight, "measure": "RR@10", "n_held_out": len(held_qrels), "grid": grid})
        result["fusion"] = {
            "weight_bm25": weight,
            "held_out_RR@10": {"model_alone": grid[0.0], "bm25_alone": grid[1.0], "fused": grid[weight]},
        }
        label = f"{name} (dense)" if cfg["model_type"] == "bi-encoder" else name
        result["systems"] = {label: test_run, f"{label} + BM25 (w={weight:.1f})": fuse_runs(bm25_test, test_run, weight)}
        if extra is not None:
            result["systems"][f"{name} (rerank BM25@{a.rerank_depth})"] = extra
        return result

    def _average_with_start(self, cfg: dict, model_dir: Path) -> dict | None:
        """``+wise`` when its twin without ``+wise`` is already trained: the twin's weights averaged with
        the starting ones. ``train_model(keep_initial=a)`` trains exactly the twin (same rows, seed and
        schedule) and then averages, so this saves one training run; ``None`` when there is no twin."""
        import shutil

        from inpars.encoding import METADATA_FILE, load_pretrained
        from inpars.models import resolve_model
        from inpars.train import interpolate_weights, snapshot_weights

        twin = parse_config("+".join(p for p in cfg["name"].split("+") if p != "wise"))
        twin_dir = self.data_dir / "models" / f"{twin['name']}-{_key(self.train_settings(twin))}"
        if not (twin_dir / "train_stats.json").exists():
            return None
        trained, tokenizer, _ = load_pretrained(cfg["model_type"], str(twin_dir))
        start, _, fresh = load_pretrained(cfg["model_type"], resolve_model("minilm-l6").name_or_path)
        interpolate_weights(trained, snapshot_weights(start, fresh), self.args.keep_initial)
        model_dir.mkdir(parents=True, exist_ok=True)
        trained.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        shutil.copy2(twin_dir / METADATA_FILE, model_dir / METADATA_FILE)
        return {**_read_json(twin_dir / "train_stats.json"), "keep_initial": self.args.keep_initial, "averaged_from": twin_dir.name}

    # ----------------------------------------------------------------- 6. baselines

    def zero_shot(self, held_queries, held_qrels, test_queries, bm25_test, bm25_held) -> dict:
        from inpars.runs import choose_fusion_weight, fuse_runs, read_run, write_run

        cache = self.work / "baselines" / "dense0-minilm-l6"
        test_path = cache / f"test-{_key(sorted(test_queries))}-d{self.first_depth}.trec"
        held_path = self.data_dir / f"dense0-heldout-d{self.first_depth}.trec"
        with self.timer.step("6 zero-shot dense", "(untrained MiniLM bi-encoder, exact search)") as t:
            if test_path.exists() and held_path.exists():
                t["cached"] = True
                dense_test, dense_held = read_run(test_path), read_run(held_path)
            else:
                dense_test, _ = self.dense_runs("minilm-l6", cache, test_queries, None, "dense0")
                dense_held, _ = self.dense_runs("minilm-l6", cache, held_queries, None, "dense0")
                write_run(dense_test, test_path, "dense0")
                write_run(dense_held, held_path, "dense0")
        weight, grid = choose_fusion_weight(bm25_held, dense_held, held_qrels)
        return {
            "fusion": {"weight_bm25": weight, "held_out_RR@10": {"model_alone": grid[0.0], "bm25_alone": grid[1.0], "fused": grid[weight]}},
            "systems": {"zero-shot dense": dense_test, f"zero-shot hybrid (w={weight:.1f})": fuse_runs(bm25_test, dense_test, weight)},
        }

    # ----------------------------------------------------------------- 7. evaluate

    def evaluate(self, systems: dict[str, dict], test_queries: dict[str, str]) -> dict:
        from inpars.corpus import read_qrels
        from inpars.evaluate import compare_to_baseline, evaluate

        # First and only read of the test judgements.
        qrels = read_qrels(self.data / "qrels" / "test.tsv")
        qrels = {q: r for q, r in qrels.items() if q in test_queries}
        results = {name: evaluate(run, qrels, MEASURES, exclude_queries=self.used_fewshot_ids) for name, run in systems.items()}
        evaluated = set(results["BM25"]["per_query"]["nDCG@10"])
        assert not evaluated & self.used_fewshot_ids, "a few-shot query id is among the evaluated queries"
        assert not evaluated & self.fewshot_ids, "a train (few-shot pool) query id is among the evaluated queries"
        vs_bm25 = compare_to_baseline(results, baseline="BM25", measure="nDCG@10", n_samples=self.args.bootstrap, seed=0)
        out = {}
        for name, r in results.items():
            row = {
                "nDCG@10": r["aggregate"]["nDCG@10"],
                "RR@10": r["aggregate"]["RR@10"],
                "R@100": r["aggregate"]["R@100"],
                "n_queries": r["n_queries"],
            }
            if name in vs_bm25:
                row["vs_bm25"] = vs_bm25[name]
            row["per_query_nDCG@10"] = r["per_query"]["nDCG@10"]
            out[name] = row
        return out


def format_results(results: dict) -> str:
    header = ["system", "nDCG@10", "Δ vs BM25 [95% CI]", "W/L/T", "R@100"]
    body = []
    for name, r in results.items():
        b = r.get("vs_bm25")
        delta = f"{b['mean_diff']:+.4f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]" if b else "-"
        wlt = f"{b['wins']}/{b['losses']}/{b['ties']}" if b else "-"
        body.append([name, f"{r['nDCG@10']:.4f}", delta, wlt, f"{r['R@100']:.4f}"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def targets(results: dict, trained: list[str], fused: list[str], hybrid0: str | None, n_samples: int = 1000) -> list[dict]:
    """The two targets: a trained model alone beats BM25; a fused model beats the zero-shot hybrid."""
    bm25 = results["BM25"]["nDCG@10"]
    out = []
    best_alone = max(trained, key=lambda n: results[n]["nDCG@10"], default=None)
    if best_alone:
        v = results[best_alone]["nDCG@10"]
        b = results[best_alone]["vs_bm25"]
        out.append(
            {
                "target": f"trained model alone > BM25 ({bm25:.4f}; reference 0.676)",
                "best": best_alone,
                "value": v,
                "met": v > bm25,
                "ci": "above 0" if b["ci_low"] > 0 else "below 0" if b["ci_high"] < 0 else "includes 0",
            }
        )
    best_fused = max(fused, key=lambda n: results[n]["nDCG@10"], default=None)
    if best_fused and hybrid0:
        from inpars.evaluate import paired_bootstrap

        v, h = results[best_fused]["nDCG@10"], results[hybrid0]["nDCG@10"]
        b = paired_bootstrap(results[hybrid0]["per_query_nDCG@10"], results[best_fused]["per_query_nDCG@10"], n_samples=n_samples, seed=0)
        out.append(
            {
                "target": f"fused trained model > zero-shot hybrid ({h:.4f}; the guide's: {HYBRID_REFERENCE})",
                "best": best_fused,
                "value": v,
                "met": v > h,
                "vs_hybrid": {k: b[k] for k in ("mean_diff", "ci_low", "ci_high", "wins", "losses", "ties")},
                "ci": "above 0" if b["ci_low"] > 0 else "below 0" if b["ci_high"] < 0 else "includes 0",
            }
        )
    return out


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=str(SCIFACT), help="BEIR SciFact folder (default: ../shared/data/scifact)")
    g.add_argument("--work-dir", default=str(DEFAULT_WORK), help="cache of every step (resumable)")
    g.add_argument(
        "--output",
        default=None,
        help="results JSON (default: benchmarks/results/quality_scifact.json, quality_scifact.smoke.json for capped runs)",
    )
    g.add_argument("--eval-queries", type=int, default=None, help="SMOKE RUNS ONLY: evaluate on a seeded sample of N test queries")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (generation, training, scoring)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("generation")
    g.add_argument(
        "--prompt", default="promptagator-scifact", help="promptagator-scifact (few-shot from the train split) | inpars | a YAML path"
    )
    g.add_argument("--model", default="smollm2-135m", help="generator: packaged alias, HF id or local path")
    g.add_argument("--n-docs", type=int, default=None, help="documents to generate from (default: all 5,183)")
    g.add_argument("--queries-per-doc", type=int, default=1, help="K rounds over the documents, seeds seed..seed+K-1")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--n-examples", type=int, default=3, help="few-shot examples per prompt (promptagator)")
    g.add_argument("--batch-size", type=int, default=16, help="generation batch")
    g.add_argument("--chunk-docs", type=int, default=256, help="documents per cached generation chunk")
    g.add_argument("--generated", default=None, help="reuse generated rows (JSONL) made elsewhere instead of generating")
    g.add_argument("--generate-only", action="store_true", help="stop after generation (e.g. on the GPU machine)")
    g = p.add_argument_group("filter and negatives")
    g.add_argument("--keep-fraction", type=float, default=0.7, help="scores filter: keep the best fraction")
    g.add_argument("--keep-top-k", type=int, default=None, help="scores filter: keep the best k instead")
    g.add_argument("--consistency-top-k", type=int, default=1, help="consistency filter: source doc in BM25's top k")
    g.add_argument("--neg-depth", type=int, default=100)
    g.add_argument("--n-negatives", type=int, default=3)
    g.add_argument("--deep-skip-top", type=int, default=10, help="+deep: skip BM25 ranks 1..N")
    g = p.add_argument_group("training and reranking")
    g.add_argument(
        "--configs", default="ce-lce,ce-bce,bi", help=f"comma-separated; models {', '.join(MODELS)}; levers +{', +'.join(LEVERS)}"
    )
    g.add_argument("--epochs", type=float, default=2.0)
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--train-batch-size", type=int, default=16, help="groups (query + positive + negatives) per step")
    g.add_argument("--lr", type=float, default=None, help="default: 3e-5")
    g.add_argument("--keep-initial", type=float, default=0.5, help="+wise: share of the starting weights averaged back in (WiSE-FT)")
    g.add_argument("--held-out-fraction", type=float, default=0.1, help="synthetic queries kept aside for the fusion weight")
    g.add_argument("--rerank-depth", type=int, default=100)
    g.add_argument("--rerank-batch-size", type=int, default=32)
    g.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = Path(args.data)
    if scifact_missing(data, ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"), who="quality_scifact"):
        return 0
    configs = [parse_config(c.strip()) for c in args.configs.split(",") if c.strip()]
    started = time.perf_counter()
    bench = Benchmark(args)
    n_test = len(bench._test_query_ids())
    # Anything short of the full corpus, all test queries and depth 100 is a smoke run: say so loudly.
    # (Queries from fewer documents, on the full corpus and test set, is a REDUCED run: labelled below.)
    smoke = (
        bool(args.eval_queries and args.eval_queries < n_test)
        or len(bench.docs) != 5183
        or n_test != FULL_TEST_QUERIES
        or args.rerank_depth < 100
    )
    print(f"== quality_scifact: {'SMOKE RUN' if smoke else 'run'} on {data} ==", flush=True)
    fewshot = bench.fewshot_pool()  # built for any prompt: its (train) ids are kept out of evaluation either way
    rows = bench.generate(fewshot)
    # The documents queries were generated from (also right for --generated files made elsewhere).
    n_sources = len({str(r["doc_id"]) for r in rows})
    label = "SMOKE RUN" if smoke else "FULL RUN" if n_sources == len(bench.docs) else "REDUCED RUN"
    scope = (
        f"queries from {n_sources} of {len(bench.docs)} docs, "
        f"{min(args.eval_queries or n_test, n_test)} of {n_test} test queries, rerank depth {args.rerank_depth}"
    )
    print(f"== quality_scifact: {label} ({scope}) ==", flush=True)
    from inpars.generate import fewshot_query_ids

    bench.used_fewshot_ids = fewshot_query_ids(rows)
    if args.generate_only:
        print(bench.timer.table())
        print(f"generated rows: {bench.gen_dir / 'generated.jsonl'}")
        return 0
    kept_by = bench.filter_variants(rows)
    held_queries, held_qrels = bench.held_out(kept_by)
    for cfg in configs:  # mine every variant the configurations need before any test query is read
        bench.negatives(cfg["filter"], kept_by[cfg["filter"]], cfg["negatives"])

    # --- from here on the test queries' text is used (reranking); their qrels only in evaluate()
    test_queries = bench.test_queries()
    with bench.timer.step("6 BM25", f"(test {len(test_queries)} + held-out {len(held_queries)} queries, top {bench.first_depth})"):
        bm25_test = bench.bm25_run("test", test_queries, bench.first_depth)
        bm25_held = bench.bm25_run("heldout", held_queries, bench.first_depth)
    systems: dict[str, dict] = {"BM25": bm25_test}
    fusion: dict[str, dict] = {}
    zs = bench.zero_shot(held_queries, held_qrels, test_queries, bm25_test, bm25_held)
    systems.update(zs["systems"])
    fusion["zero-shot dense"] = zs["fusion"]
    hybrid0 = next(n for n in zs["systems"] if n.startswith("zero-shot hybrid"))
    trained, fused, per_config = [], [], {}
    for cfg in configs:
        res = bench.run_config(cfg, kept_by, held_queries, held_qrels, test_queries, bm25_test, bm25_held)
        names = list(res["systems"])
        trained += [n for n in names if "+ BM25" not in n]
        fused += [n for n in names if "+ BM25" in n]
        systems.update(res.pop("systems"))
        per_config[cfg["name"]] = res
        fusion[cfg["name"]] = res["fusion"]

    with bench.timer.step("7 evaluate", f"({len(systems)} systems, bootstrap {args.bootstrap})"):
        results = bench.evaluate(systems, test_queries)
    goals = targets(results, trained, fused, hybrid0, args.bootstrap)
    total = time.perf_counter() - started

    print()
    print(f"== quality_scifact: {label} — {scope}; nDCG@10 on {results['BM25']['n_queries']} queries ==")
    if smoke:
        print("   (capped run: the numbers prove the pipeline runs, they do not measure the method)")
    elif label == "REDUCED RUN":
        print("   (full corpus and test set, but synthetic queries from a subset of the documents)")
    print(format_results(results))
    print()
    print("fusion weight of BM25 (chosen on held-out synthetic queries, RR@10):")
    for name, f in fusion.items():
        h = f["held_out_RR@10"]
        print(
            f"  {name:28s} w={f['weight_bm25']:.1f}  held-out RR@10: model {h['model_alone']:.3f}, BM25 {h['bm25_alone']:.3f}, fused {h['fused']:.3f}"
        )
    print("targets:")
    for g_ in goals:
        versus = "the hybrid" if "vs_hybrid" in g_ else "BM25"
        sig = f"; Δ vs {versus} 95% CI {g_['ci']}" if "ci" in g_ else ""
        print(f"  {'MET    ' if g_['met'] else 'NOT MET'}  {g_['target']}: best {g_['best']} = {g_['value']:.4f}{sig}")
    print()
    print(bench.timer.table())
    print(f"total {total:.0f} s")

    suffix = {"FULL RUN": ".json", "REDUCED RUN": ".reduced.json", "SMOKE RUN": ".smoke.json"}[label]
    output = Path(args.output) if args.output else DEFAULT_OUTPUT.with_suffix(suffix)
    _write_json(
        output,
        {
            "label": label,
            "scope": scope,
            "argv": sys.argv[1:],
            "settings": {
                "generation": bench.gen_settings(),
                "data": bench.data_settings(),
                "configs": [c["name"] for c in configs],
                "epochs": args.epochs,
                "max_steps": args.max_steps,
                "train_batch_size": args.train_batch_size,
                "lr": args.lr,
                "rerank_depth": args.rerank_depth,
                "device": args.device,
            },
            "generated_rows": len(rows),
            "filter": bench.filter_summary,
            "held_out_queries": len(held_queries),
            "fewshot": {
                "pool": len(bench.fewshot_ids),
                "used_in_prompts": len(bench.used_fewshot_ids),
                "excluded_from_eval": sorted(bench.used_fewshot_ids & set(test_queries)),
            },
            "results": {n: {k: v for k, v in r.items() if k != "per_query_nDCG@10"} for n, r in results.items()},
            "per_query_nDCG@10": {n: r["per_query_nDCG@10"] for n, r in results.items()},
            "fusion": fusion,
            "configs": per_config,
            "targets": goals,
            "timings": bench.timer.steps,
            "total_seconds": round(total, 1),
        },
    )
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
