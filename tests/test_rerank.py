"""Reranker scoring (fast path vs a plain loop), the first stage, rerank_run and the held-out fusion weight."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from inpars.corpus import read_corpus, read_qrels, read_queries
from inpars.encoding import encode_pairs, guess_model_type
from inpars.errors import InputError
from inpars.models import resolve_model
from inpars.rerank import FIRST_STAGE_DEPTH, first_stage, fusion_weight_on_held_out, load_reranker, rerank_run

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


@pytest.fixture(scope="module")
def sample():
    return read_corpus(SAMPLE), read_queries(SAMPLE), read_qrels(SAMPLE / "qrels" / "test.tsv")


@pytest.fixture(scope="module")
def pairs(sample):
    """48 pairs of widely varying length (documents cut at random word counts), in random order."""
    docs, queries, qrels = sample
    rng = random.Random(1)
    ids, qids = sorted(docs), sorted(qrels)
    out = []
    for i in range(48):
        qid = qids[i % len(qids)]
        did = sorted(qrels[qid])[0] if i % 3 == 0 else rng.choice(ids)
        words = docs[did].contents.split()
        out.append((queries[qid], " ".join(words[: rng.choice([5, 20, 60, 400])])))
    return out


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    """MiniLM with a seeded fresh head saved as a plain HF cross-encoder folder (no inpars_model.json)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("ce")
    src = resolve_model("minilm-l6").name_or_path
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return str(folder)


def tiny_t5(folder: Path) -> str:
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    tok = ByT5Tokenizer()
    tok.add_tokens(["true", "false"])
    config = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def plain_loop(folder: str, pairs, batch_size=8, max_length=256) -> list[float]:
    """The naive reference: fp32, input order, fixed batches padded to their longest member."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            enc = tok(
                [q for q, _ in chunk], [d for _, d in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            out += model(**enc).logits[:, 0].tolist()
    return out


def spearman(a, b) -> float:
    ra = {i: r for r, i in enumerate(sorted(range(len(a)), key=a.__getitem__))}
    rb = {i: r for r, i in enumerate(sorted(range(len(b)), key=b.__getitem__))}
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def test_fast_path_matches_plain_fp32_loop(ce_dir, pairs):
    reference = plain_loop(ce_dir, pairs)
    fp32 = load_reranker(ce_dir, dtype="float32", batch_size=16)
    assert fp32.model_type == "cross-encoder"  # guessed from the config's architecture
    exact = fp32.score(pairs)
    # Length-sorted dynamic batches change only padding, which the attention mask hides.
    assert max(abs(a - b) for a, b in zip(exact, reference)) < 1e-4
    bf16 = load_reranker(ce_dir, dtype="bfloat16", batch_size=16)
    fast = bf16.score(pairs)
    spread = max(reference) - min(reference)
    assert spread > 0
    assert max(abs(a - b) for a, b in zip(fast, reference)) < 0.05 * spread
    assert spearman(fast, reference) > 0.95


def test_scores_come_back_in_input_order(ce_dir, pairs):
    rr = load_reranker(ce_dir, dtype="float32", batch_size=5)
    forward = rr.score(pairs)
    backward = rr.score(pairs[::-1])[::-1]
    assert max(abs(a - b) for a, b in zip(forward, backward)) < 1e-4
    single = [rr.score([p])[0] for p in pairs[:4]]
    assert max(abs(a - b) for a, b in zip(single, forward[:4])) < 1e-4
    assert rr.score([]) == []


def test_monot5_score_is_log_p_true_at_first_step(tmp_path, pairs):
    folder = tiny_t5(tmp_path / "t5")
    assert guess_model_type(folder) == "monot5"
    rr = load_reranker(folder, dtype="float32", max_length=512, batch_size=7)
    scores = rr.score(pairs[:10])
    true_id, false_id = rr._relevance_ids
    compared = 0
    for (q, d), got in zip(pairs[:10], scores):
        # Reference: one unpadded input, the plain full-text prompt, no truncation needed at 512 bytes.
        ids = rr.tokenizer(f"Query: {q} Document: {d} Relevant:", return_tensors="pt")["input_ids"]
        if ids.shape[1] > 512:
            continue
        with torch.no_grad():
            logits = rr.model(input_ids=ids, decoder_input_ids=torch.tensor([[0]])).logits[0, 0]
        want = torch.log_softmax(logits[[true_id, false_id]], -1)[0].item()
        assert got == pytest.approx(want, abs=1e-4)
        assert got <= 0
        compared += 1
    assert compared >= 3


def test_monot5_truncation_keeps_the_document_and_the_prompt_end(tmp_path):
    rr = load_reranker(tiny_t5(tmp_path / "t5"), dtype="float32", max_length=64)
    (enc,) = encode_pairs(rr.tokenizer, "monot5", ["q" * 200], ["d" * 200], 64)
    text = rr.tokenizer.decode(enc["input_ids"])
    assert len(enc["input_ids"]) == 64 and text.endswith(" Relevant:</s>") and "Document: ddd" in text


def test_zero_shot_minilm_is_a_bi_encoder(sample):
    docs, queries, qrels = sample
    rr = load_reranker("minilm-l6", dtype="float32", max_length=128)
    assert rr.model_type == "bi-encoder"
    rng = random.Random(0)
    wins = 0
    for qid in sorted(qrels)[:10]:
        pos = sorted(qrels[qid])[0]
        neg = rng.choice([d for d in sorted(docs) if d not in qrels[qid]])
        s = rr.score([(queries[qid], docs[pos].contents), (queries[qid], docs[neg].contents)])
        wins += s[0] > s[1]
        assert all(-1.0001 <= x <= 1.0001 for x in s)
    assert wins >= 9
    # Equals the cosine of separately computed embeddings.
    e = rr.encode([queries[qid], docs[pos].contents])
    assert s[0] == pytest.approx(float(e[0] @ e[1]), abs=1e-5)


def test_rerank_run_keeps_depth_and_names_missing_ids(tmp_path, sample):
    docs, queries, qrels = sample
    rr = load_reranker(tiny_t5(tmp_path / "t5"), dtype="float32", max_length=256)
    ids = sorted(docs)
    run = {"3": {ids[0]: 9.0, ids[1]: 8.0, ids[2]: 7.0, ids[3]: 1.0}, "49": {ids[4]: 2.0, ids[5]: 3.0}}
    out = rerank_run(run, queries, docs, rr, depth=2)
    assert set(out["3"]) == {ids[0], ids[1]}  # ranks 3 and 4 dropped
    assert set(out["49"]) == {ids[4], ids[5]}
    want = rr.score([(queries["3"], docs[ids[0]].contents)])[0]
    assert out["3"][ids[0]] == pytest.approx(want, abs=1e-4)
    with pytest.raises(InputError, match="'missing-doc'"):
        rerank_run({"3": {"missing-doc": 1.0}}, queries, docs, rr)
    with pytest.raises(InputError, match="'no-such-query'"):
        rerank_run({"no-such-query": {ids[0]: 1.0}}, queries, docs, rr)
    # Below depth a missing doc is never looked at (it is dropped, not scored).
    assert set(rerank_run({"3": {ids[0]: 2.0, "missing-doc": 1.0}}, queries, docs, rr, depth=1)["3"]) == {ids[0]}


@pytest.fixture(scope="module")
def index(sample):
    from inpars.bm25 import build_index

    return build_index(sample[0])


def test_first_stage_retrieves_deeper_than_it_reranks(sample, index):
    docs, queries, qrels = sample
    qs = {q: queries[q] for q in sorted(qrels)[:3]}
    assert FIRST_STAGE_DEPTH == 1000
    assert first_stage(index, qs, 5) == index.search(qs, FIRST_STAGE_DEPTH)
    assert first_stage(index, qs, 2000) == index.search(qs, 2000)
    assert first_stage(index, {}, 5) == {}


def test_fusion_weight_on_held_out_synthetic_queries(tmp_path, sample, index):
    docs, _, _ = sample
    rr = load_reranker(tiny_t5(tmp_path / "t5"), dtype="float32", max_length=128)
    # Held-out synthetic queries: each document's title, its source document the one relevant.
    held = [{"query_id": f"s{i}", "query": docs[d].title, "pos_doc_id": d} for i, d in enumerate(sorted(docs)[:8])]
    out = fusion_weight_on_held_out(held, index, docs, rr, depth=5)
    assert set(out) == {"weight", "measure", "n_queries", "grid"} and out["measure"] == "RR@10" and out["n_queries"] == 8
    grid = out["grid"]
    assert out["weight"] in grid and grid[out["weight"]] == max(grid.values())
    # BM25 finds a title's document; an untrained random T5 does not: the weight leans to BM25.
    assert grid[1.0] > grid[0.0] and out["weight"] > 0.5
    assert fusion_weight_on_held_out([], index, docs, rr, depth=5) == {"weight": None, "reason": "no held-out synthetic queries"}
