"""From the pipeline table to executable jobs: each stage's command, env, shards and pod resources.

A :class:`StageJob` is the container contract. The local executor runs ``command`` once per shard
with ``env`` plus ``JOB_COMPLETION_INDEX``; the Kubernetes executor renders the very same command and
env into an Indexed Job. Secrets travel only by reference (``secret_env``), never by value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import PipelineConfig, ResourcesConfig
from ..pipeline import DataSize, Stage, resources_for, stages_for

SECRET_NAME = "inpars-api-keys"  # the k8s Secret holding API keys and tokens (k8s/secret.template.yaml)
HF_TOKEN_ENV = "HF_TOKEN"  # the Hugging Face token for gated hub models, by reference like API keys
OPTIONAL_SECRETS = frozenset({HF_TOKEN_ENV})  # pods start without these (public hub models need no token)


@dataclass
class StageJob:
    stage: str
    shards: int  # Indexed Job completions; the worker's shard count
    command: list[str]  # argv; the shard index comes from JOB_COMPLETION_INDEX
    env: dict[str, str] = field(default_factory=dict)  # plain, non-secret settings
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)  # VAR -> (secret, key)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    parallelism: int = 1  # shards running at once
    max_retries: int = 3  # per shard (backoffLimitPerIndex)


def secret_key(var: str) -> str:
    """The key of variable ``var`` in the Secret: lower case, ``_`` -> ``-`` (OPENAI_API_KEY -> openai-api-key)."""
    return var.lower().replace("_", "-")


def plan_stage(config: PipelineConfig, stage: Stage, run_uri: str, *, max_retries: int = 3, data: DataSize | None = None) -> StageJob:
    """One stage of ``config`` as a :class:`StageJob`; ``data`` sizes its pod (see :func:`inpars.pipeline.resources_for`)."""
    shards = stage.shards(config)
    resources = resources_for(config, stage.name, data)
    secret_env = {}
    if stage.name == "generate" and config.generate.backend == "openai":
        var = config.generate.api_key_env
        secret_env[var] = (SECRET_NAME, secret_key(var))
    hub = uses_hub(config, stage.name)
    if hub:  # gated hub models need a token; it travels by reference and is optional in the Secret
        secret_env[HF_TOKEN_ENV] = (SECRET_NAME, secret_key(HF_TOKEN_ENV))
    env = {"PYTHONUNBUFFERED": "1"}
    if not hub:
        env["HF_HUB_OFFLINE"] = "1"
    return StageJob(
        stage=stage.name,
        shards=shards,
        command=["inpars", "worker", stage.name, "--run", run_uri],
        env=env,
        secret_env=secret_env,
        resources=resources,
        parallelism=resources.parallelism or shards,
        max_retries=max_retries,
    )


def plan_pipeline(
    config: PipelineConfig, run_uri: str, *, max_retries: int = 3, until: str | None = None, data: DataSize | None = None
) -> list[StageJob]:
    """The stages of ``config`` in dependency order (up to and including ``until``), as :class:`StageJob`s."""
    return [plan_stage(config, stage, run_uri, max_retries=max_retries, data=data) for stage in stages_for(config, until)]


def data_size(run=None, config: PipelineConfig | None = None) -> DataSize | None:
    """What pods are sized from: the run's prepare record when prepare is committed, else an estimate
    from the corpus file's size (a local or gs:// file; None when it cannot be looked up cheaply)."""
    if run is not None:
        record = run.record("prepare", 0, 1)
        if record is not None and "store" in record["stats"]:
            return DataSize.from_prepare_stats(record["stats"])
        config = run.config
    if config is None:
        return None
    from ..datasets import corpus_source_bytes

    size = corpus_source_bytes(config.data.corpus)
    return DataSize.estimate(size) if size else None


def stage_models(config: PipelineConfig, stage: str) -> list[str]:
    """Every model a stage loads (generator, trained starting point, the filter's reranker, tokenizers)."""
    models = {
        "generate": [config.generate.model, config.generate.tokenizer],
        "filter": [config.filter.reranker_model if config.filter.strategy == "reranker" else None],
        "train": [config.train.model],
    }.get(stage, [])
    return [m for m in models if m]


def uses_hub(config: PipelineConfig, stage: str) -> bool:
    """Whether a stage's pod may need the Hugging Face hub: one of its models is neither a packaged
    offline alias nor a path (an API backend's model is a server-side name, not a hub id)."""
    from ..models import PACKAGED

    models = stage_models(config, stage)
    if stage == "generate" and config.generate.backend == "openai":
        models = [config.generate.tokenizer] if config.generate.tokenizer else []
    return any(m not in PACKAGED and not m.startswith(("/", ".", "gs://", "~")) for m in models)
