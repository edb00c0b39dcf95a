"""InPars: synthetic queries from a language model -> filtered -> BM25 negatives -> trained reranker.

The public API, imported lazily (``import inpars`` stays cheap; torch loads on first use)::

    import inpars
    docs = inpars.read_corpus("corpus.jsonl")
    rows = inpars.generate_queries(inpars.sample_documents(docs, 100, seed=0), backend, inpars.load_prompt("inpars"))
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# evaluate is not exported by name: ``inpars.evaluate`` is the submodule (``from inpars.evaluate import evaluate``).
_EXPORTS = {
    "Document": "corpus",
    "read_corpus": "corpus",
    "read_queries": "corpus",
    "read_qrels": "corpus",
    "read_jsonl": "corpus",
    "write_jsonl": "corpus",
    "read_run": "runs",
    "write_run": "runs",
    "format_run": "runs",
    "fuse_runs": "runs",
    "choose_fusion_weight": "runs",
    "read_query_rows": "queryfiles",
    "iter_query_rows": "queryfiles",
    "PipelineConfig": "config",
    "InParsError": "errors",
    "InputError": "errors",
    "ConfigError": "errors",
    "EXIT_PERMANENT": "errors",
    "load_prompt": "prompts",
    "get_backend": "backends",
    "sample_documents": "generate",
    "generate_queries": "generate",
    "filter_queries": "filter",
    "get_index": "bm25",
    "build_index": "bm25",
    "load_index": "bm25",
    "DocumentStore": "store",
    "write_store": "store",
    "mine_negatives": "negatives",
    "train_model": "train",
    "load_reranker": "rerank",
    "rerank_run": "rerank",
    "publish_dataset": "publish",
    "Run": "workspace",  # a run in a workspace (a TREC run is a plain dict: inpars.runs.Run)
    "run_stage": "workers",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'inpars' has no attribute {name!r}")
