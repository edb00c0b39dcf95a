"""Prompt templates: verbatim InPars text, Promptagator examples drawn per document, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inpars.corpus import Document, read_jsonl
from inpars.errors import ConfigError, InputError
from inpars.prompts import known_prompts, load_prompt

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"
FEWSHOT = str(SAMPLE / "fewshot.jsonl")


def words(text: str, n: int) -> str:
    """A stand-in tokenizer (whitespace words) for structure tests; real-token truncation is in test_generate."""
    return " ".join(text.split()[:n])


DOC = Document("d1", "A title", "Some text\nwith a newline.")


def test_packaged_prompts_are_listed():
    assert {"inpars", "inpars-gbq", "promptagator-scifact", "promptagator"} <= set(known_prompts())


def test_inpars_prompt_is_the_original_text():
    pt = load_prompt("inpars").build(DOC, truncate=words)
    # Fragments of zetaalphavector/InPars templates.yaml, verbatim (double blanks included).
    assert pt.text.startswith("Example 1:\nDocument: We don't know a lot about the effects of caffeine")
    assert "Relevant Query: Is a little caffeine ok during pregnancy?\n\nExample 2:\n" in pt.text
    assert "The Canadian Armed Forces. 1  The first large-scale" in pt.text
    assert pt.text.endswith("Example 4:\nDocument: A title. Some text with a newline.\nRelevant Query:")
    assert pt.text.startswith(pt.prefix) and pt.prefix.endswith("Example 4:\nDocument: ")
    assert pt.fewshot_examples[0]["query"] == "Is a little caffeine ok during pregnancy?"
    assert all(e["doc_id"] is None for e in pt.fewshot_examples)


def test_gbq_prompt_asks_for_the_good_question():
    pt = load_prompt("inpars-gbq").build(DOC, truncate=words)
    assert "Good Question: How much caffeine is ok for a pregnant woman to have?\nBad Question: Is a little" in pt.text
    assert pt.text.endswith("\nGood Question:")
    assert pt.fewshot_examples[0]["query"] == "How much caffeine is ok for a pregnant woman to have?"


def test_document_truncated_by_the_given_tokenizer():
    long_doc = Document("d2", "", " ".join(f"w{i}" for i in range(500)))
    pt = load_prompt("inpars").build(long_doc, truncate=words, max_doc_tokens=20)
    tail = pt.text[len(pt.prefix) :].split("\nRelevant Query:")[0]
    assert tail.split() == [f"w{i}" for i in range(20)]


def test_promptagator_examples_drawn_per_document_and_recorded():
    prompt = load_prompt("promptagator-scifact", FEWSHOT, n_examples=3)
    a = prompt.build(Document("a", "", "alpha"), truncate=words, seed=0)
    b = prompt.build(Document("b", "", "beta"), truncate=words, seed=0)
    assert len(a.fewshot_examples) == 3 and set(a.fewshot_examples[0]) == {"query_id", "query", "doc_id"}
    assert a.fewshot_examples != b.fewshot_examples  # drawn per document
    for ex in a.fewshot_examples:
        assert f"Finding: {ex['query']}\n" in a.text
    # Seeded by (seed, doc_id): the same document gets the same examples whatever else is built.
    assert prompt.build(Document("a", "", "alpha"), truncate=words, seed=0).fewshot_examples == a.fewshot_examples
    assert prompt.build(Document("a", "", "alpha"), truncate=words, seed=1).fewshot_examples != a.fewshot_examples
    assert a.prefix == prompt.instruction and a.text.startswith(a.prefix)
    assert a.text.endswith("alpha\nFinding:")


def test_promptagator_never_uses_the_source_document(tmp_path):
    rows = read_jsonl(FEWSHOT)[:4]  # a pool of 4 examples, 3 drawn: the source is always a candidate
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt = load_prompt("promptagator-scifact", str(path), n_examples=3)
    source = rows[0]
    for seed in range(20):
        pt = prompt.build(Document(source["doc_id"], source["title"], source["text"]), truncate=words, seed=seed)
        assert source["doc_id"] not in {e["doc_id"] for e in pt.fewshot_examples}
        assert len(pt.fewshot_examples) == 3


def test_example_documents_truncated():
    prompt = load_prompt("promptagator-scifact", FEWSHOT)
    pt = prompt.build(DOC, truncate=words, max_example_tokens=5)
    blocks = pt.text[len(pt.prefix) :].split("\n\n")[:-1]
    assert len(blocks) == 3 and all(len(b.split("\nFinding:")[0].split()) <= 5 for b in blocks)


def test_generic_promptagator_fallback():
    prompt = load_prompt("promptagator-nfcorpus", FEWSHOT)
    assert prompt.name == "promptagator-nfcorpus"
    assert prompt.build(DOC, truncate=words).text.endswith("\nQuery:")


def test_custom_template_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        'name: mine\nmode: static\nexample_template: "D: {document}\\nQ: {query}\\n"\n'
        'target_template: "D: {document}\\nQ:"\nexamples:\n  - {document: x, query: y}\n'
    )
    pt = load_prompt(str(path)).build(DOC, truncate=words)
    assert pt.text == "D: x\nQ: y\nD: A title. Some text with a newline.\nQ:"


def test_unknown_prompt_lists_known_names():
    with pytest.raises(ConfigError, match="inpars-gbq"):
        load_prompt("no-such-prompt")


def test_promptagator_needs_a_fewshot_file():
    with pytest.raises(ConfigError, match="fewshot_file"):
        load_prompt("promptagator-scifact")


def test_bad_fewshot_line_names_file_and_line(tmp_path):
    path = tmp_path / "few.jsonl"
    good = json.dumps({"query_id": "1", "query": "q", "doc_id": "d", "title": "", "text": "t"})
    path.write_text(good + "\n{not json\n")
    with pytest.raises(InputError, match=f"{path}:2"):
        load_prompt("promptagator-scifact", str(path))
    path.write_text(good + "\n" + json.dumps({"query_id": "2", "query": "", "doc_id": "d", "text": "t"}) + "\n")
    with pytest.raises(InputError, match=f"{path}:2"):
        load_prompt("promptagator-scifact", str(path))
