"""Trained-model folders in the formats their users load, next to the HF files ``train_model`` saves.

* **bi-encoder** — the sentence-transformers layout, as the released all-MiniLM-L6-v2 has it:
  ``modules.json`` (Transformer -> Pooling -> Normalize), ``sentence_bert_config.json``
  (``max_seq_length``), ``1_Pooling/config.json`` (mean pooling) and
  ``config_sentence_transformers.json`` (cosine similarity). ``SentenceTransformer(folder)`` loads it
  as it is and gives the embeddings :meth:`inpars.rerank.Reranker.encode` gives (mean of the
  token states, unit length).

  A bi-encoder is not a cross-encoder: ``AutoModelForSequenceClassification`` — the InPars toolkit's
  reranker, ``sentence_transformers.CrossEncoder`` — loads its encoder and puts a freshly initialised
  classification head on top, whose scores mean nothing. Score it by cosine (sentence-transformers or
  :func:`inpars.rerank.load_reranker`).
* **cross-encoder** — a sequence-classification checkpoint with one output, as the toolkit's
  ``MonoBERTReranker`` and ``sentence_transformers.CrossEncoder`` load it. ``config.json`` records the
  identity activation for sentence-transformers (``sentence_transformers.activation_fn``, and the
  pre-v4 key ``sbert_ce_default_activation_function``): ``CrossEncoder.predict`` then returns the raw
  logit, our score, instead of its sigmoid.
* **monot5** — a ``T5ForConditionalGeneration`` checkpoint and its tokenizer. The toolkit's reranker
  (``inpars/rerank.py``: ``Reranker.from_pretrained`` -> ``MonoT5Reranker``) loads it with
  ``AutoModelForSeq2SeqLM`` + ``AutoTokenizer``, reads the prompt ``Query: q Document: d Relevant:``
  and scores ``P(▁true)`` from a softmax over the vocabulary entries ``▁false`` / ``▁true`` at the
  first decoder step: ``exp`` of our score, for a model trained with the relevance tokens
  ``true``/``false`` (the default). It truncates at ``tokenizer.model_max_length``: a tokenizer that
  records no limit gets the trained ``max_length`` (:func:`bound_tokenizer_length`). A path containing ``flan`` switches the toolkit to its FLAN prompt
  and ``yes``/``no``; a monoT5 trained on other words or prompts is scored wrongly there.

:func:`write_model_formats` writes these files and returns what ``inpars_model.json`` says about
loading the folder (``loads_with``, and a ``warning`` where a loader gets it wrong).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What sentence-transformers calls the identity activation (an import path it resolves).
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"
BI_ENCODER_WARNING = (
    "a bi-encoder, not a cross-encoder: score it by cosine (sentence_transformers.SentenceTransformer(folder) or "
    "inpars.rerank.load_reranker(folder)); AutoModelForSequenceClassification, sentence_transformers.CrossEncoder and "
    "the InPars toolkit's reranker would put a freshly initialised classification head on it"
)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def sentence_transformers_layout(hidden_size: int, max_length: int) -> dict[str, Any]:
    """The files (relative path -> JSON content) that make an HF encoder folder a sentence-transformers
    model: Transformer -> mean Pooling -> Normalize, cosine similarity."""
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
        "config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    }


def _mark_cross_encoder(folder: Path) -> None:
    """Record the identity activation in ``config.json`` (kept in transformers' own formatting)."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["sentence_transformers"] = {**(config.get("sentence_transformers") or {}), "activation_fn": IDENTITY_ACTIVATION}
    config["sbert_ce_default_activation_function"] = IDENTITY_ACTIVATION
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


UNBOUNDED_LENGTH = 10**9  # transformers' VERY_LARGE_INTEGER (1e30) means "no limit recorded"


def bound_tokenizer_length(tokenizer: Any, max_length: int) -> None:
    """Give a tokenizer without a recorded length limit the trained ``max_length``: the InPars toolkit's
    rerankers pass ``tokenizer.model_max_length`` as ``max_length``, and an unbounded one (1e30) makes
    the tokenizers library raise ``OverflowError``. A recorded limit (BERT's 512, T5's 512) is kept."""
    if getattr(tokenizer, "model_max_length", 0) >= UNBOUNDED_LENGTH:
        tokenizer.model_max_length = max_length


def write_model_formats(folder: str | Path, model_type: str, *, hidden_size: int, max_length: int, relevance_tokens=None) -> dict[str, Any]:
    """Write the files that let the usual libraries load ``folder`` (a saved HF model of ``model_type``);
    returns ``{"loads_with": {...}, "warning": ...}`` for ``inpars_model.json`` (no warning: none needed)."""
    folder = Path(folder)
    loads_with = {"inpars": "inpars.rerank.load_reranker(folder)"}
    warning = None
    if model_type == "bi-encoder":
        for name, content in sentence_transformers_layout(hidden_size, max_length).items():
            _write_json(folder / name, content)
        loads_with["sentence_transformers"] = "SentenceTransformer(folder): mean pooling, unit vectors, cosine"
        loads_with["transformers"] = "AutoModel.from_pretrained(folder), then the mean of the unpadded token states, L2-normalised"
        warning = BI_ENCODER_WARNING
    elif model_type == "cross-encoder":
        _mark_cross_encoder(folder)
        loads_with["sentence_transformers"] = "CrossEncoder(folder): predict() returns the raw logit (identity activation)"
        loads_with["inpars_toolkit"] = "inpars.rerank.Reranker.from_pretrained(folder) (MonoBERTReranker)"
        loads_with["transformers"] = "AutoModelForSequenceClassification.from_pretrained(folder): logits[:, 0]"
    elif model_type == "monot5":
        loads_with["transformers"] = "T5ForConditionalGeneration: log-softmax over the relevance tokens at the first decoder step"
        if tuple(relevance_tokens or ()) == ("true", "false"):
            loads_with["inpars_toolkit"] = "inpars.rerank.Reranker.from_pretrained(folder) (MonoT5Reranker: P(▁true) = exp(our score))"
        else:
            warning = (
                f"trained on the relevance tokens {list(relevance_tokens or ())}: the InPars toolkit's MonoT5Reranker scores "
                "▁true/▁false (its FLAN reranker, chosen when the path contains 'flan', also changes the prompt), so its scores "
                "for this model are wrong; use inpars.rerank.load_reranker(folder)"
            )
    return {"loads_with": loads_with, "warning": warning}


__all__ = ["BI_ENCODER_WARNING", "IDENTITY_ACTIVATION", "bound_tokenizer_length", "sentence_transformers_layout", "write_model_formats"]
