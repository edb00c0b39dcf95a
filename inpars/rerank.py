"""Scoring (query, document) pairs with a trained reranker, reranking runs, and fusing runs.

Three model families share one :class:`Reranker` interface:

* ``cross-encoder`` — a sequence-classification model with one output (e.g. MiniLM + a head);
  the score is that logit.
* ``monot5`` — a T5 seq2seq model reading ``Query: q Document: d Relevant:``; the score is
  ``log P(true)`` from a softmax over the two relevance tokens at the first decoder step.
* ``bi-encoder`` — a bare encoder with mean pooling; the score is the cosine of the query and
  document embeddings (each text is encoded once, however many pairs it appears in).

Speed comes from doing less work, not from approximations: pairs are tokenized once, sorted by
length so that each batch is padded only to its own longest pair, scored under
``torch.inference_mode()`` in bf16 where the hardware has it, and put back in input order. On a GPU the
host pads the next batches (into pinned memory) while the device computes the queued ones.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpus import Document
from .devices import resolve_device, resolve_dtype
from .errors import ConfigError, InputError
from .models import resolve_model

log = logging.getLogger(__name__)

MODEL_TYPES = ("cross-encoder", "monot5", "bi-encoder")
METADATA_FILE = "inpars_model.json"  # written by inpars.train next to the HF model files
T5_MODEL_TYPES = ("t5", "mt5", "umt5", "byt5")
Run = dict[str, dict[str, float]]


# --------------------------------------------------------------------------- pair encoding (shared with training)


def monot5_input(query: str, document: str) -> str:
    return f"Query: {query} Document: {document} Relevant:"


def relevance_token_ids(tokenizer: Any, tokens: Sequence[str]) -> tuple[int, int]:
    """The ids of the (relevant, non-relevant) target words, looked up in this tokenizer.

    Each word must be exactly one token: the score is read at the first decoder step, so a word split
    into pieces would be scored by its first piece only (and two words can share that piece).
    """
    if len(tokens) != 2:
        raise ConfigError(f"relevance_tokens needs two words (relevant, non-relevant), got {list(tokens)!r}")
    ids = []
    for word in tokens:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces)
            raise ConfigError(
                f"relevance token {word!r} is {len(pieces)} tokens {shown!r} for this tokenizer; "
                "pick words that are single tokens (monoT5: true/false, FLAN-T5: yes/no)"
            )
        ids.append(pieces[0])
    if ids[0] == ids[1]:
        raise ConfigError(f"relevance tokens {list(tokens)!r} map to the same token id {ids[0]}")
    return ids[0], ids[1]


def encode_pairs(
    tokenizer: Any, model_type: str, queries: Sequence[str], docs: Sequence[str], max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenize (query, document) pairs, unpadded, each at most ``max_length`` tokens.

    Each distinct query and document is tokenized once and the pairs are assembled from the pieces: a
    reranking depth of 100 repeats every query 100 times, and across queries the same documents recur,
    so tokenizing every pair (what a plain loop does) repeats most of the work.

    Both kinds truncate "longest first" exactly as the tokenizers library does (the document, unless
    the query is the longer), so a long query cannot push the document out. monoT5 inputs keep their
    trailing ``Relevant:`` (which the model was trained to answer after) whatever is cut.
    """
    if model_type == "monot5":
        suffix = tokenizer(" Relevant:", add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        budget = max_length - len(suffix) - len(eos)
        if budget < 8:
            raise ConfigError(f"max_length {max_length} is too short for a monoT5 input")
        q_ids = _tokenize_distinct(tokenizer, queries, "Query: {}")
        d_ids = _tokenize_distinct(tokenizer, docs, " Document: {}")
        out = []
        for q, d in zip(queries, docs):
            a, b = q_ids[q], d_ids[d]
            nq, nd = _longest_first(len(a), len(b), budget)
            out.append({"input_ids": a[:nq] + b[:nd] + suffix + eos})
        return out
    template = _pair_template(tokenizer)
    if template is None:  # a slow (Python) tokenizer: no sequence ids to learn the layout from
        enc = tokenizer(list(queries), list(docs), truncation="longest_first", max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(queries))]
    n_special = sum(1 for piece in template if piece[0] == "special")
    budget = max_length - n_special
    if budget < 2:
        raise ConfigError(f"max_length {max_length} is too short for a (query, document) pair")
    q_ids, d_ids = _tokenize_distinct(tokenizer, queries), _tokenize_distinct(tokenizer, docs)
    with_types = "token_type_ids" in tokenizer.model_input_names  # what the tokenizer itself returns
    out = []
    for q, d in zip(queries, docs):
        a, b = q_ids[q], d_ids[d]
        nq, nd = _longest_first(len(a), len(b), budget)
        segments = (a[:nq], b[:nd])
        ids: list[int] = []
        types: list[int] = []
        for kind, value, type_id in template:
            piece = [value] if kind == "special" else segments[value]
            ids += piece
            types += [type_id] * len(piece)
        out.append({"input_ids": ids, "token_type_ids": types} if with_types else {"input_ids": ids})
    return out


def _tokenize_distinct(tokenizer: Any, texts: Sequence[str], form: str = "{}") -> dict[str, list[int]]:
    """Token ids (no special tokens) of each distinct text, tokenized in one batch call."""
    distinct = list(dict.fromkeys(texts))
    # verbose=False: texts longer than the model takes are expected here; pairs are cut when assembled.
    ids = tokenizer([form.format(t) for t in distinct], add_special_tokens=False, verbose=False)["input_ids"] if distinct else []
    return dict(zip(distinct, ids))


def _pair_template(tokenizer: Any) -> list[tuple[str, int, int]] | None:
    """The tokenizer's own layout of a pair, learnt from one encoded example: ``("special", id, type)``
    and ``("segment", 0 or 1, type)`` in order (BERT: [CLS] q [SEP] d [SEP]; RoBERTa: <s> q </s></s> d </s>).
    ``None`` for slow tokenizers, which cannot say which token came from which text."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer("query", "document")
    types = enc.get("token_type_ids") or [0] * len(enc["input_ids"])
    template: list[tuple[str, int, int]] = []
    for token, seq, type_id in zip(enc["input_ids"], enc.sequence_ids(), types):
        if seq is None:
            template.append(("special", token, type_id))
        elif not template or template[-1][:2] != ("segment", seq):
            template.append(("segment", seq, type_id))
    return template


def _longest_first(nq: int, nd: int, budget: int) -> tuple[int, int]:
    """Lengths to keep of two segments so they fit ``budget``: the tokenizers library's ``longest_first``
    (the longer is cut down to the shorter; if both must be cut, the shorter gets ``budget // 2``)."""
    if nq + nd <= budget:
        return nq, nd
    n1, n2 = min(nq, nd), max(nq, nd)
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    return (n2, n1) if nq > nd else (n1, n2)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize single texts (bi-encoder side), unpadded."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def collate(
    features: Sequence[Mapping[str, list[int]]], pad_id: int, device: torch.device | None = None, multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest member (dynamic padding), rounded up to ``multiple_of``
    (fewer distinct shapes: GPU kernels that are planned per shape are planned less often)."""
    lengths = np.fromiter((len(f["input_ids"]) for f in features), dtype=np.int64, count=len(features))
    width = -(-int(lengths.max()) // multiple_of) * multiple_of
    # One flat copy into a numpy buffer, not a tensor per row: on a GPU the host side is the bottleneck.
    mask = np.arange(width)[None, :] < lengths[:, None]

    # For CUDA the buffers are pinned and copied without blocking: a plain copy waits for the GPU to
    # finish the batches already queued, so padding the next batch could not overlap their compute.
    pinned = device is not None and device.type == "cuda"

    def padded(values: np.ndarray | int, pad: int) -> torch.Tensor:
        out = torch.full(mask.shape, pad, dtype=torch.int64, pin_memory=pinned)
        out.numpy()[mask] = values
        return out

    def flat(key: str) -> np.ndarray:
        return np.fromiter(itertools.chain.from_iterable(f[key] for f in features), dtype=np.int64, count=int(lengths.sum()))

    batch = {"input_ids": padded(flat("input_ids"), pad_id), "attention_mask": padded(1, 0)}
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = padded(flat("token_type_ids"), 0)
    if device is not None:
        batch = {k: v.to(device, non_blocking=pinned) for k, v in batch.items()}
    return batch


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token embeddings that are not padding (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def monot5_scores(logits: torch.Tensor, true_id: int, false_id: int) -> torch.Tensor:
    """log P(true) from a softmax over just the (true, false) logits at the first decoder step."""
    pair = logits[:, 0, [true_id, false_id]].float()
    return torch.log_softmax(pair, dim=-1)[:, 0]


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

        with torch.inference_mode(), _attention_backends(self.device):
            for idx, batch in self.batches(features):
                queued.append((idx, forward(batch)))
                # Read results IN_FLIGHT batches behind: on a GPU, ``.cpu()`` waits for the device, and
                # the batches still queued keep it busy while the host pads the next one.
                collect(keep=IN_FLIGHT)
            collect(keep=0)
        return results


IN_FLIGHT = 2  # batches queued on the device beyond the one being read back (only outputs are held)


PAD_MULTIPLE = 16  # CUDA batch widths are rounded up to this: at most max_length/16 distinct shapes


def pad_multiple(device: torch.device, max_length: int) -> int:
    """What batch widths are rounded up to: 1 on CPU (every token costs), 16 on CUDA (see
    :func:`_attention_backends`), ``max_length`` on XLA/TPU (it compiles one graph per shape)."""
    if device.type == "xla":
        return max_length
    return PAD_MULTIPLE if device.type == "cuda" else 1


def _attention_backends(device: torch.device):
    """On CUDA, SDPA without the cuDNN backend: cuDNN plans every new input shape, which batches of
    varying width pay again and again (MiniLM, 512 pairs, H100: 261 pairs/s with cuDNN and exact
    widths, 2514 pairs/s without it and widths rounded to 16); the memory-efficient kernel needs no
    plan and handles the padding mask."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _read_metadata(folder: Path) -> dict[str, Any] | None:
    file = folder / METADATA_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg})", path=str(file)) from None


def guess_model_type(name_or_path: str) -> str:
    """What a checkpoint is: a folder written by :func:`inpars.train.train_model` says so in its
    ``inpars_model.json``; otherwise, from the HF config, T5 -> monot5, a classification head ->
    cross-encoder, a bare encoder (sentence-transformers layout or ``*Model`` architecture) ->
    bi-encoder, anything else (e.g. a masked LM) -> cross-encoder."""
    from transformers import AutoConfig

    meta = _read_metadata(Path(name_or_path))
    if meta and meta.get("model_type"):
        return meta["model_type"]
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type in T5_MODEL_TYPES:
        return "monot5"
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "cross-encoder"
    folder = Path(name_or_path)
    if (folder / "modules.json").is_file() or any(a.endswith("Model") for a in archs):
        return "bi-encoder"
    return "cross-encoder"


def load_pretrained(model_type: str, name_or_path: str) -> tuple[Any, Any, set[str]]:
    """``(model, tokenizer, fresh)`` of a model type from an HF folder or hub id, as transformers loads
    it; ``fresh`` names the weights the checkpoint did not have (e.g. a classification head put on an
    encoder checkpoint), which were freshly initialised."""
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        T5ForConditionalGeneration,
    )

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if model_type == "monot5":
        cls, extra = T5ForConditionalGeneration, {}
    elif model_type == "cross-encoder":
        cls, extra = AutoModelForSequenceClassification, {"num_labels": 1}
    else:
        cls, extra = AutoModel, {}
    model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **extra)
    return model, tokenizer, set(info.get("missing_keys") or ())


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
    meta = _read_metadata(Path(where)) or {}
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


# --------------------------------------------------------------------------- runs


def top_docs(scores: Mapping[str, float], depth: int) -> list[str]:
    """The ``depth`` best doc ids by score (ties by doc id, as :func:`inpars.corpus.format_run` ranks them)."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]]


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


def with_tail(head: dict[str, dict[str, float]], first: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The reranked top of each query, then the first stage's remaining documents in their order.

    The tail is scored strictly below the head, so the reranked order is kept and the run is as deep
    as the first stage (recall at 100 or 1000 compares like with like).
    """
    out = {}
    for q, first_scores in first.items():
        top = dict(head.get(q, {}))
        floor = min(top.values(), default=0.0) - 1.0
        rest = sorted((d for d in first_scores if d not in top), key=lambda d: (-first_scores[d], d))
        for rank, d in enumerate(rest):
            top[d] = floor - rank * 1e-3
        out[q] = top
    return out


def _minmax(scores: Mapping[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi <= lo:  # all equal: this run says nothing about the order, so it adds nothing
        return {d: 0.0 for d in scores}
    return {d: (s - lo) / (hi - lo) for d, s in scores.items()}


def fuse_runs(first: Mapping[str, Mapping[str, float]], second: Mapping[str, Mapping[str, float]], weight_first: float) -> Run:
    """``weight_first * first + (1 - weight_first) * second`` after min-max normalising each query's
    scores in each run to [0, 1]; over the union of queries and documents, a document missing from
    one run gets that run's minimum (0)."""
    if not 0.0 <= weight_first <= 1.0:
        raise ConfigError(f"weight_first must be in [0, 1], got {weight_first}")
    fused: Run = {}
    for qid in dict.fromkeys([*first, *second]):
        a, b = _minmax(first.get(qid, {})), _minmax(second.get(qid, {}))
        fused[qid] = {d: weight_first * a.get(d, 0.0) + (1.0 - weight_first) * b.get(d, 0.0) for d in dict.fromkeys([*a, *b])}
    return fused


DEFAULT_GRID = tuple(i / 10 for i in range(11))


def choose_fusion_weight(
    first: Mapping[str, Mapping[str, float]],
    second: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    grid: Sequence[float] = DEFAULT_GRID,
    measure: str = "RR@10",
) -> tuple[float, dict[float, float]]:
    """The grid weight of ``first`` whose fused run scores best on ``qrels``, and every weight's value.

    Pass qrels of *held-out synthetic* queries (source document = relevant), never test queries: a
    weight picked on the test set inflates the reported figure. Only the queries in ``qrels`` are
    fused and scored. Ties go to the middle of the tied weights.
    """
    import ir_measures

    if not qrels:
        raise InputError("choose_fusion_weight needs qrels for at least one query")
    m = ir_measures.parse_measure(measure)
    a = {q: first[q] for q in qrels if q in first}
    b = {q: second[q] for q in qrels if q in second}
    if not a and not b:
        raise InputError("none of the qrels queries are in either run")
    values: dict[float, float] = {}
    for w in grid:
        fused = fuse_runs(a, b, w)
        res = ir_measures.calc_aggregate([m], {q: dict(d) for q, d in qrels.items()}, fused)
        values[w] = float(res.get(m, 0.0))
    top = max(values.values())
    tied = [w for w in grid if values[w] == top]
    # Ties (common with few held-out queries) go to the middle of the tied range, not to one end,
    # so a flat plateau does not hand the whole ranking to either run.
    best = tied[(len(tied) - 1) // 2]
    if math.isnan(values[best]):
        raise InputError(f"{measure} is undefined on these qrels")
    return best, values
