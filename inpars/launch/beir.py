"""Regenerate synthetic data for many BEIR datasets: one pipeline per dataset, a shared limit, one table.

Executor-agnostic: :func:`run_many` takes a ``start_run(config)`` callable (the CLI passes one that
creates a workspace run and executes it locally or on Kubernetes), so the same code drives a laptop
or a cluster and is tested with a fake.

Corpora come from ``<corpus_root>/<name>`` (a mirror in BEIR layout, e.g. ``gs://bucket/beir``) or,
without a root, from ``irds:<ir_datasets id>`` (the ``irds`` extra, ``pip install 'inpars[irds]'``;
the images carry it). Four BEIR datasets are not redistributed there and need a mirror: without one
they are reported ``missing``, and the others run.

Run ids are deterministic (:func:`inpars.workspace.stable_run_id`: the dataset plus a hash of every
setting that changes an output), so running ``beir`` again resumes each dataset where the workspace
says it is: finished ones are skipped, partial ones run only their missing shards, nothing is paid
twice. A preflight (:func:`check_corpora`) looks every corpus up before anything runs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RUNTIME_SETTINGS, PipelineConfig
from ..errors import EXIT_PERMANENT, EXIT_TRANSIENT, ConfigError, InParsError


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


@dataclass
class BeirPlan:
    """One dataset of a BEIR request: its config, or why it cannot run (``missing``: reported, not run)."""

    name: str
    config: PipelineConfig | None  # None when no corpus source can be named (not in ir_datasets, no root)
    missing: str | None = None  # why its corpus cannot be read
    run_id: str | None = None  # the deterministic run id (None without a config)
    beir_folder: bool = False  # the corpus is a BEIR folder under the corpus root (it must hold corpus.jsonl)

    @property
    def corpus(self) -> str | None:
        return self.config.data.corpus if self.config is not None else None


def plan_datasets(
    datasets: Sequence[str] | str,
    base_config: PipelineConfig,
    corpus_root: str | None = None,
    *,
    templates_dir: str | Path | None = None,
) -> list[BeirPlan]:
    """One :class:`BeirPlan` per dataset: its corpus, its name, its best prompt and its deterministic run
    id; everything else from ``base_config``. A dataset with no source (not in ir_datasets and no
    ``corpus_root``) is planned as missing rather than refused, so ``--datasets all`` still runs the rest.

    ``datasets``: ``"all"`` or BEIR names (``cqadupstack`` = its 12 forums, ``cqadupstack/tex`` one);
    an unknown name raises :class:`ConfigError`. A published destination gets one sub-folder per dataset.
    """
    from ..workspace import stable_run_id

    plans = []
    for name, path, irds_id in _expand(datasets):
        if not corpus_root and not irds_id:
            plans.append(BeirPlan(name, None, missing=f"{name} is not in ir_datasets (not redistributable): mirror it under --corpus-root"))
            continue
        cfg = copy.deepcopy(base_config)
        cfg.data.name = name
        if corpus_root:
            root = corpus_root.rstrip("/")
            cfg.data.corpus = f"{root}/{path}"
        else:
            cfg.data.corpus = f"irds:{irds_id}"
        cfg.data.queries = cfg.data.qrels = None  # the BEIR folder's queries.jsonl, qrels/test.tsv
        cfg.generate.prompt = prompt_for(name, templates_dir)
        if cfg.publish.destination:
            cfg.publish.destination = f"{base_config.publish.destination.rstrip('/')}/{name}"
        plans.append(BeirPlan(name, cfg, run_id=stable_run_id(cfg), beir_folder=bool(corpus_root)))
    return plans


def plan_beir(
    datasets: Sequence[str] | str,
    base_config: PipelineConfig,
    corpus_root: str | None = None,
    *,
    templates_dir: str | Path | None = None,
) -> list[PipelineConfig]:
    """The configs of :func:`plan_datasets`, strictly: a dataset without a source raises :class:`ConfigError`."""
    plans = plan_datasets(datasets, base_config, corpus_root, templates_dir=templates_dir)
    for plan in plans:
        if plan.config is None:
            raise ConfigError(f"{plan.name} is not in ir_datasets (not redistributable): pass a corpus root that mirrors it")
    return [plan.config for plan in plans if plan.config is not None]


def corpus_problem(plan: BeirPlan, *, runs_here: bool = True) -> str | None:
    """Why ``plan``'s corpus cannot be read (None: it can). Cheap, nothing is downloaded: a BEIR folder
    under the corpus root must hold ``corpus.jsonl``; an ``irds:`` id must be known to ir_datasets.
    When the workers run elsewhere (``runs_here`` false) and ir_datasets is not installed here, an
    ``irds:`` id from the BEIR table is not checked: the images carry ir_datasets."""
    import importlib.util

    from ..datasets import source_exists

    if plan.config is None:
        return plan.missing or "no corpus"
    source = plan.config.data.corpus
    if source.startswith("irds:") and not runs_here and importlib.util.find_spec("ir_datasets") is None:
        return None
    if plan.beir_folder:
        why = source_exists(f"{source.rstrip('/')}/corpus.jsonl")
        return f"{source}/corpus.jsonl: {why}" if why else None
    why = source_exists(source)
    return f"{source}: {why}" if why else None


def check_corpora(plans: Sequence[BeirPlan], *, runs_here: bool = True, max_workers: int = 8) -> list[BeirPlan]:
    """The preflight of a BEIR request: look every dataset's corpus up (concurrently: remote lookups)
    and mark the ones that cannot be read ``missing``; returns the plans that can run."""
    todo = [p for p in plans if p.missing is None]
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(todo) or 1)), thread_name_prefix="beir-check") as pool:
        for plan, why in zip(todo, pool.map(lambda p: corpus_problem(p, runs_here=runs_here), todo)):
            plan.missing = why
    return [p for p in plans if p.missing is None]


def _leaves(data: Any, prefix: str) -> dict[str, Any]:
    if isinstance(data, dict) and not prefix.startswith("resources."):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: data}


def runtime_changes(current: PipelineConfig, wanted: PipelineConfig) -> dict[str, Any]:
    """The runtime settings (budget, concurrency, resources, image: see ``RUNTIME_SETTINGS``) in which
    ``wanted`` differs from ``current``, as ``resume --set`` takes them (``resources.<stage>`` whole)."""
    old, new = _leaves(current.to_dict(), ""), _leaves(wanted.to_dict(), "")
    return {
        key: value
        for key, value in new.items()
        if any(key == s or key.startswith(s + ".") for s in RUNTIME_SETTINGS) and old.get(key) != value
    }


def open_run(workspace: str, config: PipelineConfig):
    """The dataset's run in ``workspace`` under its deterministic id: created, or the existing one
    (same outputs), with the runtime settings of ``config`` applied (a raised budget reaches a
    partial run, as ``resume --set`` would)."""
    from ..workspace import Run, stable_run_id

    run = Run.create(workspace, config, stable_run_id(config))
    changes = runtime_changes(run.config, config)
    if changes:
        run.change_settings(changes)
    return run


def plans_from_runs(workspace: str, run_ids: Sequence[str], opened: dict[str, Any] | None = None) -> list[BeirPlan]:
    """Plans for runs that exist already (``beir --runs``, what a BEIR driver pod runs): each run's own
    config from its manifest. ``opened`` (if given) receives dataset name -> the opened ``Run``."""
    from ..workspace import Run

    plans = []
    for run_id in run_ids:
        run = Run.open(f"{workspace.rstrip('/')}/runs/{run_id}")
        name = run.config.data.name
        if opened is not None:
            if name in opened:
                raise ConfigError(f"--runs: two runs of dataset {name!r} ({opened[name].run_id}, {run_id})")
            opened[name] = run
        plans.append(BeirPlan(name, run.config, run_id=run.run_id))
    return plans


def workspace_states(workspace: str, plans: Sequence[BeirPlan]) -> dict[str, str]:
    """run id -> :func:`run_state` for the plans that can run (``new`` where the workspace has no such run)."""
    from ..workspace import Run

    states = {}
    for plan in plans:
        if plan.missing is not None or not plan.run_id:
            continue
        try:
            run = Run.open(f"{workspace.rstrip('/')}/runs/{plan.run_id}")
        except InParsError:
            states[plan.run_id] = "new"
            continue
        states[plan.run_id] = run_state(run)
    return states


def render_manifests(
    plans: Sequence[BeirPlan],
    workspace: str,
    *,
    namespace: str,
    image: str,
    queue: str | None = None,
    max_parallel_pods: int | None = None,
    driver: bool = False,
    max_concurrent: int = 2,
) -> str:
    """What ``beir --backend k8s --dry-run`` prints: every stage Job of every dataset that can run (each
    validated as the API server would), preceded by the BEIR driver Job with ``driver`` (``--detach``)."""
    from .detach import beir_driver_manifest
    from .k8s_manifests import dry_run, to_yaml
    from .plan import data_size, plan_pipeline

    ready = [p for p in plans if p.missing is None and p.config is not None and p.run_id]
    texts = []
    if driver and ready:
        manifest = beir_driver_manifest(
            workspace,
            [p.run_id for p in ready],
            namespace=namespace,
            image=image,
            queue=queue,
            max_parallel_pods=max_parallel_pods,
            max_concurrent=max_concurrent,
        )
        texts.append("# the BEIR driver\n" + to_yaml([manifest]))
    for plan in ready:
        jobs = plan_pipeline(plan.config, f"{workspace.rstrip('/')}/runs/{plan.run_id}", data=data_size(config=plan.config))
        text = dry_run(jobs, run_id=plan.run_id, namespace=namespace, image=image, queue=queue, max_parallel_pods=max_parallel_pods)
        texts.append(f"# {plan.name}: run {plan.run_id}\n{text}")
    return "---\n".join(texts)


def run_state(run: Any) -> str:
    """Where a run stands, from the workspace: ``complete``, ``partial: <stage> d/n`` (the first stage
    not committed) or ``new``."""
    from ..pipeline import stages_for

    started = False
    for stage in stages_for(run.config):
        count = stage.shards(run.config)
        missing = run.missing_shards(stage.name, count)
        if missing:
            if not started and len(missing) == count:
                return "new"
            return f"partial: {stage.name} {count - len(missing)}/{count}"
        started = True
    return "complete"


@dataclass
class RunResult:
    """One dataset's outcome, for :func:`summary_table`."""

    name: str
    status: str  # complete | failed | missing: <why>
    run_id: str | None = None
    queries_kept: int | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # system -> measure -> value
    seconds: float | None = None
    error: str | None = None
    permanent: bool = False  # failed for a reason a retry will not fix (bad input or settings)


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
    :func:`result_from_run`); an exception marks that dataset failed (``permanent`` for a permanent
    error, e.g. a stage whose shards failed on bad input) and the others go on.
    """
    if max_concurrent < 1:
        raise ConfigError(f"max_concurrent must be >= 1, got {max_concurrent}")

    def one(cfg: PipelineConfig) -> RunResult:
        started = time.monotonic()
        try:
            out = start_run(cfg)
            result = out if isinstance(out, RunResult) else result_from_run(cfg.data.name, out)
        except Exception as exc:
            permanent = bool(getattr(exc, "permanent", isinstance(exc, InParsError)))
            result = RunResult(name=cfg.data.name, status="failed", error=f"{type(exc).__name__}: {exc}", permanent=permanent)
        if result.seconds is None:
            result.seconds = time.monotonic() - started
        return result

    # Threads suffice: each pipeline mostly waits on subprocesses or the Kubernetes API.
    with ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="beir") as pool:
        return list(pool.map(one, configs))


def run_plans(plans: Sequence[BeirPlan], start_run: Callable[[PipelineConfig], Any], max_concurrent: int = 2) -> list[RunResult]:
    """:func:`run_many` over the plans that can run; the missing ones are reported (``missing: why``),
    not started. Results in the plans' order, each with its run id."""
    runnable = [p for p in plans if p.missing is None and p.config is not None]
    done = iter(run_many([p.config for p in runnable], start_run, max_concurrent=max_concurrent))
    out = []
    for plan in plans:
        if plan.missing is not None or plan.config is None:
            out.append(RunResult(plan.name, f"missing: {plan.missing}", run_id=plan.run_id, permanent=True))
            continue
        result = next(done)
        result.run_id = result.run_id or plan.run_id
        out.append(result)
    return out


def exit_code(results: Sequence[RunResult]) -> int:
    """0 when every dataset is complete; 42 when one is missing or failed permanently (fix it first);
    else 75 (only transient failures: running ``beir`` again may finish them)."""
    if all(r.status == "complete" for r in results):
        return 0
    if any(r.status != "complete" and r.permanent for r in results):
        return EXIT_PERMANENT
    return EXIT_TRANSIENT


def plan_table(plans: Sequence[BeirPlan], states: dict[str, str] | None = None) -> str:
    """What ``beir --dry-run`` prints: per dataset the run id, the corpus, whether it can be read, and
    (``states``: run id -> :func:`run_state`) where its run stands in the workspace."""
    states = states or {}
    header = ("dataset", "run", "corpus", "corpus check", "workspace")
    rows = [
        (
            p.name,
            p.run_id or "-",
            p.corpus or "-",
            "ok" if p.missing is None else f"missing: {p.missing}"[:120],
            states.get(p.run_id or "", "-") if p.missing is None else "-",
        )
        for p in plans
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    missing = sum(p.missing is not None for p in plans)
    lines.append(f"{len(plans) - missing}/{len(plans)} can run" + (f", {missing} missing" if missing else ""))
    return "\n".join(lines)


def _ndcg(result: RunResult) -> str:
    values = [(system, m["nDCG@10"]) for system, m in result.metrics.items() if "nDCG@10" in m]
    return ", ".join(f"{system} {value:.4f}" for system, value in values) or "-"


def summary_table(results: Sequence[RunResult]) -> str:
    """A plain-text table: dataset, status, run id, queries kept, nDCG@10 per system, time or error."""
    header = ("dataset", "status", "run", "queries kept", "nDCG@10", "time / error")
    rows = [
        (
            r.name,
            r.status if len(r.status) <= 60 else r.status[:57] + "...",
            r.run_id or "-",
            "-" if r.queries_kept is None else str(r.queries_kept),
            _ndcg(r),
            r.error.splitlines()[0][:120]
            if r.error
            else (f"{r.seconds:.0f} s" if r.seconds is not None and not r.status.startswith("missing") else ""),
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    done = sum(r.status == "complete" for r in results)
    missing = sum(r.status.startswith("missing") for r in results)
    lines.append(f"{done}/{len(results)} complete" + (f", {missing} missing" if missing else ""))
    return "\n".join(lines)
