"""The pipeline configuration: one dataclass per stage, one :class:`PipelineConfig` for a run.

A run's config is written once into its manifest; every worker (a local subprocess or a pod) reads
it back from the workspace, so a stage needs nothing on its command line but the run and its shard.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    corpus: str = "builtin:scifact-sample"  # BEIR folder, JSONL/TSV/CSV file, gs:// URI or builtin:NAME
    queries: str | None = None  # evaluation queries (default: the BEIR folder's queries.jsonl)
    qrels: str | None = None  # evaluation qrels (default: the BEIR folder's qrels/test.tsv)
    name: str = "scifact"  # dataset name: picks promptagator-<name> and names published files


@dataclass
class GenerateConfig:
    backend: str = "transformers"  # transformers | openai | vllm
    model: str = "smollm2-135m"  # a packaged alias (inpars.models), an HF hub id or a local path
    prompt: str = "inpars"  # inpars | inpars-gbq | promptagator-<dataset> | path to a YAML template
    fewshot_file: str | None = None  # (query, document) pairs for promptagator prompts
    n_docs: int | None = 100  # sample size (None: every document)
    seed: int = 0
    max_new_tokens: int = 32
    max_doc_tokens: int = 256  # documents truncated by tokens in the prompt
    max_example_tokens: int = 128  # few-shot example documents truncated by tokens
    batch_size: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    dtype: str = "auto"  # auto (bf16 where supported) | float32 | bfloat16 | float16
    device: str = "auto"
    shards: int = 1
    checkpoint_every: int = 64  # rows per checkpoint chunk
    # API backend (issue: OpenAI-compatible servers)
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable; the key itself is never stored
    chat: bool = False
    concurrency: int = 8
    max_retries: int = 8
    request_timeout: float = 60.0
    prices: dict[str, float] = field(default_factory=dict)  # per 1M tokens: {"prompt": x, "completion": y}
    budget_usd: float | None = None
    tokenizer: str | None = None  # API backend: local HF tokenizer (alias/id/path) when the server has no /tokenize


@dataclass
class FilterConfig:
    strategy: str = "scores"  # scores | reranker | consistency
    aggregate: str = "mean"  # mean | sum (of token log-probs)
    keep_top_k: int | None = None
    keep_fraction: float | None = 0.7
    min_query_tokens: int = 3
    max_query_tokens: int = 64
    drop_copies: bool = True  # drop queries copied verbatim from their document
    drop_duplicates: bool = True
    reranker_model: str | None = None  # for strategy=reranker
    consistency_top_k: int = 10  # for strategy=consistency


@dataclass
class NegativesConfig:
    retriever: str = "bm25s"  # bm25s | pyserini
    depth: int = 100  # BM25 hits retrieved per query
    n_negatives: int = 3
    skip_top: int = 0  # ignore the first ranks (likely false negatives)
    seed: int = 0
    shards: int = 1


@dataclass
class TrainConfig:
    # auto: what `model` already is (a sentence-embedding model -> bi-encoder, T5 -> monot5, else
    # cross-encoder; see inpars.train) | cross-encoder | monot5 | bi-encoder
    model_type: str = "auto"
    model: str = "minilm-l6"  # packaged alias, HF id or local path
    loss: str = "lce"  # lce (group softmax over positive + negatives) | bce
    learning_rate: float | None = None  # default: 3e-4 for T5, 3e-5 otherwise
    batch_size: int = 8
    epochs: float = 1.0
    max_steps: int | None = None
    max_length: int = 256
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    relevance_tokens: tuple[str, str] = ("true", "false")  # monoT5; FLAN style: ("yes", "no")
    held_out_fraction: float = 0.1  # synthetic queries kept aside (fusion weight, validation)
    # Share of the starting weights averaged back into the trained ones at the end (WiSE-FT): weak
    # synthetic queries can pull a good pretrained model off course; 0 = plain fine-tuning.
    keep_initial: float = 0.0
    # Steps between training checkpoints (weights, optimizer, data order, RNG), so a preempted or
    # killed training resumes instead of starting over; a SIGTERM also saves one.
    checkpoint_every: int = 50


@dataclass
class RerankConfig:
    first_stage: str = "bm25"  # bm25 | path to a TREC run
    depth: int = 100  # top k rescored
    batch_size: int = 32
    max_length: int = 256
    dtype: str = "auto"
    device: str = "auto"
    fusion: bool = True  # also write the fused run (weight chosen on held-out synthetic queries)
    shards: int = 1


@dataclass
class EvaluateConfig:
    measures: list[str] = field(default_factory=lambda: ["nDCG@10", "RR@10", "R@100", "R@1000", "AP", "P@10", "Judged@10"])
    exclude_fewshot: bool = True


@dataclass
class PublishConfig:
    destination: str | None = None  # local folder or gs://bucket/prefix; None: no publish stage


@dataclass
class ResourcesConfig:
    """What a stage's pod asks for in Kubernetes (ignored by the local backend)."""

    cpu: str = "2"
    memory: str = "8Gi"
    gpu: int = 0
    gpu_type: str | None = None  # e.g. nvidia-l4 (cloud.google.com/gke-accelerator)
    tpu_type: str | None = None  # e.g. tpu-v5-lite-podslice
    tpu_topology: str | None = None  # e.g. 2x2
    parallelism: int | None = None


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    resources: dict[str, ResourcesConfig] = field(default_factory=dict)  # per stage name
    image: str = "ghcr.io/inpars/inpars:cpu"  # container image for the k8s backend

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        return _build(cls, data, "config")

    @classmethod
    def load(cls, path: str | Path) -> PipelineConfig:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.from_dict(data or {})

    def override(self, dotted: dict[str, Any]) -> PipelineConfig:
        """A copy with ``{"generate.n_docs": 50, ...}`` applied (the CLI's ``--set``)."""
        data = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if section not in data or not isinstance(data[section], dict) or (name not in data[section] and section != "resources"):
                raise ConfigError(f"unknown setting {key!r}")
            data[section][name] = value
        return PipelineConfig.from_dict(data)


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _SECTIONS.get(name) if cls is PipelineConfig else None
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        elif cls is PipelineConfig and name == "resources":
            kwargs[name] = {k: _build(ResourcesConfig, v, f"{where}.resources.{k}") for k, v in (value or {}).items()}
        elif name == "relevance_tokens":
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_SECTIONS = {
    "data": DataConfig,
    "generate": GenerateConfig,
    "filter": FilterConfig,
    "negatives": NegativesConfig,
    "train": TrainConfig,
    "rerank": RerankConfig,
    "evaluate": EvaluateConfig,
    "publish": PublishConfig,
}

STAGES = ("generate", "filter", "negatives", "train", "rerank", "evaluate", "publish")
