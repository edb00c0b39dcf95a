"""What training and scoring share about models: the three model families, how a (query, document)
pair or a text becomes token ids, batches on the device, and what a checkpoint is.

* ``cross-encoder`` — a sequence-classification model with one output (e.g. MiniLM + a head) reading
  the pair as the tokenizer lays it out (``[CLS] q [SEP] d [SEP]``); the score is that logit.
* ``monot5`` — a T5 seq2seq model reading ``Query: q Document: d Relevant:``; the score is
  ``log P(true)`` from a softmax over the two relevance tokens at the first decoder step.
* ``bi-encoder`` — a bare encoder with mean pooling; the score is the cosine of the query and
  document embeddings.

:mod:`inpars.train` turns these into losses, :mod:`inpars.rerank` into scores; neither holds a copy, so a
model is read at ranking time exactly as it was trained.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .files import read_json

MODEL_TYPES = ("cross-encoder", "monot5", "bi-encoder")
METADATA_FILE = "inpars_model.json"  # written by inpars.train next to the HF model files
T5_MODEL_TYPES = ("t5", "mt5", "umt5", "byt5")


# --------------------------------------------------------------------------- pairs and texts -> token ids


def monot5_input(query: str, document: str) -> str:
    """The monoT5 input text; :func:`encode_pairs` assembles exactly its tokens (and cuts the query and
    document, never the ``Relevant:`` the model answers after)."""
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


# --------------------------------------------------------------------------- batches on the device


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


PAD_MULTIPLE = 16  # CUDA batch widths are rounded up to this: at most max_length/16 distinct shapes


def pad_multiple(device: torch.device, max_length: int) -> int:
    """What batch widths are rounded up to: 1 on CPU (every token costs), 16 on CUDA (see
    :func:`attention_backends`), ``max_length`` on XLA/TPU (it compiles one graph per shape)."""
    if device.type == "xla":
        return max_length
    return PAD_MULTIPLE if device.type == "cuda" else 1


def attention_backends(device: torch.device):
    """On CUDA, SDPA without the cuDNN backend: cuDNN plans every new input shape, which batches of
    varying width pay again and again (MiniLM, 512 pairs, H100: 261 pairs/s with cuDNN and exact
    widths, 2514 pairs/s without it and widths rounded to 16); the memory-efficient kernel needs no
    plan and handles the padding mask."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# --------------------------------------------------------------------------- model outputs -> scores


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token embeddings that are not padding (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def monot5_scores(logits: torch.Tensor, true_id: int, false_id: int) -> torch.Tensor:
    """log P(true) from a softmax over just the (true, false) logits at the first decoder step."""
    pair = logits[:, 0, [true_id, false_id]].float()
    return torch.log_softmax(pair, dim=-1)[:, 0]


# --------------------------------------------------------------------------- checkpoints


def read_model_metadata(folder: Path) -> dict[str, Any] | None:
    """The ``inpars_model.json`` that :func:`inpars.train.train_model` writes next to the HF files, or
    ``None`` for any other folder (or a hub id); malformed JSON is an error naming the file."""
    file = folder / METADATA_FILE
    return read_json(file) if file.is_file() else None


def guess_model_type(name_or_path: str) -> str:
    """What a checkpoint is: a folder written by :func:`inpars.train.train_model` says so in its
    ``inpars_model.json``; otherwise, from the HF config, T5 -> monot5, a classification head ->
    cross-encoder, a bare encoder (sentence-transformers layout or ``*Model`` architecture) ->
    bi-encoder, anything else (e.g. a masked LM) -> cross-encoder."""
    from transformers import AutoConfig

    meta = read_model_metadata(Path(name_or_path))
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
