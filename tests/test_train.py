"""Training the three reranker families on real SciFact-sample groups (real MiniLM, tiny random T5)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from inpars.config import TrainConfig
from inpars.corpus import read_corpus, read_qrels, read_queries
from inpars.errors import ConfigError, InputError
from inpars.rerank import load_reranker
from inpars.train import train_model

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


@pytest.fixture(scope="module")
def sample():
    docs = read_corpus(SAMPLE)
    queries = read_queries(SAMPLE)
    qrels = read_qrels(SAMPLE / "qrels" / "test.tsv")
    return docs, queries, qrels


def make_groups(sample, n: int, n_neg: int = 3, seed: int = 0) -> list[dict]:
    """Negatives rows: a real query, its judged document, random other documents as negatives."""
    docs, queries, qrels = sample
    rng = random.Random(seed)
    ids = sorted(docs)
    rows = []
    for qid in sorted(qrels)[:n]:
        pos = sorted(qrels[qid])[0]
        negs = rng.sample([d for d in ids if d not in qrels[qid]], n_neg)
        rows.append({"query_id": qid, "query": queries[qid], "pos_doc_id": pos, "neg_doc_ids": negs})
    return rows


def tiny_t5(folder: Path, extra_tokens=("true", "false", "yes", "no")) -> str:
    """A tiny random T5 with ByT5's byte tokenizer (no files needed), saved like any HF model folder.

    Byte-level ByT5 splits "true" into 4 bytes; adding the relevance words as tokens makes them single
    tokens, as they are in T5's SentencePiece vocabulary.
    """
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    tok = ByT5Tokenizer()
    tok.add_tokens(list(extra_tokens))
    config = T5Config(
        vocab_size=len(tok),
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


def group_loss(reranker, rows, docs) -> float:
    """Mean listwise loss (-log softmax of the positive's score in its group), dropout off."""
    total = 0.0
    for row in rows:
        ids = [row["pos_doc_id"], *row["neg_doc_ids"]]
        scores = torch.tensor(reranker.score([(row["query"], docs[d].contents) for d in ids]))
        total -= torch.log_softmax(scores, 0)[0].item()
    return total / len(rows)


def p_at_1(reranker, rows, docs) -> float:
    """How often the positive outscores every negative of its group."""
    hits = 0
    for row in rows:
        ids = [row["pos_doc_id"], *row["neg_doc_ids"]]
        scores = reranker.score([(row["query"], docs[d].contents) for d in ids])
        hits += scores[0] > max(scores[1:])
    return hits / len(rows)


@pytest.mark.slow  # ~60 s of CPU: three MiniLM loads, six training steps, two scoring passes
def test_cross_encoder_lce_learns_and_reloads(sample, tmp_path):
    docs = sample[0]
    rows = make_groups(sample, 6, n_neg=2)
    cfg = TrainConfig(
        model_type="cross-encoder", model="minilm-l6", loss="lce", batch_size=3, max_steps=6, learning_rate=2e-4, max_length=96, seed=0
    )
    # "Before": the same weights and the same freshly seeded head that training starts from.
    torch.manual_seed(cfg.seed)
    before = load_reranker("minilm-l6", model_type="cross-encoder", max_length=96)
    loss_before, p_before = group_loss(before, rows, docs), p_at_1(before, rows, docs)
    seen = []
    stats = train_model(rows, docs, cfg, tmp_path / "ce", on_progress=lambda s, t, loss: seen.append((s, t, loss)))
    assert [s for s, _, _ in seen] == list(range(1, 7)) and all(t == 6 for _, t, _ in seen)
    assert stats["steps"] == 6 and stats["device"] == "cpu" and stats["epochs"] == 3
    meta = json.loads((tmp_path / "ce" / "inpars_model.json").read_text())
    assert meta["model_type"] == "cross-encoder" and meta["loss"] == "lce" and meta["base_model"] == "minilm-l6"
    after = load_reranker(str(tmp_path / "ce"), max_length=96)
    assert after.model_type == "cross-encoder"
    # The positive takes a larger share of its group, and wins its group at least as often.
    assert group_loss(after, rows, docs) < loss_before
    assert p_at_1(after, rows, docs) >= p_before


def test_monot5_trains_saves_and_scores_log_probs(sample, tmp_path):
    docs = sample[0]
    rows = make_groups(sample, 4, n_neg=1)
    base = tiny_t5(tmp_path / "t5-base")
    before = group_loss(load_reranker(base, dtype="float32", max_length=128), rows, docs)
    for loss in ("bce", "lce"):
        cfg = TrainConfig(
            model_type="monot5",
            model=base,
            loss=loss,
            batch_size=4,
            max_steps=8,
            max_length=128,
            seed=0,
            dtype="float32",
            learning_rate=None if loss == "bce" else 3e-3,
        )
        stats = train_model(rows, docs, cfg, tmp_path / f"t5-{loss}")
        assert stats["learning_rate"] == (3e-4 if loss == "bce" else 3e-3)  # 3e-4: the monoT5 default
        rr = load_reranker(str(tmp_path / f"t5-{loss}"), dtype="float32", max_length=128)
        assert rr.model_type == "monot5" and rr.relevance_tokens == ("true", "false")
        if loss == "bce":  # the target-token cross-entropy goes down
            assert stats["loss_curve"]["last"] < stats["loss_curve"]["first"]
        else:  # the positives' share of their groups goes up
            assert group_loss(rr, rows, docs) < before
        scores = rr.score([(r["query"], docs[d].contents) for r in rows for d in [r["pos_doc_id"], *r["neg_doc_ids"]]])
        assert len(scores) == 8 and all(math.isfinite(s) and s <= 0 for s in scores)


def test_monot5_flan_style_yes_no(sample, tmp_path):
    docs = sample[0]
    rows = make_groups(sample, 4)
    base = tiny_t5(tmp_path / "t5-base")
    cfg = TrainConfig(model_type="monot5", model=base, batch_size=2, max_steps=2, max_length=64, relevance_tokens=("yes", "no"))
    train_model(rows, docs, cfg, tmp_path / "flan")
    rr = load_reranker(str(tmp_path / "flan"), max_length=64)
    assert rr.relevance_tokens == ("yes", "no")
    yes, no = (rr.tokenizer.convert_tokens_to_ids(t) for t in ("yes", "no"))
    assert rr._relevance_ids == (yes, no)
    assert all(s <= 0 for s in rr.score([("a query", "a document")]))


def test_monot5_multi_token_relevance_word_is_a_config_error(sample, tmp_path):
    docs = sample[0]
    base = tiny_t5(tmp_path / "t5-bytes", extra_tokens=())  # plain ByT5: "true" is 4 byte tokens
    cfg = TrainConfig(model_type="monot5", model=base, max_steps=1)
    with pytest.raises(ConfigError, match="'true' is 4 tokens"):
        train_model(make_groups(sample, 2), docs, cfg, tmp_path / "out")


def test_monot5_training_is_deterministic_on_cpu(sample, tmp_path):
    docs = sample[0]
    rows = make_groups(sample, 8)
    base = tiny_t5(tmp_path / "t5-base")
    cfg = TrainConfig(model_type="monot5", model=base, batch_size=3, epochs=2, max_length=48, seed=7, dtype="float32")
    a = train_model(rows, docs, cfg, tmp_path / "a")
    b = train_model(rows, docs, cfg, tmp_path / "b")
    assert a["steps"] == 6  # ceil(8 / 3) * 2 epochs
    assert a["loss_curve"] == b["loss_curve"]
    c = train_model(rows, docs, TrainConfig(**{**cfg.__dict__, "seed": 8}), tmp_path / "c")
    assert c["loss_curve"] != a["loss_curve"]


def test_bi_encoder_trains_and_scores_by_cosine(sample, tmp_path):
    """The default (model_type auto) trains the packaged all-MiniLM-L6-v2 as the retriever it is."""
    docs = sample[0]
    rows = make_groups(sample, 6, n_neg=1)
    cfg = TrainConfig(model="minilm-l6", batch_size=3, max_steps=2, max_length=64)
    assert cfg.model_type == "auto"
    stats = train_model(rows, docs, cfg, tmp_path / "bi")
    assert math.isfinite(stats["final_loss"]) and stats["steps"] == 2 and stats["model_type"] == "bi-encoder"
    meta = json.loads((tmp_path / "bi" / "inpars_model.json").read_text())
    assert meta["model_type"] == "bi-encoder" and meta["pooling"] == "mean"
    rr = load_reranker(str(tmp_path / "bi"), max_length=64)
    pairs = [(r["query"], docs[d].contents) for r in rows for d in [r["pos_doc_id"], *r["neg_doc_ids"]]]
    scores = rr.score(pairs)
    assert all(-1.0001 <= s <= 1.0001 for s in scores)  # cosines
    # Positives outrank the random negatives (MiniLM is a good retriever already).
    assert sum(scores[i] > scores[i + 1] for i in range(0, len(scores), 2)) >= 5


def test_bad_examples_name_the_id(sample, tmp_path):
    docs = sample[0]
    rows = make_groups(sample, 2)
    rows[1]["neg_doc_ids"] = ["no-such-doc"]
    with pytest.raises(InputError, match="no-such-doc"):
        train_model(rows, docs, TrainConfig(max_steps=1), tmp_path / "x")
    # Unknown settings are refused when the config is built, before any training starts.
    with pytest.raises(ConfigError, match="model_type"):
        train_model(rows[:1], docs, TrainConfig.of(model_type="colbert"), tmp_path / "x")
    with pytest.raises(ConfigError, match="loss"):
        train_model(rows[:1], docs, TrainConfig.of(loss="hinge"), tmp_path / "x")


def test_cross_encoder_bce_on_a_tiny_bert(sample, tmp_path):
    """The pointwise path, fast: a tiny random BERT with MiniLM's tokenizer, saved as a local folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from inpars.models import resolve_model

    docs = sample[0]
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6").name_or_path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    rows = make_groups(sample, 4, n_neg=1)
    cfg = TrainConfig(
        model_type="cross-encoder",
        model=str(tmp_path / "bert"),
        loss="bce",
        batch_size=4,
        max_steps=10,
        learning_rate=1e-3,
        max_length=64,
        dtype="float32",
    )
    stats = train_model(rows, docs, cfg, tmp_path / "ce")
    assert stats["loss_curve"]["last"] < stats["loss_curve"]["first"]
    rr = load_reranker(str(tmp_path / "ce"), dtype="float32", max_length=64)
    assert rr.model_type == "cross-encoder"  # from inpars_model.json, though the base was a bare BertModel
    assert len(rr.score([(r["query"], docs[r["pos_doc_id"]].contents) for r in rows])) == 4


def test_auto_model_type_is_what_the_checkpoint_already_is(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from inpars.train import resolve_model_type

    small = dict(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForSequenceClassification(BertConfig(num_labels=1, **small)).save_pretrained(tmp_path / "ce")
    BertForMaskedLM(BertConfig(**small)).save_pretrained(tmp_path / "mlm")
    assert resolve_model_type("auto", tiny_t5(tmp_path / "t5")) == "monot5"
    assert resolve_model_type("auto", str(tmp_path / "ce")) == "cross-encoder"
    assert resolve_model_type("auto", str(tmp_path / "mlm")) == "cross-encoder"  # a language model gets a head
    assert resolve_model_type("auto", _tiny_bert(tmp_path / "bert")) == "bi-encoder"  # a bare encoder
    assert resolve_model_type("cross-encoder", _tiny_bert(tmp_path / "bert")) == "cross-encoder"  # asked for
    # A folder train_model wrote says what it is, whatever its config alone would suggest.
    (tmp_path / "bert" / "inpars_model.json").write_text(json.dumps({"model_type": "cross-encoder"}))
    assert resolve_model_type("auto", str(tmp_path / "bert")) == "cross-encoder"


def _tiny_bert(folder: Path) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from inpars.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6").name_or_path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_keep_initial_averages_trained_and_starting_weights(sample, tmp_path):
    """WiSE-FT: keep_initial=a saves (1-a)*trained + a*initial for every checkpoint weight, while a
    freshly initialised head (not in the checkpoint) keeps its trained value."""
    docs = sample[0]
    base = _tiny_bert(tmp_path / "bert")
    rows = make_groups(sample, 4, n_neg=1)
    runs = {}
    for a in (0.0, 0.25, 1.0):
        cfg = TrainConfig(
            model_type="cross-encoder", model=base, loss="lce", batch_size=4, max_steps=3, max_length=64, learning_rate=1e-3, keep_initial=a
        )
        stats = train_model(rows, docs, cfg, tmp_path / f"ce-{a}")
        assert stats["keep_initial"] == a
        runs[a] = _weights(tmp_path / f"ce-{a}")
    start = _weights(tmp_path / "bert")
    name = next(k for k in runs[0.0] if k.endswith("encoder.layer.0.attention.self.query.weight"))
    start_name = next(k for k in start if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert not torch.allclose(runs[0.0][name], start[start_name])  # training moved it
    assert torch.equal(runs[1.0][name], start[start_name])
    assert torch.allclose(runs[0.25][name], 0.75 * runs[0.0][name] + 0.25 * start[start_name], atol=1e-6)
    # The classification head is new: it is not pulled back to its random initialisation.
    assert torch.equal(runs[1.0]["classifier.weight"], runs[0.0]["classifier.weight"])
    with pytest.raises(ConfigError, match="keep_initial"):
        train_model(rows, docs, TrainConfig.of(model=base, keep_initial=1.5, max_steps=1), tmp_path / "bad")


def test_split_held_out_depends_on_the_query_id_only():
    from inpars.train import split_held_out

    rows = [{"query_id": f"doc{i}-0", "n": i} for i in range(400)]
    train, held = split_held_out(rows, 0.1)
    assert len(train) + len(held) == 400 and 20 <= len(held) <= 60
    assert {r["query_id"] for r in train}.isdisjoint(r["query_id"] for r in held)
    # The same id is held out whatever else is in the list (another filter's rows, a shuffled order).
    again_train, again_held = split_held_out(list(reversed(rows[:200])), 0.1)
    assert {r["query_id"] for r in again_held} == {r["query_id"] for r in held if r["n"] < 200}
    assert split_held_out(rows, 0) == (rows, [])
