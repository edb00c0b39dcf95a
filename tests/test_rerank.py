"""Reranker scoring (fast path vs a plain loop), rerank_run, fusion and the fusion-weight choice."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from inpars.corpus import read_corpus, read_qrels, read_queries
from inpars.errors import InputError
from inpars.models import resolve_model
from inpars.rerank import (
    choose_fusion_weight,
    fuse_runs,
    guess_model_type,
    load_reranker,
    rerank_run,
)

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
    from inpars.rerank import encode_pairs

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


def test_fuse_runs_min_max_union():
    first = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    second = {"q": {"c": 10.0, "b": 5.0, "d": 0.0}, "q2": {"x": 1.0}}
    fused = fuse_runs(first, second, 0.25)
    assert fused["q"] == pytest.approx({"a": 0.25, "b": 0.125 + 0.375, "c": 0.75, "d": 0.0})
    assert fused["q2"] == {"x": 0.0}  # one doc: min == max, no order information
    assert fuse_runs(first, second, 1.0)["q"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.0})


def test_choose_fusion_weight_finds_the_known_best():
    # q1: the relevant doc r wins iff w < 2/3; q2: iff w > 0.526. Only w = 0.6 gets both right.
    first = {"q1": {"r": 0.5, "a": 1.0, "b": 0.0}, "q2": {"r": 1.0, "a": 0.1, "b": 0.0}}
    second = {"q1": {"r": 1.0, "a": 0.0, "b": 0.5}, "q2": {"r": 0.0, "a": 1.0, "b": 0.45}}
    qrels = {"q1": {"r": 1}, "q2": {"r": 1}}
    best, values = choose_fusion_weight(first, second, qrels)
    assert best == 0.6
    assert values[0.6] == pytest.approx(1.0)
    assert values[0.5] == pytest.approx(0.75) and values[0.7] == pytest.approx(0.75)
    assert len(values) == 11 and all(math.isfinite(v) for v in values.values())
    with pytest.raises(InputError):
        choose_fusion_weight(first, second, {"other": {"r": 1}})


def test_fusion_weight_ties_go_to_the_middle_of_the_plateau():
    # Both runs rank the relevant document first: every weight scores RR@10 = 1.
    first = {"q": {"rel": 2.0, "other": 1.0}}
    second = {"q": {"rel": 0.9, "other": 0.1}}
    weight, values = choose_fusion_weight(first, second, {"q": {"rel": 1}})
    assert set(values.values()) == {1.0} and weight == pytest.approx(0.5)


def _mixed_pairs(sample, n: int = 400) -> list[tuple[str, str]]:
    """Realistic pairs, plus pairs whose *query* is the longer text (cut mid-word at random)."""
    docs, queries, _ = sample
    rng = random.Random(3)
    texts = [d.contents for d in docs.values()]
    out = [(rng.choice(list(queries.values())), rng.choice(texts)) for _ in range(n)]
    out += [(rng.choice(texts)[: rng.randrange(1, 2500)], rng.choice(texts)[: rng.randrange(1, 2500)]) for _ in range(n)]
    return out


@pytest.mark.parametrize("max_length", [32, 63, 256, 257])
def test_pairs_assembled_from_distinct_texts_equal_the_tokenizers_own(sample, max_length):
    """Tokenizing each distinct text once and assembling the pairs gives exactly the ids and token types
    of ``tokenizer(q, d, truncation="longest_first")``, long queries and odd budgets included."""
    from transformers import AutoTokenizer

    from inpars.rerank import encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6").name_or_path)
    pairs = _mixed_pairs(sample)
    qs, ds = [q for q, _ in pairs], [d for _, d in pairs]
    ours = encode_pairs(tokenizer, "cross-encoder", qs, ds, max_length)
    ref = tokenizer(qs, ds, truncation="longest_first", max_length=max_length)
    assert [o["input_ids"] for o in ours] == ref["input_ids"]
    assert [o["token_type_ids"] for o in ours] == ref["token_type_ids"]
    assert max(len(o["input_ids"]) for o in ours) == max_length  # truncation was exercised


def test_pair_layout_is_learnt_from_the_tokenizer(sample):
    """A RoBERTa-style layout (<s> q </s></s> d </s>, no token types) is reproduced too."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from inpars.rerank import encode_pairs

    pairs = _mixed_pairs(sample, 100)
    words = sorted({w for q, d in pairs for w in (q + " " + d).split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_input_names=["input_ids", "attention_mask"]
    )
    qs, ds = [q for q, _ in pairs], [d for _, d in pairs]
    ours = encode_pairs(tokenizer, "cross-encoder", qs, ds, 101)
    ref = tokenizer(qs, ds, truncation="longest_first", max_length=101)
    assert [o["input_ids"] for o in ours] == ref["input_ids"]
    assert all(set(o) == {"input_ids"} for o in ours)
    assert ours[0]["input_ids"][0] == 1 and ours[0]["input_ids"].count(2) == 3


def test_collate_pads_right_and_masks(sample):
    from inpars.rerank import collate

    feats = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1]}, {"input_ids": [8], "token_type_ids": [0]}]
    batch = collate(feats, pad_id=0, multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
