"""Regenerate synthetic data for many BEIR datasets: one pipeline per dataset, a shared limit, one table.

Executor-agnostic: :func:`run_many` takes a ``start_run(config)`` callable (the CLI passes one that
creates a workspace run and executes it locally or on Kubernetes), so the same code drives a laptop
or a cluster and is tested with a fake.

Corpora come from ``<corpus_root>/<name>`` (a mirror in BEIR layout, e.g. ``gs://bucket/beir``) or,
without a root, from ``irds:<ir_datasets id>`` (needs ``pip install ir_datasets``, not a default
dependency; four BEIR datasets are not redistributed there and need a mirror).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PipelineConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class BeirDataset:
    name: str  # the BEIR folder name
    irds_id: str | None  # ir_datasets id of the evaluation split; None: not in ir_datasets


# The 18 BEIR evaluation datasets (MS MARCO, the training set, is left out), by their BEIR folder
# names. CQADupStack is one dataset of 12 forums: BEIR averages them; here each forum is a run.
CQADUPSTACK_FORUMS = (
    "android",
    "english",
    "gaming",
    "gis",
    "mathematica",
    "physics",
    "programmers",
    "stats",
    "tex",
    "unix",
    "webmasters",
    "wordpress",
)

BEIR_DATASETS: list[BeirDataset] = [
    BeirDataset("trec-covid", "beir/trec-covid"),
    BeirDataset("nfcorpus", "beir/nfcorpus/test"),
    BeirDataset("nq", "beir/nq"),
    BeirDataset("hotpotqa", "beir/hotpotqa/test"),
    BeirDataset("fiqa", "beir/fiqa/test"),
    BeirDataset("arguana", "beir/arguana"),
    BeirDataset("webis-touche2020", "beir/webis-touche2020/v2"),
    BeirDataset("cqadupstack", "beir/cqadupstack"),  # + /<forum>
    BeirDataset("quora", "beir/quora/test"),
    BeirDataset("dbpedia-entity", "beir/dbpedia-entity/test"),
    BeirDataset("scidocs", "beir/scidocs"),
    BeirDataset("fever", "beir/fever/test"),
    BeirDataset("climate-fever", "beir/climate-fever"),
    BeirDataset("scifact", "beir/scifact/test"),
    # Not redistributable: BEIR ships scripts, ir_datasets has no beir/ ids. Mirror them yourself.
    BeirDataset("bioasq", None),
    BeirDataset("signal1m", None),
    BeirDataset("trec-news", None),
    BeirDataset("robust04", None),
]
BY_NAME = {d.name: d for d in BEIR_DATASETS}


def _templates_dir() -> Path:
    from .. import prompts

    return Path(prompts.__file__).parent / "templates"


def prompt_for(name: str, templates_dir: str | Path | None = None) -> str:
    """``promptagator-<name>`` when that template exists (checked now, not at import), else ``inpars``."""
    folder = Path(templates_dir) if templates_dir is not None else _templates_dir()
    candidates = [name] + ([name.split("-", 1)[0]] if name.startswith("cqadupstack-") else [])
    for candidate in candidates:
        if (folder / f"promptagator-{candidate}.yaml").is_file():
            return f"promptagator-{candidate}"
    return "inpars"


def _expand(datasets: Sequence[str] | str) -> list[tuple[str, str, str | None]]:
    """``[(run name, BEIR path under the root, irds id)]``; cqadupstack expands into its forums."""
    if datasets == "all":
        names = [d.name for d in BEIR_DATASETS]
    elif isinstance(datasets, str):
        names = [datasets]
    else:
        names = list(datasets)
    out = []
    for name in names:
        base, _, forum = name.partition("/")
        if base.startswith("cqadupstack-"):
            base, forum = "cqadupstack", base.removeprefix("cqadupstack-")
        if base not in BY_NAME:
            raise ConfigError(f"unknown BEIR dataset {name!r}; known: {', '.join(BY_NAME)}")
        ds = BY_NAME[base]
        if base == "cqadupstack":
            forums = [forum] if forum else list(CQADUPSTACK_FORUMS)
            bad = [f for f in forums if f not in CQADUPSTACK_FORUMS]
            if bad:
                raise ConfigError(f"unknown CQADupStack forum(s) {bad}; known: {', '.join(CQADUPSTACK_FORUMS)}")
            out += [(f"cqadupstack-{f}", f"cqadupstack/{f}", f"{ds.irds_id}/{f}") for f in forums]
        else:
            out.append((base, base, ds.irds_id))
    return out


def plan_beir(
    datasets: Sequence[str] | str,
    base_config: PipelineConfig,
    corpus_root: str | None = None,
    *,
    templates_dir: str | Path | None = None,
) -> list[PipelineConfig]:
    """One config per dataset: its corpus, its name, and its best prompt; everything else from ``base_config``.

    ``datasets``: ``"all"`` or BEIR names (``cqadupstack`` = its 12 forums, ``cqadupstack/tex`` one).
    A published destination gets one sub-folder per dataset.
    """
    configs = []
    for name, path, irds_id in _expand(datasets):
        cfg = copy.deepcopy(base_config)
        cfg.data.name = name
        if corpus_root:
            root = corpus_root.rstrip("/")
            cfg.data.corpus = f"{root}/{path}"
            cfg.data.queries = cfg.data.qrels = None  # the BEIR folder's queries.jsonl, qrels/test.tsv
        elif irds_id:
            cfg.data.corpus = f"irds:{irds_id}"
            cfg.data.queries = cfg.data.qrels = None
        else:
            raise ConfigError(f"{name} is not in ir_datasets (not redistributable): pass a corpus root that mirrors it")
        cfg.generate.prompt = prompt_for(name, templates_dir)
        if cfg.publish.destination:
            cfg.publish.destination = f"{base_config.publish.destination.rstrip('/')}/{name}"
        configs.append(cfg)
    return configs


@dataclass
class RunResult:
    """One dataset's outcome, for :func:`summary_table`."""

    name: str
    status: str  # complete | failed
    run_id: str | None = None
    queries_kept: int | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # system -> measure -> value
    seconds: float | None = None
    error: str | None = None


def result_from_run(name: str, run: Any) -> RunResult:
    """A :class:`RunResult` read from a finished ``inpars.workspace.Run`` (the workspace is the truth)."""
    import json

    result = RunResult(name=name, status="complete", run_id=getattr(run, "run_id", None))
    marker = run.shard_marker("filter", 0, 1) if hasattr(run, "shard_marker") else None
    if marker:
        result.queries_kept = marker.get("rows")
    if hasattr(run, "shard_done") and run.shard_done("evaluate", 0, 1):
        data = json.loads(run.read_shard("evaluate", 0, 1, "json"))
        result.metrics = {system: dict(res.get("aggregate", {})) for system, res in data.get("systems", {}).items()}
    return result


def run_many(
    configs: Sequence[PipelineConfig],
    start_run: Callable[[PipelineConfig], Any],
    max_concurrent: int = 2,
) -> list[RunResult]:
    """Run every config through ``start_run``, at most ``max_concurrent`` at once; results in input order.

    ``start_run`` returns a :class:`RunResult` or a finished workspace ``Run`` (read by
    :func:`result_from_run`); an exception marks that dataset failed and the others go on.
    """
    if max_concurrent < 1:
        raise ConfigError(f"max_concurrent must be >= 1, got {max_concurrent}")

    def one(cfg: PipelineConfig) -> RunResult:
        started = time.monotonic()
        try:
            out = start_run(cfg)
            result = out if isinstance(out, RunResult) else result_from_run(cfg.data.name, out)
        except Exception as exc:
            result = RunResult(name=cfg.data.name, status="failed", error=f"{type(exc).__name__}: {exc}")
        if result.seconds is None:
            result.seconds = time.monotonic() - started
        return result

    # Threads suffice: each pipeline mostly waits on subprocesses or the Kubernetes API.
    with ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="beir") as pool:
        return list(pool.map(one, configs))


def _ndcg(result: RunResult) -> str:
    values = [(system, m["nDCG@10"]) for system, m in result.metrics.items() if "nDCG@10" in m]
    return ", ".join(f"{system} {value:.4f}" for system, value in values) or "-"


def summary_table(results: Sequence[RunResult]) -> str:
    """A plain-text table: dataset, status, run id, queries kept, nDCG@10 per system, time or error."""
    header = ("dataset", "status", "run", "queries kept", "nDCG@10", "time / error")
    rows = [
        (
            r.name,
            r.status,
            r.run_id or "-",
            "-" if r.queries_kept is None else str(r.queries_kept),
            _ndcg(r),
            r.error.splitlines()[0][:120] if r.error else (f"{r.seconds:.0f} s" if r.seconds is not None else ""),
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    done = sum(r.status == "complete" for r in results)
    lines.append(f"{done}/{len(results)} complete")
    return "\n".join(lines)
