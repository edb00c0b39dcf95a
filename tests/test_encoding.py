"""Model encoding shared by training and scoring: pairs assembled from distinct texts equal the
tokenizer's own, the monoT5 input, and padded batches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from inpars.corpus import read_corpus, read_qrels, read_queries
from inpars.encoding import collate, encode_pairs, monot5_input
from inpars.models import resolve_model

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


@pytest.fixture(scope="module")
def sample():
    return read_corpus(SAMPLE), read_queries(SAMPLE), read_qrels(SAMPLE / "qrels" / "test.tsv")


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
    feats = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1]}, {"input_ids": [8], "token_type_ids": [0]}]
    batch = collate(feats, pad_id=0, multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_monot5_pairs_are_the_monot5_input_when_nothing_is_cut(sample):
    """Assembled from pieces, a monoT5 pair is exactly the tokenized ``monot5_input`` text (ByT5: bytes)."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    pairs = _mixed_pairs(sample, 20)
    qs, ds = [q[:100] for q, _ in pairs], [d[:300] for _, d in pairs]
    ours = encode_pairs(tokenizer, "monot5", qs, ds, 512)
    assert [o["input_ids"] for o in ours] == [tokenizer(monot5_input(q, d))["input_ids"] for q, d in zip(qs, ds)]
