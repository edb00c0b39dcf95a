"""The quality benchmark's own logic (configuration grammar, table, targets, missing data).

The end-to-end run needs minutes of model work; it is exercised by running the script itself
(see benchmarks/README.md). These tests cover what can go wrong without a model.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from inpars.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_scifact.py"


@pytest.fixture(scope="module")
def qs():
    spec = importlib.util.spec_from_file_location("quality_scifact", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_grammar(qs):
    c = qs.parse_config("ce-lce+deep+cons")
    assert (c["model_type"], c["loss"], c["filter"], c["negatives"]) == ("cross-encoder", "lce", "consistency", "deep")
    assert qs.parse_config("ce-bce")["loss"] == "bce"
    b = qs.parse_config("bi+nofilter")
    assert (b["model_type"], b["filter"], b["negatives"]) == ("bi-encoder", "none", "top")
    assert not b["wise"] and qs.parse_config("bi+deep+wise")["wise"]
    for bad in ("monot5", "ce-lce+deeper", "ce-lce+cons+nofilter", "bi+deep+deep"):
        with pytest.raises(ConfigError):
            qs.parse_config(bad)


def test_table_and_targets(qs):
    def row(v, diff=None):
        r = {"nDCG@10": v, "R@100": 0.9, "per_query_nDCG@10": {str(i): v + (0.05 if i % 2 else -0.05) for i in range(10)}}
        if diff is not None:
            r["vs_bm25"] = {"mean_diff": diff, "ci_low": diff - 0.01, "ci_high": diff + 0.01, "wins": 3, "losses": 1, "ties": 6}
        return r

    results = {
        "BM25": row(0.676),
        "zero-shot hybrid (w=0.3)": row(0.734, 0.058),
        "ce-lce": row(0.70, 0.024),
        "ce-lce + BM25 (w=0.7)": row(0.72, 0.044),
    }
    table = qs.format_results(results)
    assert "+0.0240 [+0.014, +0.034]" in table and "3/1/6" in table
    goals = qs.targets(results, ["ce-lce"], ["ce-lce + BM25 (w=0.7)"], "zero-shot hybrid (w=0.3)")
    assert [g["met"] for g in goals] == [True, False]
    assert goals[0]["ci"] == "above 0"
    assert goals[1]["vs_hybrid"]["mean_diff"] == pytest.approx(-0.014) and goals[1]["ci"] == "below 0"


def test_missing_data_exits_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0
    assert "SciFact not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compare_quality_matches_systems_across_fusion_weights(tmp_path):
    """Two runs' systems are paired by name whatever weight each run's held-out queries chose."""
    import json

    a = {
        "per_query_nDCG@10": {
            "BM25": {"q1": 0.5, "q2": 0.5, "q3": 0.5},
            "bi (dense) + BM25 (w=0.7)": {"q1": 0.6, "q2": 0.4, "q3": 0.5},
            "only in A": {"q1": 1.0, "q2": 1.0, "q3": 1.0},
        }
    }
    b = {"per_query_nDCG@10": {"BM25": {"q1": 0.5, "q2": 0.5, "q3": 0.5}, "bi (dense) + BM25 (w=0.5)": {"q1": 0.9, "q2": 0.4, "q3": 0.2}}}
    paths = []
    for name, run in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "cmp.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "compare_quality.py"), *map(str, paths), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {r["system"]: r for r in json.loads(out.read_text())["systems"]}
    assert set(rows) == {"BM25", "bi (dense) + BM25"}
    fused = rows["bi (dense) + BM25"]
    assert (fused["a"], fused["b"]) == ("bi (dense) + BM25 (w=0.7)", "bi (dense) + BM25 (w=0.5)")
    assert fused["mean_diff"] == pytest.approx(0.0) and (fused["wins"], fused["losses"], fused["ties"]) == (1, 1, 1)
    assert rows["BM25"]["mean_diff"] == 0 and "BM25 weight 0.7 / 0.5" in done.stdout
