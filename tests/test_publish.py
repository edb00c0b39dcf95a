"""Publishing: local and gs:// destinations, deterministic bytes, idempotent reruns, conflicts, checksums."""

from __future__ import annotations

import hashlib
import json

import pytest

from inpars.config import PipelineConfig
from inpars.errors import InParsError
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
    assert statuses == [(name, "created"), ("README.md", "created"), ("manifest.json", "created")]
    store = open_storage(destination)
    assert sorted(store.list("")) == ["README.md", "manifest.json", name]
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
    assert again == m and [s for _, s in statuses] == ["skipped"] * 3


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
