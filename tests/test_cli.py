"""The `inpars` stage commands over files, chained as the README shows them, and their error contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inpars.corpus import read_jsonl
from inpars.errors import EXIT_PERMANENT
from inpars.runs import read_run

SAMPLE = str(Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample")
BIN = Path(sys.executable).parent


def inpars(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BIN / "inpars"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_stage_commands_chain_over_files(tmp_path):
    steps = [
        ["generate", "--corpus", SAMPLE, "--output", "gen.jsonl", "--n-docs", "6", "--batch-size", "6", "--max-new-tokens", "20"],
        ["filter", "--input", "gen.jsonl", "--output", "kept.jsonl", "--dropped", "dropped.jsonl", "--min-query-tokens", "2"],
        ["negatives", "--input", "kept.jsonl", "--corpus", SAMPLE, "--output", "triples.jsonl", "--tsv", "triples.tsv", "--depth", "20"],
        [
            "train",
            "--triples",
            "triples.jsonl",
            "--corpus",
            SAMPLE,
            "--output-dir",
            "model",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "128",
        ],
        [
            "rerank",
            "--model",
            "model",
            "--corpus",
            SAMPLE,
            "--queries",
            SAMPLE,
            "--qrels",
            f"{SAMPLE}/qrels/test.tsv",
            "--output",
            "reranked.trec",
            "--depth",
            "5",
            "--max-length",
            "128",
        ],
        ["evaluate", "--run", "reranked.trec", "--qrels", f"{SAMPLE}/qrels/test.tsv", "--exclude-fewshot", "gen.jsonl", "--json", "m.json"],
        ["publish", "--input", "kept.jsonl", "--destination", "pub", "--dataset", "scifact"],
    ]
    for step in steps:
        res = inpars(*step, cwd=tmp_path)
        assert res.returncode == 0, f"inpars {step[0]}: {res.stderr[-2000:]}"
    generated, kept = read_jsonl(tmp_path / "gen.jsonl"), read_jsonl(tmp_path / "kept.jsonl")
    assert len(generated) == 6 and len(kept) + len(read_jsonl(tmp_path / "dropped.jsonl")) == 6
    assert len((tmp_path / "triples.tsv").read_text().splitlines()) == 3 * len(kept)
    run = read_run(tmp_path / "reranked.trec")
    assert len(run) == 60 and all(len(docs) > 5 for docs in run.values())  # reranked head + first-stage tail
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["reranked"]["aggregate"]["nDCG@10"] <= 1
    assert (tmp_path / "pub" / f"scifact_synthetic_queries_{len(kept)}.jsonl").exists()


def test_bad_input_exits_permanent_with_file_and_line(tmp_path):
    (tmp_path / "gen.jsonl").write_text('{"query": "a", "doc_id": "1", "log_probs": [-1.0]}\nnot json\n', encoding="utf-8")
    res = inpars("filter", "--input", "gen.jsonl", "--output", "kept.jsonl", cwd=tmp_path)
    assert res.returncode == EXIT_PERMANENT and "gen.jsonl:2: malformed JSON" in res.stderr
    res = inpars("generate", "--corpus", SAMPLE, "--output", "g.jsonl", "--prompt", "no-such-prompt", cwd=tmp_path)
    assert res.returncode == EXIT_PERMANENT and "no-such-prompt" in res.stderr
