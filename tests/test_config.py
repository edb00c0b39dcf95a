"""Settings are validated once, up front: a bad one is exit 42 naming the setting, the value and what is
allowed, before a run folder exists, a model loads or a request is made; no traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from inpars.config import PipelineConfig, runtime_only
from inpars.errors import EXIT_PERMANENT, ConfigError
from inpars.launch.cli import app

BAD_SETTINGS = [
    ("generate.n_docs=-3", ["generate.n_docs", "-3", "greater than or equal to 1"]),
    ("generate.n_docs=eight", ["generate.n_docs", "'eight'", "valid integer"]),
    ("generate.shards=two", ["generate.shards", "'two'", "valid integer"]),
    ("generate.shards=0", ["generate.shards", "0", "greater than or equal to 1"]),
    ("filter.keep_fraction=1.5", ["filter.keep_fraction", "1.5", "less than or equal to 1"]),
    ("filter.strategy=best", ["filter.strategy", "'best'", "'scores', 'reranker' or 'consistency'"]),
    ("generate.backend=gpt", ["generate.backend", "'gpt'", "'transformers', 'openai' or 'vllm'"]),
    ("train.held_out_fraction=1", ["train.held_out_fraction", "1", "less than 1"]),
    ("generate.temperature=yes", ["generate.temperature", "valid number"]),
    ("evaluate.measures=[nDCG@ten]", ["evaluate.measures", "unknown measure 'nDCG@ten'"]),
    ("generate.nope=1", ["unknown setting 'generate.nope'"]),
    ("resources.train.memory=lots", ["resources.train.memory", "'lots'"]),
    ("resources.trian.cpu=2", ["unknown stage", "trian"]),
    ("filter.min_query_tokens=99", ["min_query_tokens (99) is larger than max_query_tokens (64)"]),
    ("generate.prompt=nonexistent-prompt", ["generate.prompt", "unknown prompt 'nonexistent-prompt'"]),
    ("data.corpus=/no/such/corpus.jsonl", ["data.corpus", "/no/such/corpus.jsonl", "no such file"]),
]


@pytest.mark.parametrize("setting,expected", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_up_front(setting, expected, tmp_path):
    ws = tmp_path / "ws"
    result = CliRunner().invoke(app, ["run", "--workspace", str(ws), "--set", setting])
    assert result.exit_code == EXIT_PERMANENT, result.output
    for part in expected:
        assert part in result.output, (part, result.output)
    assert "Traceback" not in result.output
    assert not ws.exists()  # nothing was created, so nothing was loaded or paid for


def test_bad_config_file_names_its_settings(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("generate:\n  n_docs: eight\n  shards: two\nfilter:\n  keep_fraction: 1.5\n")
    result = CliRunner().invoke(app, ["run", "--workspace", str(tmp_path / "ws"), "-c", str(path)])
    assert result.exit_code == EXIT_PERMANENT
    for part in (str(path), "generate.n_docs = 'eight'", "generate.shards = 'two'", "filter.keep_fraction = 1.5"):
        assert part in result.output
    path.write_text("generate: [1, 2\n")
    result = CliRunner().invoke(app, ["run", "--workspace", str(tmp_path / "ws"), "-c", str(path)])
    assert result.exit_code == EXIT_PERMANENT and "not valid YAML" in result.output


def test_valid_config_round_trips_through_the_manifest_form():
    config = PipelineConfig().override({"generate.n_docs": 50, "train.relevance_tokens": ["yes", "no"], "resources.train.gpu": 1})
    again = PipelineConfig.from_dict(config.to_dict())
    assert again == config and again.train.relevance_tokens == ("yes", "no") and again.resources["train"].gpu == 1
    with pytest.raises(ConfigError, match="gpu_type='nvidia-l4' needs gpu >= 1"):
        PipelineConfig().override({"resources.train.gpu_type": "nvidia-l4"})


def test_only_runtime_settings_change_on_resume():
    runtime_only({"generate.budget_usd": 5.0, "resources.train.gpu": 1, "generate.concurrency": 4})
    with pytest.raises(ConfigError, match="generate.n_docs"):
        runtime_only({"generate.n_docs": 10})
