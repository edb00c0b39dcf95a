"""Trained folders load, as they are, in the libraries their users load them with, and score as we do.

Tiny random models built in code (no hub): a BERT with MiniLM's tokenizer for the bi-encoder and the
cross-encoder, a T5 with a SentencePiece-style (Unigram) vocabulary that has ``▁true``/``▁false``
entries, as castorini's monoT5 checkpoints do, for monoT5.
"""

from __future__ import annotations

import json
import logging
import random
import string
from pathlib import Path

import pytest
import torch

from inpars.config import TrainConfig
from inpars.corpus import read_corpus, read_qrels, read_queries
from inpars.rerank import load_reranker
from inpars.train import train_model

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


@pytest.fixture(scope="module")
def sample():
    return read_corpus(SAMPLE), read_queries(SAMPLE), read_qrels(SAMPLE / "qrels" / "test.tsv")


def groups(sample, n: int = 4) -> list[dict]:
    docs, queries, qrels = sample
    rng, ids = random.Random(0), sorted(docs)
    return [
        {
            "query_id": q,
            "query": queries[q],
            "pos_doc_id": sorted(qrels[q])[0],
            "neg_doc_ids": rng.sample([d for d in ids if d not in qrels[q]], 1),
        }
        for q in sorted(qrels)[:n]
    ]


def pairs(sample, rows) -> list[tuple[str, str]]:
    docs = sample[0]
    # Short and long texts in one batch, so padding is exercised; short enough that nothing is truncated.
    return [
        (r["query"], " ".join(docs[d].contents.split()[: 5 + 7 * i]))
        for i, r in enumerate(rows)
        for d in [r["pos_doc_id"], *r["neg_doc_ids"]]
    ]


def tiny_bert(folder: Path) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from inpars.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6").name_or_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def tiny_monot5(folder: Path) -> str:
    """A tiny random T5 whose tokenizer is T5's (Unigram, ``▁`` word marks, ``</s>`` appended) with a
    character vocabulary plus the whole words ``▁true``/``▁false``, as in T5's SentencePiece model."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    pieces = ["▁true", "▁false", "▁yes", "▁no", "▁Query:", "▁Document:", "▁Relevant:", "▁"]
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((p, -1.0) for p in pieces), *((c, -5.0) for c in chars)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_bi_encoder_folder_is_a_sentence_transformer(sample, tmp_path, caplog):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForSequenceClassification

    rows = groups(sample)
    cfg = TrainConfig(
        model_type="bi-encoder", model=tiny_bert(tmp_path / "bert"), batch_size=2, max_steps=2, max_length=64, dtype="float32"
    )
    with caplog.at_level(logging.WARNING, logger="inpars.train"):
        train_model(rows, sample[0], cfg, tmp_path / "bi")
    folder = str(tmp_path / "bi")
    # Said in the log and in inpars_model.json: not a cross-encoder.
    assert any("not a cross-encoder" in r.getMessage() and "freshly initialised" in r.getMessage() for r in caplog.records)
    meta = json.loads((tmp_path / "bi" / "inpars_model.json").read_text())
    assert "not a cross-encoder" in meta["warning"] and "SentenceTransformer(folder)" in meta["loads_with"]["sentence_transformers"]

    st = SentenceTransformer(folder, device="cpu")
    assert st.similarity_fn_name == "cosine" and st.max_seq_length == 64
    texts = [t for pair in pairs(sample, rows) for t in pair]
    theirs = st.encode(texts, convert_to_tensor=True, batch_size=3)
    ours = load_reranker(folder, dtype="float32", max_length=64).encode(texts)
    assert theirs.shape == ours.shape == (len(texts), 32)
    assert torch.allclose(theirs.cpu(), ours, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)  # Normalize is in the pipeline
    # Why the warning matters: as a sequence classifier, the head is new (random) weights.
    _, info = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, output_loading_info=True)
    assert {"classifier.weight", "classifier.bias"} <= set(info["missing_keys"])


def test_cross_encoder_folder_is_a_sentence_transformers_cross_encoder(sample, tmp_path):
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = groups(sample)
    cfg = TrainConfig(
        model_type="cross-encoder", model=tiny_bert(tmp_path / "bert"), batch_size=2, max_steps=2, max_length=128, dtype="float32"
    )
    train_model(rows, sample[0], cfg, tmp_path / "ce")
    folder = str(tmp_path / "ce")
    meta = json.loads((tmp_path / "ce" / "inpars_model.json").read_text())
    assert meta["warning"] is None and "CrossEncoder(folder)" in meta["loads_with"]["sentence_transformers"]
    batch = pairs(sample, rows)
    ours = torch.tensor(load_reranker(folder, dtype="float32", max_length=128).score(batch))
    # sentence-transformers: raw logits (the identity activation recorded in config.json), not sigmoids
    theirs = torch.as_tensor(CrossEncoder(folder, device="cpu").predict(batch, batch_size=3))
    assert torch.allclose(theirs.float(), ours, atol=1e-5)
    assert (ours < 0).any() or (ours > 1).any()  # raw logits: a sigmoid would squash them into (0, 1)
    # the InPars toolkit's MonoBERTReranker: AutoModelForSequenceClassification + AutoTokenizer, logits[:, 0]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    enc = tok(
        [q for q, _ in batch],
        [d for _, d in batch],
        padding=True,
        truncation="only_second",
        max_length=tok.model_max_length,
        return_tensors="pt",
    )
    with torch.inference_mode():
        toolkit = model(**enc)[0][:, 0]
    assert torch.allclose(toolkit, ours, atol=1e-5)


def test_monot5_folder_scores_in_the_toolkit_reranker_as_with_us(sample, tmp_path):
    """The toolkit's MonoT5Reranker, step by step (AutoConfig architectures -> AutoModelForSeq2SeqLM,
    AutoTokenizer, the vocabulary's ``▁false``/``▁true``, one generated step): P(true) = exp(our score)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    rows = groups(sample)
    cfg = TrainConfig(model_type="monot5", model=tiny_monot5(tmp_path / "t5"), batch_size=2, max_steps=2, max_length=512, dtype="float32")
    train_model(rows, sample[0], cfg, tmp_path / "mono")
    folder = str(tmp_path / "mono")
    meta = json.loads((tmp_path / "mono" / "inpars_model.json").read_text())
    assert meta["warning"] is None and "MonoT5Reranker" in meta["loads_with"]["inpars_toolkit"]
    batch = pairs(sample, rows)
    ours = torch.tensor(load_reranker(folder, dtype="float32", max_length=512).score(batch))

    assert any("ForConditionalGeneration" in a for a in AutoConfig.from_pretrained(folder).architectures)  # -> MonoT5Reranker
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    false_id, true_id = tok.get_vocab()["▁false"], tok.get_vocab()["▁true"]
    prompts = [f"Query: {q} Document: {d} Relevant:" for q, d in batch]
    enc = tok(prompts, padding=True, truncation=True, max_length=tok.model_max_length, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=1, return_dict_in_generate=True, output_scores=True)
    toolkit = torch.log_softmax(out.scores[0][:, [false_id, true_id]], dim=1)[:, 1].exp()
    assert torch.allclose(toolkit, ours.exp(), atol=1e-5)
    assert toolkit.std() > 0  # the scores say something different per pair (not a constant)


def test_monot5_on_other_relevance_words_says_the_toolkit_scores_it_wrongly(sample, tmp_path):
    cfg = TrainConfig(
        model_type="monot5", model=tiny_monot5(tmp_path / "t5"), batch_size=2, max_steps=1, max_length=256, relevance_tokens=("yes", "no")
    )
    train_model(groups(sample, 2), sample[0], cfg, tmp_path / "yesno")
    meta = json.loads((tmp_path / "yesno" / "inpars_model.json").read_text())
    assert "inpars_toolkit" not in meta["loads_with"] and "['yes', 'no']" in meta["warning"]
