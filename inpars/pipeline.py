"""The pipeline table: every stage, in order, with what it reads, how it is sharded and what its pod asks for.

This is the one place that knows the stage order. The workers (:mod:`inpars.workers`), both
executors, the driver, ``status``, ``resume``, ``verify`` and the report all read it, so adding a
stage is one entry here plus its worker function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .config import PipelineConfig, ResourcesConfig
from .errors import ConfigError


def _always(config: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    worker: str  # "module:function" of the worker, imported only when the stage runs
    inputs: tuple[str, ...]  # stages whose every shard must be committed before this one starts
    shards: Callable[[PipelineConfig], int]  # how many shards (global stages: one)
    sharded_by: str | None  # "document" | "query" | None
    resources: ResourcesConfig  # the pod's defaults (a user's resources.<stage> overrides them)
    writes: str  # what it commits, for people (status, docs)
    enabled: Callable[[PipelineConfig], bool] = field(default=_always)


def _one(config: PipelineConfig) -> int:
    return 1


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "inpars.workers:prepare_worker",
        (),
        _one,
        None,
        ResourcesConfig(cpu="2", memory="4Gi"),
        "the document store, the BM25 index, evaluation queries and qrels, corpus statistics; pins the corpus",
    ),
    Stage(
        "generate",
        "inpars.workers:generate_worker",
        ("prepare",),
        lambda c: c.generate.shards,
        "document",
        ResourcesConfig(cpu="4", memory="16Gi"),
        "generated query rows (JSONL)",
    ),
    Stage(
        "filter",
        "inpars.workers:filter_worker",
        ("prepare", "generate"),
        _one,
        None,
        ResourcesConfig(cpu="2", memory="4Gi"),  # streams the rows: ~50 bytes a row between reads
        "kept rows best-first, dropped rows with a reason, summary, few-shot query ids",
    ),
    Stage(
        "negatives",
        "inpars.workers:negatives_worker",
        ("prepare", "filter"),
        lambda c: c.negatives.shards,
        "query",
        ResourcesConfig(cpu="2", memory="2Gi"),  # the store and index are memory-mapped: flat in the corpus size
        "triples (JSONL of ids, TSV of texts)",
    ),
    Stage(
        "train",
        "inpars.workers:train_worker",
        ("prepare", "negatives"),
        _one,
        None,
        ResourcesConfig(cpu="4", memory="16Gi"),
        "the trained model folder, held-out queries, fusion weight, training stats",
    ),
    Stage(
        "rerank",
        "inpars.workers:rerank_worker",
        ("prepare", "train", "filter"),
        lambda c: c.rerank.shards,
        "query",
        ResourcesConfig(cpu="4", memory="16Gi"),
        "first-stage, reranked and fused TREC runs",
    ),
    Stage(
        "evaluate",
        "inpars.workers:evaluate_worker",
        ("prepare", "rerank", "filter"),
        _one,
        None,
        ResourcesConfig(cpu="1", memory="4Gi"),
        "measures per system and query, paired bootstrap, table",
    ),
    Stage(
        "publish",
        "inpars.workers:publish_worker",
        ("generate", "filter", "negatives"),
        _one,
        None,
        ResourcesConfig(cpu="1", memory="2Gi"),
        "the published dataset files at publish.destination",
        enabled=lambda c: bool(c.publish.destination),
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    return BY_NAME[name]


def stages_for(config: PipelineConfig, until: str | None = None) -> list[Stage]:
    """The stages this config runs, in order (up to and including ``until``)."""
    if until is not None:
        get_stage(until)
    out = []
    for stage in STAGES:
        if stage.enabled(config):
            out.append(stage)
        if stage.name == until:
            if not stage.enabled(config):
                raise ConfigError(f"stage {until!r} is not part of this run")
            break
    return out


def stage_shards(config: PipelineConfig) -> dict[str, int]:
    """How many shards each stage of this config runs (global stages run one)."""
    return {s.name: s.shards(config) for s in stages_for(config)}


@dataclass(frozen=True)
class DataSize:
    """How big a run's prepared data is: what pod sizes follow (from the prepare record, or estimated)."""

    documents: int
    corpus_bytes: int  # the corpus file as given
    store_bytes: int  # the document store
    index_bytes: int  # the saved BM25 index
    estimated: bool = False  # True: guessed from the corpus file's size (before prepare ran)

    @classmethod
    def from_prepare_stats(cls, stats: dict) -> DataSize:
        store, index, corpus = stats["store"], stats["index"], stats.get("corpus", {})
        return cls(int(store["documents"]), int(corpus.get("bytes") or store["bytes"]), int(store["bytes"]), int(index["bytes"]))

    @classmethod
    def estimate(cls, corpus_bytes: int) -> DataSize:
        # Measured (prepare_corpus): the store is 0.98-0.99x the corpus JSONL, the bm25s index 0.66x (SciFact)
        # to 0.75x (100k-300k synthetic documents, benchmarks/store_index.py).
        # Documents are counted high on purpose (500 bytes each; MS MARCO passages are ~360, SciFact's ~1.6 KB).
        return cls(max(1, corpus_bytes // 500), corpus_bytes, corpus_bytes, corpus_bytes * 3 // 4, estimated=True)


MiB, GiB = 1 << 20, 1 << 30

# Stages that map the prepared store and index (their pods download both to /scratch on a gs:// run).
READS_PREPARED = frozenset({"generate", "filter", "negatives", "train", "rerank"})

# Each stage's own scratch room, beyond the prepared data: model weights (HF_HOME), checkpoints, spills.
STAGE_SCRATCH = {
    "prepare": 2 * GiB,
    "generate": 50 * GiB,
    "filter": 10 * GiB,
    "negatives": 2 * GiB,
    "train": 100 * GiB,
    "rerank": 30 * GiB,
    "evaluate": 2 * GiB,
    "publish": 5 * GiB,
}


def _quantity(nbytes: float) -> str:
    """Bytes as a Kubernetes quantity, rounded up: to whole Gi above 4Gi, else to 256Mi."""
    if nbytes > 4 * GiB:
        return f"{-(-int(nbytes) // GiB)}Gi"
    mib = max(256, -(-int(nbytes) // (256 * MiB)) * 256)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def resources_for(config: PipelineConfig, stage: str, data: DataSize | None = None) -> ResourcesConfig:
    """The pod resources of ``stage``: the user's ``resources.<stage>``, else the stage's defaults sized
    to the run's data (``data``: from the prepare record; None: the defaults as they are).

    Sizing, for a pod whose memory stays flat in the corpus size (the store and index are memory-mapped
    and their pages handed back as they are read; the id index and BM25 per-query arrays are a few
    bytes a document):
    - disk (``ephemeral-storage`` and the ``/scratch`` volume): the stage's own room (models, spills:
      ``STAGE_SCRATCH``) plus the store and index it maps; prepare: the corpus, the store, the index and
      the index build's spill (about the index again);
    - memory: the stage's default plus 64 bytes a document (prepare: 256 bytes a document: the build
      keeps document lengths, the id hashes and one chunk's postings).
    A user's ``resources.<stage>`` wins whole (``ephemeral_storage`` left unset there is still sized).
    """
    user = config.resources.get(stage)
    base = user or get_stage(stage).resources
    if data is None:
        return base
    room = STAGE_SCRATCH.get(stage, 5 * GiB)
    if stage == "prepare":
        disk = room + data.corpus_bytes + data.store_bytes + 2 * data.index_bytes
        extra_memory = 256 * data.documents
    elif stage in READS_PREPARED:
        disk = room + data.store_bytes + data.index_bytes
        extra_memory = 64 * data.documents
    else:
        disk, extra_memory = room, 0
    changes: dict = {}
    if base.ephemeral_storage is None:
        changes["ephemeral_storage"] = _quantity(disk * 1.1)
    if user is None and extra_memory >= 128 * MiB:  # below that, the stage's default has the room
        from kubernetes.utils.quantity import parse_quantity

        changes["memory"] = _quantity(float(parse_quantity(base.memory)) + extra_memory)
    return base.model_copy(update=changes) if changes else base


def preflight(config: PipelineConfig, *, runs_here: bool = True) -> None:
    """Check, before a run folder is made or anything is paid for, what can be checked cheaply: the
    data sources exist, the prompt is known, the generation backend is installed (``runs_here``: the
    workers run on this machine). Raises one :class:`ConfigError` listing every problem."""
    import importlib.util

    from .datasets import source_exists
    from .prompts import template_path

    problems = []
    data = config.data
    for setting, source in (
        ("data.corpus", data.corpus),
        ("data.queries", data.queries),
        ("data.qrels", data.qrels),
        ("generate.fewshot_file", config.generate.fewshot_file),
    ):
        if source is None:
            continue
        if source.startswith("irds:") and not runs_here and importlib.util.find_spec("ir_datasets") is None:
            continue  # the workers' images carry ir_datasets; this machine cannot look the id up
        why = source_exists(source)
        if why:
            problems.append(f"{setting} = {source!r}: {why}")
    prompt = config.generate.prompt
    name = f"promptagator-{data.name}" if prompt == "promptagator" else prompt
    try:
        template_path(name)
    except ConfigError as e:
        problems.append(f"generate.prompt = {prompt!r}: {e}")
    if runs_here:
        from .backends import backend_class

        try:
            if not backend_class(config.generate.backend).is_available():
                problems.append(f"generate.backend = {config.generate.backend!r}: not available here (missing dependencies)")
        except ConfigError as e:
            problems.append(f"generate.backend = {config.generate.backend!r}: {e}")
    if config.generate.backend == "openai" and config.generate.base_url is None:
        import os

        if not os.environ.get(config.generate.api_key_env):
            problems.append(f"generate.api_key_env = {config.generate.api_key_env!r}: the OpenAI API needs a key in that variable")
    if problems:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(problems))
