"""Publishing: local and gs:// destinations, deterministic bytes, idempotent reruns, conflicts, checksums."""

from __future__ import annotations

import hashlib
import json

import pytest

from inpars.config import PipelineConfig
from inpars.corpus import Document
from inpars.errors import InParsError
from inpars.negatives import write_triples_tsv
from inpars.publish import PUBLISHED_FIELDS, dataset_jsonl, publish_dataset
from inpars.storage import open_storage


def make_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        # extra fields first on purpose: publishing must put the InPars fields first
        rows.append(
            {
                "model": "smollm2-135m",
                "score": -0.1 * i,
                "query_id": f"d{i}-0",
                "fewshot_examples": [{"query_id": None, "query": "example?", "doc_id": None}],
                "prompt_text": f"Document: text {i}\nRelevant query:",
                "log_probs": [-0.1, -0.2 * i],
                "doc_text": f"Text of document {i} é",
                "doc_id": f"d{i}",
                "query": " ".join(["word"] * (3 + i % 5)),
            }
        )
    return rows


RUN_MANIFEST = {
    "run_id": "scifact-20261126-1530-ab12",
    "created_at": "2026-11-26T15:30:00+00:00",
    "config": json.loads(json.dumps(PipelineConfig().to_dict())),
    "code": {"inpars": "0.1.0", "git_commit": "0123456789abcdef"},
    "packages": {"transformers": "5.24.0"},
    "model": {"generate": "smollm2-135m", "train": "minilm-l6"},
    "prompt": {"name": "inpars"},
    "seed": 0,
    "usage": {"not": "published"},
}
FILTER = {"strategy": "scores", "n_in": 20, "n_kept": 12, "dropped_by_reason": {"duplicate": 3, "copy": 1, "score": 4}, "threshold": -1.1}


@pytest.fixture(params=["local", "gcs"])
def destination(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "published")
    return request.getfixturevalue("gcs_uri")


def test_publish_and_idempotent_rerun(destination):
    rows = make_rows()
    statuses = []
    m = publish_dataset(
        rows,
        destination,
        dataset="scifact",
        manifest=RUN_MANIFEST,
        filter_stats=FILTER,
        on_file=lambda name, status: statuses.append((name, status)),
    )
    name = "scifact_synthetic_queries_12.jsonl"
    v2 = "scifact/queries_filtered_v2.jsonl"  # the released InPars-v2 layout, beside our own file name
    assert statuses == [(name, "created"), (v2, "created"), ("README.md", "created"), ("manifest.json", "created")]
    store = open_storage(destination)
    assert sorted(store.list("")) == ["README.md", "manifest.json", v2, name]
    assert store.read_bytes(v2) == store.read_bytes(name)
    # the manifest: checksums and sizes of what is really stored
    assert json.loads(store.read_bytes("manifest.json")) == m
    for fname, info in m["files"].items():
        data = store.read_bytes(fname)
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    assert m["rows"] == 12 and m["files"][name]["rows"] == 12 and m["model"]["generate"] == "smollm2-135m"
    assert m["seed"] == 0 and m["code"]["git_commit"] == "0123456789abcdef" and m["config"]["data"]["name"] == "scifact"
    assert "usage" not in m and m["filter"] == FILTER
    assert m["statistics"]["filter_threshold"] == pytest.approx(-1.1)
    # the JSONL: published fields first, then the rest; every row, in order
    lines = store.read_bytes(name).decode().splitlines()
    first = json.loads(lines[0])
    assert list(first)[: len(PUBLISHED_FIELDS)] == list(PUBLISHED_FIELDS)
    assert [json.loads(line)["doc_id"] for line in lines] == [r["doc_id"] for r in rows]
    assert json.loads(lines[3]) == rows[3] and "é" in lines[0]
    # the card
    card = store.read_bytes("README.md").decode()
    for needle in (
        "12 synthetic queries",
        "smollm2-135m",
        "`inpars`",
        "median",
        "Filter threshold (lowest kept score): -1.1000",
        "| duplicate | 3 |",
        "Licence",
        "p50",
    ):
        assert needle in card, needle
    # rerun: nothing published twice, same manifest
    statuses.clear()
    again = publish_dataset(
        make_rows(),
        destination,
        dataset="scifact",
        manifest=RUN_MANIFEST,
        filter_stats=FILTER,
        on_file=lambda name, status: statuses.append((name, status)),
    )
    assert again == m and [s for _, s in statuses] == ["skipped"] * 4


def test_conflicting_content_is_refused(destination):
    publish_dataset(make_rows(), destination, dataset="scifact", manifest=RUN_MANIFEST)
    store = open_storage(destination)
    before = {k: store.read_bytes(k) for k in store.list("")}
    changed = make_rows()
    changed[5]["query"] = "a different query here"
    with pytest.raises(InParsError, match="already exists with different content"):
        publish_dataset(changed, destination, dataset="scifact", manifest=RUN_MANIFEST)
    assert {k: store.read_bytes(k) for k in store.list("")} == before  # nothing touched


def test_deterministic_bytes_and_bad_input(tmp_path):
    assert dataset_jsonl(make_rows()) == dataset_jsonl(make_rows())
    with pytest.raises(InParsError, match="nothing to publish"):
        publish_dataset([], str(tmp_path), dataset="x", manifest={})
    with pytest.raises(InParsError, match="no query"):
        publish_dataset([{"doc_id": "d1"}], str(tmp_path), dataset="x", manifest={})
    # rows without scores (no filter) still publish, without score statistics
    rows = [{"query": "what is x", "doc_id": "d1"}]
    m = publish_dataset(rows, str(tmp_path / "noscore"), dataset="x", manifest={})
    assert "score" not in m["statistics"] and m["statistics"]["query_tokens"]["max"] == 3


def generated_rows(n: int = 20) -> list[dict]:
    """What the generate stage writes: the kept rows' fields without a score, plus some empty queries."""
    rows = []
    for i in range(n):
        row = {k: v for k, v in make_rows(n)[i].items() if k != "score"}
        row.update(prompt="inpars", seed=0, usage={"prompt_tokens": 10, "completion_tokens": 3})
        if i % 7 == 6:
            row["query"] = ""  # the model wrote nothing: published with the rest of the generated rows
        rows.append(row)
    return rows


def triples_file(path, rows) -> int:
    docs = {r["doc_id"]: Document(r["doc_id"], "", r["doc_text"]) for r in rows}
    docs["neg"] = Document("neg", "", 'A "quoted" negative\twith a tab')
    triples = [{"query_id": r["query_id"], "query": r["query"], "pos_doc_id": r["doc_id"], "neg_doc_ids": ["neg", "d0"]} for r in rows]
    return write_triples_tsv(triples, docs, path)


def test_released_inpars_v2_layout_loads_with_hugging_face_datasets(tmp_path):
    """Per dataset: all generated queries, the filtered queries and the triples, under the released names;
    each loads with `datasets` as the released files do; manifest.json has size and sha256 of every file."""
    from datasets import load_dataset

    kept, generated = make_rows(), generated_rows()
    n_triples = triples_file(tmp_path / "triples.tsv", kept)
    dest = tmp_path / "pub"
    statuses = []
    m = publish_dataset(
        iter(kept),  # streams: each is read once
        str(dest),
        dataset="scifact",
        manifest=RUN_MANIFEST,
        filter_stats=FILTER,
        generated=iter(generated),
        triples_tsv=tmp_path / "triples.tsv",
        on_file=lambda name, status: statuses.append(name),
    )
    layout = ["scifact/queries.jsonl", "scifact/queries_filtered_v2.jsonl", "scifact/triples_train_v2.tsv"]
    assert statuses == ["scifact_synthetic_queries_12.jsonl", *layout, "README.md", "manifest.json"]
    store = open_storage(str(dest))
    assert sorted(store.list("")) == sorted(statuses)
    assert set(m["files"]) == set(statuses) - {"manifest.json"}
    for name, info in m["files"].items():
        data = store.read_bytes(name)
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data), name
    assert [m["files"][name]["rows"] for name in layout] == [20, 12, n_triples] and n_triples == 24
    assert m["counts"] == {"generated": 20, "filtered": 12, "triples": 24}
    assert (dest / "scifact" / "triples_train_v2.tsv").read_bytes() == (tmp_path / "triples.tsv").read_bytes()

    cache = str(tmp_path / "hf-cache")
    gen = load_dataset("json", data_files=str(dest / layout[0]), cache_dir=cache)["train"]
    assert gen.num_rows == 20 and list(gen.column_names[: len(PUBLISHED_FIELDS)]) == list(PUBLISHED_FIELDS)
    assert gen[6]["query"] == "" and gen[3]["doc_text"] == generated[3]["doc_text"] and gen[0]["usage"]["prompt_tokens"] == 10
    filtered = load_dataset("json", data_files=str(dest / layout[1]), cache_dir=cache)["train"]
    assert filtered["query_id"] == [r["query_id"] for r in kept] and filtered["score"] == pytest.approx([r["score"] for r in kept])
    assert filtered[0]["fewshot_examples"] == [{"query_id": None, "query": "example?", "doc_id": None}]
    triples = load_dataset("csv", data_files=str(dest / layout[2]), sep="\t", names=("query", "positive", "negative"), cache_dir=cache)[
        "train"
    ]
    assert triples.num_rows == 24 and triples[0] == {
        "query": kept[0]["query"],
        "positive": kept[0]["doc_text"],
        "negative": 'A "quoted" negative with a tab',
    }

    card = store.read_bytes("README.md").decode()
    for needle in (
        "`scifact/queries.jsonl`",
        "`scifact/triples_train_v2.tsv`",
        "generated queries: 20",
        "training triples: 24",
        'load_dataset("csv"',
    ):
        assert needle in card, needle
    # rerun: byte-identical, nothing written
    again = publish_dataset(
        kept,
        str(dest),
        dataset="scifact",
        manifest=RUN_MANIFEST,
        filter_stats=FILTER,
        generated=generated,
        triples_tsv=tmp_path / "triples.tsv",
    )
    assert again == m
    # a different triples file is refused before anything is written
    triples_file(tmp_path / "other.tsv", kept[:5])
    with pytest.raises(InParsError, match="triples_train_v2.tsv already exists with different content"):
        publish_dataset(
            kept,
            str(dest),
            dataset="scifact",
            manifest=RUN_MANIFEST,
            filter_stats=FILTER,
            generated=generated,
            triples_tsv=tmp_path / "other.tsv",
        )


def test_outside_a_run_the_card_names_model_prompt_and_seed_from_the_rows(tmp_path):
    kept = [dict(r, prompt="inpars", seed=3) for r in make_rows()]
    m = publish_dataset(kept, str(tmp_path / "pub"), dataset="x", manifest={})
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "- model: `smollm2-135m`" in card and "- prompt: `inpars`" in card and "- seed: `3`" in card
    assert "unknown" not in card
    assert m["model"] == {"generate": "smollm2-135m"} and m["prompt"] == {"name": "inpars"} and m["seed"] == 3
    # rows that disagree are all named; rows that do not say stay unknown
    mixed = [dict(r, model="other-model" if i % 2 else r["model"]) for i, r in enumerate(make_rows())]
    publish_dataset(mixed, str(tmp_path / "mixed"), dataset="x", manifest={})
    card = (tmp_path / "mixed" / "README.md").read_text()
    assert "- model: `other-model`, `smollm2-135m` (mixed)" in card and "- prompt: unknown" in card
