"""The generate stage as a library function: documents in, one synthetic-query row per document out.

A row depends only on its document, the prompt, the model and the seed, never on which other
documents share the call: the stage worker checkpoints in chunks and shards the corpus, and reruns
must reproduce the same rows. Rows keep the published InPars field names (``query``, ``doc_id``,
``doc_text``, ``log_probs``, ``prompt_text``, ``fewshot_examples``) so existing data and tools
interoperate; see docs/DESIGN.md for the schema.

Rows are bounded: a document longer than :data:`DOC_TEXT_MAX_CHARS` characters is cut to that size
before the prompt is built and in the row's ``doc_text``, and the row says so with
``"doc_text_truncated": true`` (absent otherwise). A 50 MB document thus gives a 16 KB row and never
reaches the tokenizer whole.
"""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence

from .backends.base import GenerationBackend
from .corpus import Document
from .prompts import Prompt
from .store import DocumentStore

# The most characters of a document that a row carries (and a prompt is built from). 16 384 characters
# are about 4 000 tokens: far more than any prompt keeps (generate.max_doc_tokens, 256 by default),
# so the generator sees the same text as before; whole for more than 99% of BEIR documents (MS MARCO
# passages average ~350 characters); and a row stays near 20 KB with its prompt.
DOC_TEXT_MAX_CHARS = 16_384


def bound_document(doc: Document, max_chars: int = DOC_TEXT_MAX_CHARS) -> tuple[Document, bool]:
    """``(doc cut so that its contents are the first max_chars characters of the full contents, whether it was cut)``."""
    length = len(doc.title) + 2 + len(doc.text) if doc.title else len(doc.text)  # len(doc.contents), not built
    if length <= max_chars:
        return doc, False
    room = max_chars - len(doc.title) - 2  # contents = "<title>. <text>"
    if doc.title and room > 0:
        return Document(doc.doc_id, doc.title, doc.text[:room]), True
    return Document(doc.doc_id, "", doc.contents[:max_chars]), True


def sample_positions(n_total: int, n: int | None, seed: int) -> Sequence[int]:
    """The positions :func:`sample_documents` picks from ``n_total`` documents, without the documents.

    ``random.sample`` and ``random.shuffle`` choose positions from the length alone, so sampling
    ``range(n_total)`` picks the same positions as sampling the list of documents. A full shuffle
    returns a compact ``array('q')`` (8 bytes a position).
    """
    rng = random.Random(seed)
    if n is None or n >= n_total:
        pool = array("q", range(n_total))
        rng.shuffle(pool)
        return pool
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return rng.sample(range(n_total), n)


def sample_documents(docs: Mapping[str, Document] | Sequence[Document], n: int | None, seed: int) -> list[Document]:
    """``n`` documents drawn at random (all of them, shuffled, when ``n`` is None or too large).

    Deterministic: the same documents in the same order give the same sample and order for a seed,
    whether they come as a list, a dict or a :class:`~inpars.store.DocumentStore` (which reads only
    the sampled rows). A worker that wants its shard only takes :func:`sample_positions` and reads
    those rows (``store.documents(positions)``).
    """
    if isinstance(docs, DocumentStore):
        return docs.take(sample_positions(len(docs), n, seed))
    pool = list(docs.values()) if isinstance(docs, Mapping) else list(docs)
    return [pool[i] for i in sample_positions(len(pool), n, seed)]


def generate_queries(
    docs: Sequence[Document],
    backend: GenerationBackend,
    prompt: Prompt,
    *,
    max_new_tokens: int = 32,
    max_doc_tokens: int = 256,
    max_example_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """One generated-query row per document, in input order.

    ``batch_size`` is the number of prompts per forward pass for local backends; documents are sent
    to the backend in calls of a few batches (so it can sort them by length) and ``on_progress`` is
    called with the number of documents finished after each call. An empty generation still yields a
    row (``query == ""``): the filter stage drops it with a reason, nothing is dropped silently here.
    """
    backend.batch_size = max(1, int(batch_size))
    bounded = [bound_document(doc) for doc in docs]
    built = [
        prompt.build(doc, truncate=backend.truncate, max_doc_tokens=max_doc_tokens, max_example_tokens=max_example_tokens, seed=seed)
        for doc, _ in bounded
    ]
    # The shared start of the prompts (the few-shot part) lets the backend reuse its KV cache.
    prefix = os.path.commonprefix([p.prefix for p in built]) if built else ""
    rows: list[dict] = []
    per_call = max(1, batch_size) * 4
    for start in range(0, len(docs), per_call):
        part = built[start : start + per_call]
        gens = backend.generate(
            [p.text for p in part],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            prefix=prefix or None,
        )
        if len(gens) != len(part):
            raise RuntimeError(f"backend {backend.name!r} returned {len(gens)} generations for {len(part)} prompts")
        for (doc, cut), pt, gen in zip(bounded[start : start + per_call], part, gens):
            row = {"query": gen.text, "doc_id": doc.doc_id, "doc_text": doc.contents}
            if cut:
                row["doc_text_truncated"] = True
            row |= {
                "log_probs": [float(x) for x in gen.log_probs],
                "prompt_text": pt.text,
                "fewshot_examples": pt.fewshot_examples,
                "model": backend.model_identity,
                "prompt": prompt.name,
                "seed": seed,
                "query_id": f"{doc.doc_id}-{seed}",
                "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens},
            }
            rows.append(row)
        if on_progress is not None:
            on_progress(len(rows))
    return rows


def fewshot_query_ids(rows: Iterable[Mapping]) -> set[str]:
    """Ids of the queries shown to the generator as few-shot examples (in the rows' ``fewshot_examples``):
    never evaluated, since the generator saw them (no leakage)."""
    return {str(ex["query_id"]) for r in rows for ex in r.get("fewshot_examples") or [] if ex.get("query_id") is not None}


__all__ = ["DOC_TEXT_MAX_CHARS", "bound_document", "fewshot_query_ids", "generate_queries", "sample_documents", "sample_positions"]
