"""The pipeline configuration: one validated model per stage, one :class:`PipelineConfig` for a run.

Settings are checked once, at the edge (CLI options, a YAML file, ``--set``, a manifest read back), by
pydantic: types are strict (``n_docs: eight`` and ``shards: two`` are errors, not strings), ranges and
enumerations are declared on the fields, and an error names the setting, the value given and what is
allowed (:class:`~inpars.errors.ConfigError`, exit code 42). The library receives valid objects.

A run's config is written once into its manifest; every worker (a local subprocess or a pod) reads
it back from the workspace, so a stage needs nothing on its command line but the run and its shard.
Settings that cannot change what a stage commits (budget, concurrency, parallelism, pod resources:
:data:`RUNTIME_SETTINGS`) may be changed on ``resume``; everything else is fixed for the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

# Strict scalars: YAML and --set give real numbers and booleans; "eight" or "yes" is a mistake.
Count = Annotated[StrictInt, Field(ge=1)]
NonNegative = Annotated[StrictInt, Field(ge=0)]
Fraction = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
Dtype = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|tpu|xla|cuda(:\d+)?)$")]
Name = Annotated[str, Field(min_length=1)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# Kubernetes quantities; a bare number (cpu: 2) is read as its text, as kubectl does.
Quantity = Annotated[
    str,
    BeforeValidator(lambda v: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v),
    Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"),
]


class Section(BaseModel):
    """Common settings of every config section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def of(cls, where: str = "settings", **values: Any):
        """Build and validate; a bad value raises :class:`ConfigError` (not a traceback) naming it."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ConfigError(describe_errors(e, where)) from None


class DataConfig(Section):
    corpus: Name = "builtin:scifact-sample"  # BEIR folder, JSONL/TSV/CSV file, gs:// URI, builtin:NAME or irds:ID
    queries: str | None = None  # evaluation queries (default: the BEIR folder's queries.jsonl)
    qrels: str | None = None  # evaluation qrels (default: the BEIR folder's qrels/test.tsv)
    # The dataset's name: picks promptagator-<name>, names published files and run ids.
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] = "scifact"


class GenerateConfig(Section):
    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    model: Name = "smollm2-135m"  # a packaged alias (inpars.models), an HF hub id or a local path
    prompt: Name = "inpars"  # inpars | inpars-gbq | promptagator[-<dataset>] | path to a YAML template
    fewshot_file: str | None = None  # (query, document) pairs for promptagator prompts
    n_docs: Count | None = 100  # sample size (None: every document)
    seed: NonNegative = 0
    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=4096)] = 32
    max_doc_tokens: Count = 256  # documents truncated by tokens in the prompt
    max_example_tokens: Count = 128  # few-shot example documents truncated by tokens
    batch_size: Count = 16
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=5.0)] = 0.0  # 0: greedy
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 1.0
    dtype: Dtype = "auto"  # auto (bf16 where supported) | float32 | bfloat16 | float16
    device: Device = "auto"
    shards: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1
    checkpoint_every: Count = 64  # rows per checkpoint chunk
    # API backend (OpenAI-compatible servers)
    base_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    api_key_env: EnvName = "OPENAI_API_KEY"  # the *name* of the variable; the key itself is never stored
    chat: StrictBool = False
    concurrency: Annotated[StrictInt, Field(ge=1, le=1024)] = 8
    max_retries: NonNegative = 8
    request_timeout: Annotated[StrictFloat, Field(gt=0.0)] = 60.0
    prices: dict[Literal["prompt", "completion"], Annotated[StrictFloat, Field(ge=0.0)]] = Field(default_factory=dict)  # USD per 1M
    budget_usd: Annotated[StrictFloat, Field(ge=0.0)] | None = None  # one budget for the whole run (all shards)
    tokenizer: str | None = None  # API backend: local HF tokenizer (alias/id/path) when the server has no /tokenize
    # Passed through to the openai SDK (OpenAI-Organization / OpenAI-Project headers); None: the SDK's
    # default (its OPENAI_ORG_ID / OPENAI_PROJECT_ID variables, else not sent).
    organization: str | None = None
    project: str | None = None
    # Azure OpenAI: setting api_version (e.g. "2024-10-21") selects it; base_url is then the resource
    # endpoint (https://NAME.openai.azure.com), model the deployment name, the key sent as `api-key`.
    api_version: str | None = None

    @model_validator(mode="after")
    def _api_settings(self) -> GenerateConfig:
        if self.backend != "openai" and self.budget_usd is not None:
            raise ValueError("generate.budget_usd applies to the openai backend only")
        return self


class FilterConfig(Section):
    strategy: Literal["scores", "reranker", "consistency"] = "scores"
    aggregate: Literal["mean", "sum"] = "mean"  # of token log-probs
    keep_top_k: NonNegative | None = None
    keep_fraction: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = 0.7
    min_query_tokens: NonNegative = 3
    max_query_tokens: Count = 64
    drop_copies: StrictBool = True  # drop queries copied verbatim from their document
    drop_duplicates: StrictBool = True
    reranker_model: str | None = None  # for strategy=reranker
    consistency_top_k: Count = 10  # for strategy=consistency

    @model_validator(mode="after")
    def _coherent(self) -> FilterConfig:
        if self.min_query_tokens > self.max_query_tokens:
            raise ValueError(f"min_query_tokens ({self.min_query_tokens}) is larger than max_query_tokens ({self.max_query_tokens})")
        return self


class NegativesConfig(Section):
    retriever: Literal["bm25s", "pyserini"] = "bm25s"
    depth: Count = 100  # BM25 hits retrieved per query
    n_negatives: NonNegative = 3
    skip_top: NonNegative = 0  # ignore the first ranks (likely false negatives)
    seed: NonNegative = 0
    shards: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1


class TrainConfig(Section):
    # auto: what `model` already is (a sentence-embedding model -> bi-encoder, T5 -> monot5, else
    # cross-encoder; see inpars.train) | cross-encoder | monot5 | bi-encoder
    model_type: Literal["auto", "cross-encoder", "monot5", "bi-encoder"] = "auto"
    model: Name = "minilm-l6"  # packaged alias, HF id or local path
    loss: Literal["lce", "bce"] = "lce"  # lce (group softmax over positive + negatives) | bce
    learning_rate: Annotated[StrictFloat, Field(gt=0.0, lt=1.0)] | None = None  # default: 3e-4 for T5, 3e-5 otherwise
    batch_size: Count = 8
    epochs: Annotated[StrictFloat, Field(gt=0.0)] = 1.0
    max_steps: Count | None = None
    max_length: Annotated[StrictInt, Field(ge=8, le=16384)] = 256
    seed: NonNegative = 0
    dtype: Dtype = "auto"
    device: Device = "auto"
    relevance_tokens: tuple[Name, Name] = ("true", "false")  # monoT5; FLAN style: ("yes", "no")
    held_out_fraction: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.1  # synthetic queries kept aside
    # Share of the starting weights averaged back into the trained ones at the end (WiSE-FT): weak
    # synthetic queries can pull a good pretrained model off course; 0 = plain fine-tuning.
    keep_initial: Fraction = 0.0
    # Steps between training checkpoints (weights, optimizer, data order, RNG), so a preempted or
    # killed training resumes instead of starting over; a SIGTERM also saves one.
    checkpoint_every: Count = 50


class RerankConfig(Section):
    first_stage: Name = "bm25"  # bm25 | path to a TREC run
    depth: Count = 100  # top k rescored
    batch_size: Count = 32
    max_length: Annotated[StrictInt, Field(ge=8, le=16384)] = 256
    dtype: Dtype = "auto"
    device: Device = "auto"
    fusion: StrictBool = True  # also write the fused run (weight chosen on held-out synthetic queries)
    shards: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1


class EvaluateConfig(Section):
    measures: list[Name] = Field(default_factory=lambda: ["nDCG@10", "RR@10", "R@100", "R@1000", "AP", "P@10", "Judged@10"], min_length=1)
    exclude_fewshot: StrictBool = True

    @field_validator("measures")
    @classmethod
    def _known(cls, measures: list[str]) -> list[str]:
        import ir_measures

        for name in measures:
            try:
                ir_measures.parse_measure(name)
            except Exception:  # NameError / ValueError / AttributeError depending on the typo
                raise ValueError(f"unknown measure {name!r} (see https://ir-measur.es/en/latest/measures.html)") from None
        return measures


class PublishConfig(Section):
    destination: str | None = None  # local folder or gs://bucket/prefix; None: no publish stage


class ResourcesConfig(Section):
    """What a stage's pod asks for in Kubernetes (ignored by the local backend)."""

    cpu: Quantity = "2"
    memory: Quantity = "8Gi"
    # The pod's local disk (ephemeral-storage request and limit, and its /scratch volume's size). None:
    # sized by the launcher from the prepared corpus (see inpars.pipeline.resources_for).
    ephemeral_storage: Quantity | None = None
    gpu: NonNegative = 0
    gpu_type: str | None = None  # e.g. nvidia-l4 (cloud.google.com/gke-accelerator)
    tpu_type: str | None = None  # e.g. tpu-v5-lite-podslice
    tpu_topology: Annotated[str, Field(pattern=r"^\d+x\d+(x\d+)?$")] | None = None  # e.g. 2x2
    parallelism: Count | None = None
    # Kubernetes: fail the stage's Job after this long (activeDeadlineSeconds; None: the stage's default).
    active_deadline_seconds: Count | None = None
    # Kubernetes: report and fail a stage whose pods stay Pending (or whose Job stays queued) this long.
    pending_deadline_seconds: Count | None = None

    @model_validator(mode="after")
    def _accelerators(self) -> ResourcesConfig:
        if self.gpu and self.tpu_type:
            raise ValueError("set gpu or tpu_type, not both")
        if self.gpu_type and not self.gpu:
            raise ValueError(f"gpu_type={self.gpu_type!r} needs gpu >= 1")
        if self.tpu_type and not self.tpu_topology:
            raise ValueError("tpu_type needs tpu_topology (e.g. 2x2)")
        return self


SECTIONS = ("data", "generate", "filter", "negatives", "train", "rerank", "evaluate", "publish")


class PipelineConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    resources: dict[str, ResourcesConfig] = Field(default_factory=dict)  # per stage name
    image: Name = "ghcr.io/inpars/inpars:cpu"  # container image for the k8s backend

    @model_validator(mode="after")
    def _runnable(self) -> PipelineConfig:
        # A library call may pass a scorer of its own; a run must name the model its worker loads.
        if self.filter.strategy == "reranker" and not self.filter.reranker_model:
            raise ValueError("filter.strategy 'reranker' needs filter.reranker_model")
        return self

    @field_validator("resources")
    @classmethod
    def _stage_names(cls, resources: dict[str, ResourcesConfig]) -> dict[str, ResourcesConfig]:
        from .pipeline import STAGE_NAMES

        unknown = sorted(set(resources) - set(STAGE_NAMES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
        return resources

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (tuples as lists): what the manifest stores."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "config") -> PipelineConfig:
        """Validate ``data``; a bad setting raises :class:`ConfigError` naming it, its value and what is allowed."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(describe_errors(e, where)) from None

    @classmethod
    def load(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: the config is not UTF-8 text") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
        return cls.from_dict(data, where=str(path))

    def override(self, dotted: dict[str, Any]) -> PipelineConfig:
        """A copy with ``{"generate.n_docs": 50, "resources.train.gpu": 1, ...}`` applied (the CLI's ``--set``)."""
        data = self.to_dict()
        for key, value in dotted.items():
            parts = key.split(".")
            if len(parts) < 2 and parts[0] != "image":
                raise ConfigError(f"unknown setting {key!r}: use section.name, e.g. generate.n_docs")
            node: Any = data
            for i, part in enumerate(parts[:-1]):
                if not isinstance(node, dict) or (part not in node and not (i == 1 and parts[0] == "resources")):
                    raise ConfigError(f"unknown setting {key!r}")
                node = node.setdefault(part, {})
            if not isinstance(node, dict) or (parts[-1] not in node and parts[0] != "resources"):
                raise ConfigError(f"unknown setting {key!r}")
            node[parts[-1]] = value
        return PipelineConfig.from_dict(data, where="--set")


def describe_errors(error: ValidationError, where: str = "config") -> str:
    """One line per bad setting: ``generate.n_docs = -3: Input should be greater than or equal to 1``."""
    lines = []
    for err in error.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{loc}: missing")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown setting")
        elif err["type"].startswith("value_error") and err.get("input") is not None and isinstance(err["input"], dict):
            lines.append(f"{loc or 'config'}: {msg}")
        else:
            lines.append(f"{loc} = {err.get('input')!r}: {msg}")
    return f"{where}: invalid settings:\n  " + "\n  ".join(lines)


# Settings that change no committed byte, so ``resume --set`` may change them on an existing run.
RUNTIME_SETTINGS = ("generate.budget_usd", "generate.concurrency", "generate.request_timeout", "generate.max_retries", "resources", "image")


def runtime_only(dotted: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` unless every key of ``dotted`` is a runtime setting."""
    bad = sorted(k for k in dotted if not any(k == s or k.startswith(s + ".") for s in RUNTIME_SETTINGS))
    if bad:
        raise ConfigError(
            f"resume --set can only change settings that do not change outputs ({', '.join(RUNTIME_SETTINGS)}); "
            f"not {', '.join(bad)}: start a new run instead"
        )
