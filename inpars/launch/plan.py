"""The pipeline plan: which stages run, in which order, with how many shards, and how each is invoked.

A :class:`StageJob` is the container contract. The local executor runs ``command`` once per shard
with ``env`` plus ``JOB_COMPLETION_INDEX``; the Kubernetes executor renders the very same command and
env into an Indexed Job. Secrets travel only by reference (``secret_env``), never by value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import PipelineConfig, ResourcesConfig

# Per-stage defaults (a user's `resources.<stage>` in the config overrides them).
DEFAULT_RESOURCES = {
    "generate": ResourcesConfig(cpu="4", memory="16Gi"),
    "filter": ResourcesConfig(cpu="2", memory="8Gi"),
    "negatives": ResourcesConfig(cpu="2", memory="8Gi"),
    "train": ResourcesConfig(cpu="4", memory="16Gi"),
    "rerank": ResourcesConfig(cpu="4", memory="16Gi"),
    "evaluate": ResourcesConfig(cpu="1", memory="4Gi"),
    "publish": ResourcesConfig(cpu="1", memory="2Gi"),
}

SECRET_NAME = "inpars-api-keys"  # the k8s Secret holding API keys (k8s/secret.template.yaml)


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


def stage_shards(config: PipelineConfig) -> dict[str, int]:
    """How many shards each stage of this config runs (global stages run one)."""
    shards = {
        "generate": config.generate.shards,
        "filter": 1,
        "negatives": config.negatives.shards,
        "train": 1,
        "rerank": config.rerank.shards,
        "evaluate": 1,
    }
    if config.publish.destination:
        shards["publish"] = 1
    return shards


def plan_pipeline(config: PipelineConfig, run_uri: str, *, max_retries: int = 3, until: str | None = None) -> list[StageJob]:
    """The stages of ``config`` in dependency order (up to and including ``until``), as :class:`StageJob`s."""
    shards_by_stage = stage_shards(config)
    if until is not None and until not in shards_by_stage:
        from ..errors import ConfigError

        raise ConfigError(f"unknown stage {until!r}; this run's stages: {list(shards_by_stage)}")
    jobs = []
    for stage, shards in shards_by_stage.items():
        resources = config.resources.get(stage) or DEFAULT_RESOURCES[stage]
        secret_env = {}
        if stage == "generate" and config.generate.backend == "openai":
            var = config.generate.api_key_env
            secret_env[var] = (SECRET_NAME, var.lower().replace("_", "-"))
        jobs.append(
            StageJob(
                stage=stage,
                shards=shards,
                command=["inpars", "worker", stage, "--run", run_uri],
                env={"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"} if not _uses_hub(config, stage) else {"PYTHONUNBUFFERED": "1"},
                secret_env=secret_env,
                resources=resources,
                parallelism=resources.parallelism or shards,
                max_retries=max_retries,
            )
        )
        if stage == until:
            break
    return jobs


def _uses_hub(config: PipelineConfig, stage: str) -> bool:
    # Packaged aliases and local paths need no hub; an HF id chosen by the user may.
    from ..models import PACKAGED

    model = {"generate": config.generate.model, "train": config.train.model}.get(stage)
    if model is None or model in PACKAGED or model.startswith(("/", ".", "gs://")):
        return False
    return True


def launch_command(job: StageJob) -> list[str]:
    """The argv that runs one shard of ``job``: its ``command``, under ``torchrun`` for a train stage
    given several GPUs (one process per GPU; the worker trains with DDP).

    Both executors start this: the Kubernetes renderer as the container command, the local executor
    as the subprocess.
    """
    gpus = int(job.resources.gpu or 0)
    if job.stage == "train" and gpus > 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "--no-python", *job.command]
    return list(job.command)
