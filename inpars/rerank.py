"""Reranking: a loaded model scoring (query, document) pairs, the first stage it reranks, and the
fusion weight chosen on held-out synthetic queries.

:class:`Reranker` scores the three model families of :mod:`inpars.encoding` behind one interface
(a bi-encoder encodes each distinct text once, however many pairs it appears in). Speed comes from doing
less work, not from approximations: pairs are tokenized once, sorted by length so that each batch is
padded only to its own longest pair, scored under ``torch.inference_mode()`` in bf16 where the hardware
has it, and put back in input order. On a GPU the host pads the next batches (into pinned memory) while
the device computes the queued ones.

Run arithmetic (top k, tail, fusion, the weight grid) and TREC files are :mod:`inpars.runs`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .corpus import Document
from .devices import resolve_device, resolve_dtype
from .encoding import (
    MODEL_TYPES,
    attention_backends,
    collate,
    encode_pairs,
    encode_texts,
    guess_model_type,
    load_pretrained,
    mean_pool,
    monot5_scores,
    pad_multiple,
    read_model_metadata,
    relevance_token_ids,
)
from .errors import ConfigError, InputError
from .models import resolve_model
from .runs import Run, choose_fusion_weight, top_docs

if TYPE_CHECKING:
    from .bm25 import BM25Index

FIRST_STAGE_DEPTH = 1000  # first-stage hits kept per query; the top `depth` of them are rescored


# --------------------------------------------------------------------------- the reranker


@dataclass
class Reranker:
    """A loaded model that scores (query, document text) pairs. Build it with :func:`load_reranker`."""

    model: Any
    tokenizer: Any
    model_type: str
    device: torch.device
    dtype: torch.dtype
    batch_size: int = 32
    max_length: int = 256
    relevance_tokens: tuple[str, str] = ("true", "false")
    source: str = ""
    progress: bool = False  # a tqdm bar over batches (long reranking jobs)
    _relevance_ids: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.model_type == "monot5":
            self._relevance_ids = relevance_token_ids(self.tokenizer, self.relevance_tokens)

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of ``(query, document)`` pairs, in input order; higher is more relevant."""
        if not pairs:
            return []
        if self.model_type == "bi-encoder":
            return self._score_bi(pairs)
        features = encode_pairs(self.tokenizer, self.model_type, [p[0] for p in pairs], [p[1] for p in pairs], self.max_length)
        if self.model_type == "monot5":
            start = self.model.config.decoder_start_token_id
            true_id, false_id = self._relevance_ids  # type: ignore[misc]

            def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                dec = torch.full((batch["input_ids"].shape[0], 1), start, dtype=torch.long, device=self.device)
                logits = self.model(**batch, decoder_input_ids=dec).logits
                return monot5_scores(logits, true_id, false_id)
        else:

            def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                return self.model(**batch).logits[:, 0].float()

        return self._run_sorted(features, forward)

    def _score_bi(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        # Encode each distinct query and document once: a reranking depth of 100 repeats each query 100x.
        q_index = {q: i for i, q in enumerate(dict.fromkeys(p[0] for p in pairs))}
        d_index = {d: i for i, d in enumerate(dict.fromkeys(p[1] for p in pairs))}
        q_emb = self.encode(list(q_index))
        d_emb = self.encode(list(d_index))
        qi = torch.tensor([q_index[p[0]] for p in pairs])
        di = torch.tensor([d_index[p[1]] for p in pairs])
        return (q_emb[qi] * d_emb[di]).sum(-1).tolist()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings (bi-encoder), fp32 on the CPU, in input order."""
        if self.model_type != "bi-encoder":
            raise ConfigError(f"encode() is for bi-encoders; this model is a {self.model_type}")
        features = encode_texts(self.tokenizer, texts, self.max_length)

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            hidden = self.model(**batch).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1)

        return torch.tensor(self._run_sorted(features, forward))

    def batches(self, features: list[dict[str, list[int]]]) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """``(indexes, padded batch on the device)``, longest first: batches of similar length waste
        little on padding, and an out-of-memory error (the longest batch) shows up at once."""
        order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        multiple = pad_multiple(self.device, self.max_length)
        starts = range(0, len(order), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="rerank", unit="batch")
        for s in starts:
            idx = order[s : s + self.batch_size]
            yield idx, collate([features[i] for i in idx], pad_id, self.device, multiple_of=multiple)

    def _run_sorted(self, features: list[dict[str, list[int]]], forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> list:
        results: list = [None] * len(features)
        queued: collections.deque[tuple[list[int], torch.Tensor]] = collections.deque()

        def collect(keep: int) -> None:
            while len(queued) > keep:
                idx, out = queued.popleft()
                for i, value in zip(idx, out.cpu().tolist()):
                    results[i] = value

        with torch.inference_mode(), attention_backends(self.device):
            for idx, batch in self.batches(features):
                queued.append((idx, forward(batch)))
                # Read results IN_FLIGHT batches behind: on a GPU, ``.cpu()`` waits for the device, and
                # the batches still queued keep it busy while the host pads the next one.
                collect(keep=IN_FLIGHT)
            collect(keep=0)
        return results


IN_FLIGHT = 2  # batches queued on the device beyond the one being read back (only outputs are held)


def load_reranker(
    path_or_name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 32,
    max_length: int = 256,
    model_type: str | None = None,
    relevance_tokens: tuple[str, str] | None = None,
    progress: bool = False,
) -> Reranker:
    """Load a reranker from a folder written by :func:`inpars.train.train_model`, any HF folder,
    an HF hub id (e.g. ``castorini/monot5-base-msmarco-10k``) or a packaged alias (``minilm-l6``).

    The type is forced with ``model_type``, or else :func:`guess_model_type` (the folder's
    ``inpars_model.json`` first, then the model config); the metadata also gives monoT5's relevance tokens.
    """
    source = resolve_model(path_or_name)
    if source.gguf_file:
        raise ConfigError(f"{path_or_name!r} is a GGUF generator, not a reranker")
    where = source.name_or_path
    meta = read_model_metadata(Path(where)) or {}
    kind = model_type or guess_model_type(where)
    if kind not in MODEL_TYPES:
        raise ConfigError(f"unknown model_type {kind!r} (one of {', '.join(MODEL_TYPES)})")
    tokens = tuple(relevance_tokens or meta.get("relevance_tokens") or ("true", "false"))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model, tokenizer, _ = load_pretrained(kind, where)
    # Inference only, so the weights themselves can be bf16 (no autocast casts on every op).
    model = model.to(device=dev, dtype=dt).eval()
    return Reranker(
        model,
        tokenizer,
        kind,
        dev,
        dt,
        batch_size=batch_size,
        max_length=max_length,
        relevance_tokens=tokens,
        source=source.identity,
        progress=progress,
    )  # type: ignore[arg-type]


# --------------------------------------------------------------------------- first stage, reranking, fusion weight


def first_stage(index: BM25Index, queries: Mapping[str, str], depth: int) -> Run:
    """The first stage of a reranking run: ``index``'s (BM25) top ``max(depth, FIRST_STAGE_DEPTH)`` per query.

    Retrieved deeper than reranked, so recall measures (R@100, R@1000) stay meaningful once the
    reranked head is put back on the first stage's tail (:func:`inpars.runs.with_tail`).
    """
    if not queries:
        return {}
    return index.search(queries, max(depth, FIRST_STAGE_DEPTH))


def rerank_run(
    run: Mapping[str, Mapping[str, float]],
    queries: Mapping[str, str],
    docs: Mapping[str, Document],
    reranker: Reranker,
    *,
    depth: int = 100,
) -> Run:
    """Rescore the top ``depth`` documents of each query of ``run`` with ``reranker``.

    Documents ranked below ``depth`` by the first stage are *dropped* from the output run (a reranked
    run holds only reranked scores; mixing them with first-stage scores would rank incomparable
    numbers). Every id is checked before any model work, so bad input fails fast and names the id.
    """
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    chosen: dict[str, list[str]] = {}
    for qid, scores in run.items():
        if qid not in queries:
            raise InputError(f"run query id {qid!r} is not in the queries")
        chosen[qid] = top_docs(scores, depth)
        for did in chosen[qid]:
            if did not in docs:
                raise InputError(f"run document id {did!r} (query {qid!r}) is not in the corpus")
    # One call over all queries: the reranker sorts the pairs by length across the whole set.
    pairs = [(queries[qid], docs[did].contents) for qid, dids in chosen.items() for did in dids]
    scores = iter(reranker.score(pairs))
    return {qid: {did: next(scores) for did in dids} for qid, dids in chosen.items()}


FUSION_MEASURE = "RR@10"  # what the fusion weight maximises on held-out synthetic queries


def fusion_weight_on_held_out(
    held_out: Sequence[Mapping[str, Any]], index: BM25Index, docs: Mapping[str, Document], reranker: Reranker, depth: int
) -> dict[str, Any]:
    """The weight of the first stage when fusing it with the reranked run, chosen on held-out
    *synthetic* queries, never on evaluation queries.

    ``held_out`` are negatives rows (``query_id``, ``query``, ``pos_doc_id``) kept out of training; each
    query's source document is its one relevant document. ``index`` retrieves the top ``depth`` and
    ``reranker`` rescores them: the same head that the rerank stage fuses. Returns
    ``{"weight", "measure", "n_queries", "grid": {weight: value}}``, or ``{"weight": None, "reason"}``
    without held-out queries.
    """
    if not held_out:
        return {"weight": None, "reason": "no held-out synthetic queries"}
    queries = {t["query_id"]: t["query"] for t in held_out}
    qrels = {t["query_id"]: {t["pos_doc_id"]: 1} for t in held_out}
    first = index.search(queries, depth)
    second = rerank_run(first, queries, docs, reranker, depth=depth)
    weight, scores = choose_fusion_weight(first, second, qrels, measure=FUSION_MEASURE)
    return {"weight": weight, "measure": FUSION_MEASURE, "n_queries": len(queries), "grid": scores}
