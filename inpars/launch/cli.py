"""``inpars-launch``: run a whole pipeline on local processes or Kubernetes Jobs, and look after it.

Thin: it builds the validated config, creates the run in the workspace and hands it to the driver
(:mod:`inpars.launch.driver`) with an executor; ``status``, ``verify``, ``resume``, ``logs`` and
``cancel`` read the workspace (the truth) or the cluster. Exit codes: 0 done, 42 a permanent error
(bad input or settings: fix it first), 75 a transient failure (``resume`` may succeed later).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

from ..config import PipelineConfig
from ..errors import EXIT_PERMANENT, EXIT_TRANSIENT, InParsError, cli_errors
from ..pipeline import preflight, stages_for
from .driver import StageFailed, drive_exclusively, plan_run

app = typer.Typer(help="Run InPars pipelines locally or on Kubernetes.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InParsError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)  # numbers, booleans, null, lists
        except yaml.YAMLError as e:
            raise InParsError(f"--set {pair!r}: not a value ({e})") from None
    return out


def build_config(config: Path | None, sets: list[str]) -> PipelineConfig:
    cfg = PipelineConfig.load(config) if config else PipelineConfig()
    return cfg.override(_parse_sets(sets)) if sets else cfg


def _k8s_executor(
    namespace: str, image: str | None, queue: str | None, cfg: PipelineConfig | None = None, max_parallel_pods: int | None = None
):
    from .k8s import K8sExecutor

    image = image or (cfg.image if cfg else PipelineConfig().image)
    return K8sExecutor(namespace=namespace, image=image, queue=queue, max_parallel_pods=max_parallel_pods)


class K8sShards:
    """The driver's executor over Kubernetes Jobs (one Indexed Job per stage, resume Jobs for the rest)."""

    def __init__(self, executor):
        self.executor = executor

    def run_shards(self, job, shards, run):
        from .k8s import JobFailedError

        try:
            return self.executor.run_stage(job, run.run_id, list(shards), lambda p: console.print(str(p), highlight=False), workspace=run)
        except JobFailedError as e:
            raise StageFailed(str(e), permanent=False) from None


def _executor(
    backend: str,
    *,
    parallel: int,
    namespace: str,
    image: str | None,
    queue: str | None,
    cfg: PipelineConfig,
    max_parallel_pods: int | None = None,
):
    if backend == "local":
        from .local import LocalExecutor

        return LocalExecutor(max_parallel=parallel)
    if backend == "k8s":
        return K8sShards(_k8s_executor(namespace, image, queue, cfg, max_parallel_pods))
    raise InParsError(f"unknown backend {backend!r}: local | k8s")


def _execute(
    run_,
    backend: str,
    *,
    parallel: int,
    namespace: str,
    image: str | None,
    queue: str | None,
    until: str | None = None,
    max_parallel_pods: int | None = None,
):
    """Drive the run; print the summary; exit 42 (permanent) or 75 (transient) when a stage failed."""
    started = time.monotonic()
    executor = _executor(
        backend, parallel=parallel, namespace=namespace, image=image, queue=queue, cfg=run_.config, max_parallel_pods=max_parallel_pods
    )
    try:
        outcomes = drive_exclusively(run_, executor, until=until, say=lambda text: console.print(text, highlight=False))
    except StageFailed as e:
        console.print(f"[red]{e}[/red]", highlight=False)
        console.print(f"resume with: inpars-launch resume {run_.uri}" + (f" --backend {backend}" if backend != "local" else ""))
        raise typer.Exit(EXIT_PERMANENT if e.permanent else EXIT_TRANSIENT) from None
    print_summary(run_, time.monotonic() - started, ran=[o.stage for o in outcomes])


def _detach(run_, *, namespace: str, image: str | None, queue: str | None, until: str | None, max_parallel_pods: int | None) -> None:
    """Submit the run's driver Job (``inpars-launch resume RUN --backend k8s ...`` in the cluster) and return."""
    from .detach import follow_lines, run_driver_manifest, submit
    from .k8s import DriverRunning

    image = image or run_.config.image
    manifest = run_driver_manifest(
        run_.uri, run_.run_id, namespace=namespace, image=image, queue=queue, until=until, max_parallel_pods=max_parallel_pods
    )
    try:
        job = submit(_k8s_executor(namespace, image, queue, run_.config), manifest, [run_])
    except DriverRunning as e:
        console.print(f"[yellow]{e}[/yellow]; not submitting a second one", highlight=False)
        typer.echo("\n".join(follow_lines(run_.uri, e.name, namespace)))
        raise typer.Exit(EXIT_TRANSIENT) from None
    typer.echo(f"driver Job {job} submitted for run {run_.run_id}")
    typer.echo("\n".join(follow_lines(run_.uri, job, namespace)))


def print_summary(run_, seconds: float | None = None, ran: list[str] | None = None) -> None:
    """BM25 against the trained model, and where the artifacts of the stages that ran are."""
    out = Console()
    if run_.shard_done("evaluate", 0, 1):
        result = json.loads(run_.read_shard("evaluate", 0, 1, "json"))
        table = Table(
            title=f"{run_.config.data.name}: {len(next(iter(result['systems'].values()))['per_query'].get('nDCG@10', {}))} queries"
        )
        present = next(iter(result["systems"].values()))["aggregate"]
        measures = [m for m in run_.config.evaluate.measures if m in present] + sorted(set(present) - set(run_.config.evaluate.measures))
        table.add_column("system")
        for m in measures:
            table.add_column(m, justify="right")
        for name, res in result["systems"].items():
            table.add_row(name, *(f"{res['aggregate'][m]:.4f}" for m in measures))
        out.print(table)
        for name, b in result.get("bootstrap", {}).items():
            out.print(
                f"{name} vs bm25 nDCG@10: {b.get('mean_diff', 0):+.4f} (95% CI {b.get('ci_low', 0):+.4f} .. {b.get('ci_high', 0):+.4f}), "
                f"wins/losses/ties {b.get('wins')}/{b.get('losses')}/{b.get('ties')}",
                highlight=False,
            )
        if result.get("unranked_queries"):
            out.print(f"{len(result['unranked_queries'])} judged queries had no first-stage hit and score 0", highlight=False)
    stages = [s.name for s in stages_for(run_.config)] if ran is None else ran
    committed = [s for s in stages if not run_.missing_shards(s, _shards(run_, s))]
    if committed:
        out.print(f"\nartifacts under {run_.uri}:")
        for stage in committed:
            out.print(f"  {stage:<10} {run_.uri}/{stage}/", highlight=False)
    if seconds is not None:
        out.print(f"wall time {seconds:.0f} s")


def _shards(run_, stage: str) -> int:
    from ..pipeline import get_stage

    return get_stage(stage).shards(run_.config)


@app.command()
@cli_errors
def run(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="pipeline config (YAML/JSON); default: the embedded SciFact sample demo"
    ),
    set_: list[str] = typer.Option([], "--set", help="override a setting, e.g. --set generate.n_docs=200 (repeatable)"),
    backend: str = typer.Option("local", help="local (subprocesses) | k8s (Kubernetes Jobs)"),
    workspace: str = typer.Option("workspace", help="local folder or gs://bucket/prefix"),
    run_id: str | None = typer.Option(None, help="default: <dataset>-<time>-<random>"),
    parallel: int = typer.Option(2, help="local backend: shards running at once"),
    dry_run: bool = typer.Option(False, help="k8s: print the Job manifests and submit nothing"),
    namespace: str = "inpars",
    image: str | None = None,
    queue: str | None = typer.Option(None, help="Kueue LocalQueue name"),
    until: str | None = typer.Option(None, help="stop after this stage (resume continues later)"),
    max_parallel_pods: int | None = typer.Option(None, help="k8s: at most this many pods of a stage at once (a Kueue queue may lower it)"),
    detach: bool = typer.Option(False, help="k8s: submit the driver itself as a Job in the cluster and return (follow with status/logs)"),
):
    """Run every stage of a pipeline, stage after stage, and print the evaluation."""
    from ..workspace import Run

    cfg = build_config(config, set_)
    if backend not in ("local", "k8s"):
        raise InParsError(f"unknown backend {backend!r}: local | k8s")
    if backend == "k8s" and not workspace.startswith("gs://"):
        raise InParsError("--backend k8s needs a workspace the pods can reach: --workspace gs://bucket/prefix")
    if detach and backend != "k8s":
        raise InParsError("--detach runs the driver as a Kubernetes Job: use it with --backend k8s")
    if dry_run:
        if backend != "k8s":
            raise InParsError("--dry-run prints Kubernetes manifests: use it with --backend k8s")
        from .k8s_manifests import dry_run as render_dry_run
        from .plan import data_size, plan_pipeline

        rid = run_id or f"{cfg.data.name}-dry-run"
        run_uri = f"{workspace.rstrip('/')}/runs/{rid}"
        # Rendering validates each manifest as the API server would (names, hostnames, labels, quantities).
        text = render_dry_run(
            plan_pipeline(cfg, run_uri, until=until, data=data_size(config=cfg)),  # pods sized from the corpus file's size
            run_id=rid,
            namespace=namespace,
            image=image or cfg.image,
            queue=queue,
            max_parallel_pods=max_parallel_pods,
        )
        if detach:
            from .detach import run_driver_manifest
            from .k8s_manifests import to_yaml

            driver = run_driver_manifest(
                run_uri, rid, namespace=namespace, image=image or cfg.image, queue=queue, until=until, max_parallel_pods=max_parallel_pods
            )
            text = to_yaml([driver]) + "---\n" + text
        typer.echo(text)
        return
    preflight(cfg, runs_here=backend == "local")
    run_ = Run.create(workspace, cfg, run_id)
    console.print(f"run [bold]{run_.run_id}[/bold] at {run_.uri}")
    if detach:
        _detach(run_, namespace=namespace, image=image, queue=queue, until=until, max_parallel_pods=max_parallel_pods)
        return
    _execute(
        run_, backend, parallel=parallel, namespace=namespace, image=image, queue=queue, until=until, max_parallel_pods=max_parallel_pods
    )


@app.command()
@cli_errors
def status(run: str = typer.Argument(..., help="the run's URI: <workspace>/runs/<run-id>")):
    """Each stage's shards (done, missing, partial, invalid) and progress, from the workspace alone."""
    from ..workspace import Run
    from .driver import describe_holder, driver_holder
    from .local import stage_table

    run_ = Run.open(run)
    Console().print(stage_table(run_, plan_run(run_)))
    holder = driver_holder(run_)
    Console().print(
        f"driver: {describe_holder(holder)}" if holder else "driver: none holds the run now (`resume` continues it)", highlight=False
    )


@app.command()
@cli_errors
def verify(
    run: str = typer.Argument(..., help="the run's URI"),
    repair: bool = typer.Option(False, help="set bad shards aside so that `resume` redoes them"),
):
    """Check every committed file of the run against its record (size and sha256)."""
    from ..workspace import Run

    run_ = Run.open(run)
    bad = 0
    for job in plan_run(run_):
        checked = 0
        for i in range(job.shards):
            if not run_.shard_done(job.stage, i, job.shards):
                continue
            checked += 1
            problems = run_.verify_shard(job.stage, i, job.shards)
            for p in problems:
                typer.echo(f"{job.stage} shard {i}: {p}")
            if problems:
                bad += 1
                if repair:
                    run_.invalidate(job.stage, i, job.shards, "; ".join(problems))
        typer.echo(f"{job.stage}: {checked} committed shard(s) checked", err=True)
    if bad:
        typer.echo(f"{bad} shard(s) do not match their records" + (": set aside, `resume` redoes them" if repair else ""), err=True)
        raise typer.Exit(EXIT_PERMANENT)
    typer.echo("every committed file matches its record", err=True)


@app.command()
@cli_errors
def resume(
    run: str = typer.Argument(..., help="the run's URI"),
    set_: list[str] = typer.Option(
        [], "--set", help="change a runtime setting (budget, concurrency, resources), e.g. --set generate.budget_usd=20"
    ),
    backend: str = typer.Option("local", help="local | k8s"),
    parallel: int = 2,
    namespace: str = "inpars",
    image: str | None = None,
    queue: str | None = None,
    until: str | None = typer.Option(None, help="stop after this stage"),
    max_parallel_pods: int | None = typer.Option(None, help="k8s: at most this many pods of a stage at once"),
    detach: bool = typer.Option(False, help="k8s: run the driver as a Job in the cluster and return"),
):
    """Continue a run that stopped: only the shards missing from the workspace run again."""
    from ..workspace import Run

    if backend == "k8s" and not run.startswith("gs://"):
        raise InParsError("--backend k8s needs a run the pods can reach: gs://bucket/prefix/runs/<run-id>")
    if detach and backend != "k8s":
        raise InParsError("--detach runs the driver as a Kubernetes Job: use it with --backend k8s")
    run_ = Run.open(run)
    if set_:
        run_.change_settings(_parse_sets(set_))
    if detach:
        _detach(run_, namespace=namespace, image=image, queue=queue, until=until, max_parallel_pods=max_parallel_pods)
        return
    _execute(
        run_, backend, parallel=parallel, namespace=namespace, image=image, queue=queue, until=until, max_parallel_pods=max_parallel_pods
    )


@app.command()
@cli_errors
def logs(
    run: str = typer.Argument(..., help="the run's URI (k8s: or its id, or a BEIR driver's beir-<hash>)"),
    stage: str = typer.Argument(..., help="a stage, or `driver` (k8s: the detached driver's log)"),
    index: int | None = typer.Option(None, help="one shard's logs"),
    backend: str = typer.Option("local", help="local (log files) | k8s (pod logs)"),
    namespace: str = "inpars",
):
    """Print a stage's logs (local log files, or the pods' logs on Kubernetes)."""
    from ..workspace import Run

    if backend == "k8s":  # the cluster knows the run by its id: no workspace access needed
        run_id = run.rstrip("/").rsplit("/", 1)[-1]
        typer.echo(_k8s_executor(namespace, None, None).logs(run_id, stage, index))
    else:
        from .local import read_logs

        typer.echo(read_logs(Run.open(run), stage, index))


@app.command()
@cli_errors
def cancel(run: str = typer.Argument(..., help="the run's URI or run id (or a BEIR driver's beir-<hash>)"), namespace: str = "inpars"):
    """Delete a run's Kubernetes Jobs, its detached driver first (their pods go with them)."""
    run_id = run.rstrip("/").rsplit("/", 1)[-1]
    deleted = _k8s_executor(namespace, None, None).cancel(run_id)
    typer.echo(f"deleted {len(deleted)} job(s): {', '.join(deleted)}")


@app.command()
@cli_errors
def beir(
    datasets: str | None = typer.Option(None, help="'all' (the default) or a comma-separated list of BEIR names"),
    corpus_root: str | None = typer.Option(None, help="a mirror of BEIR folders, e.g. gs://bucket/beir (default: ir_datasets)"),
    config: Path | None = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set"),
    backend: str = "local",
    workspace: str = "workspace",
    max_concurrent: int = typer.Option(2, help="pipelines running at once"),
    parallel: int = 2,
    namespace: str = "inpars",
    image: str | None = None,
    queue: str | None = None,
    max_parallel_pods: int | None = typer.Option(None, help="k8s: at most this many pods of a stage at once"),
    dry_run: bool = typer.Option(
        False, help="print each dataset's run id, corpus, corpus check and workspace state (k8s: and the manifests)"
    ),
    detach: bool = typer.Option(False, help="k8s: create the runs, submit one driver Job that runs them all, and return"),
    runs: str | None = typer.Option(
        None, help="resume these runs of an earlier `beir` (ids under --workspace) instead of planning datasets"
    ),
):
    """Regenerate synthetic data for many BEIR datasets: one pipeline each, a shared limit, one summary.

    Run ids are deterministic (dataset + config hash): running it again resumes every dataset where the
    workspace says it is. Datasets whose corpus cannot be read are reported missing; the others run.
    Exit 0: all complete; 42: one missing or failed permanently; 75: only transient failures (run again).
    """
    from . import beir as lib
    from .driver import drive_exclusively

    if backend not in ("local", "k8s"):
        raise InParsError(f"unknown backend {backend!r}: local | k8s")
    if backend == "k8s" and not workspace.startswith("gs://"):
        raise InParsError("--backend k8s needs a workspace the pods can reach: --workspace gs://bucket/prefix")
    if detach and backend != "k8s":
        raise InParsError("--detach runs the driver as a Kubernetes Job: use it with --backend k8s")
    opened: dict[str, object] = {}
    if runs:
        if datasets or corpus_root or config or set_:
            raise InParsError(
                "--runs resumes existing runs with their own configs: leave out --datasets, --corpus-root, --config and --set"
            )
        plans = lib.plans_from_runs(workspace, [r.strip() for r in runs.split(",") if r.strip()], opened)
    else:
        base = build_config(config, set_)
        names = "all" if datasets in (None, "all") else [d.strip() for d in datasets.split(",") if d.strip()]
        plans = lib.plan_datasets(names, base, corpus_root)
        lib.check_corpora(plans, runs_here=backend == "local")
        for plan in plans:
            if plan.missing is None and plan.config is not None:
                preflight(plan.config, runs_here=backend == "local")  # the settings every dataset shares
    ready = [p for p in plans if p.missing is None and p.config is not None]
    image_ = image or (ready[0].config.image if ready else PipelineConfig().image)
    to_stderr = backend == "k8s"  # with k8s, stdout carries only manifests (dry run) or ids

    if dry_run:
        typer.echo(lib.plan_table(plans, lib.workspace_states(workspace, plans)), err=to_stderr)
        if backend == "k8s":
            typer.echo(
                lib.render_manifests(
                    plans,
                    workspace,
                    namespace=namespace,
                    image=image_,
                    queue=queue,
                    max_parallel_pods=max_parallel_pods,
                    driver=detach,
                    max_concurrent=max_concurrent,
                )
            )
        if any(p.missing for p in plans):
            raise typer.Exit(EXIT_PERMANENT)
        return

    if detach:
        _detach_beir(
            plans,
            ready,
            workspace=workspace,
            namespace=namespace,
            image=image_,
            queue=queue,
            max_parallel_pods=max_parallel_pods,
            max_concurrent=max_concurrent,
        )
        return

    def start(cfg: PipelineConfig):
        run_ = opened.get(cfg.data.name) or lib.open_run(workspace, cfg)
        executor = _executor(
            backend, parallel=parallel, namespace=namespace, image=image, queue=queue, cfg=cfg, max_parallel_pods=max_parallel_pods
        )
        drive_exclusively(run_, executor, say=lambda text: console.print(f"{cfg.data.name}: {text}", highlight=False))
        return run_

    results = lib.run_plans(plans, start, max_concurrent=max_concurrent)
    typer.echo(lib.summary_table(results))
    code = lib.exit_code(results)
    if code:
        raise typer.Exit(code)


def _detach_beir(
    plans, ready, *, workspace: str, namespace: str, image: str, queue: str | None, max_parallel_pods: int | None, max_concurrent: int
) -> None:
    """Create (pin) every dataset's run, submit one driver Job for them all, print the ids; exit 42 if some were missing."""
    from . import beir as lib
    from .detach import beir_driver_manifest, beir_set_id, follow_lines, submit
    from .k8s import DriverRunning

    typer.echo(lib.plan_table(plans), err=True)
    if not ready:
        raise InParsError("no dataset can run: every corpus is missing")
    created = [lib.open_run(workspace, p.config) for p in ready]
    ids = [r.run_id for r in created]
    manifest = beir_driver_manifest(
        workspace, ids, namespace=namespace, image=image, queue=queue, max_parallel_pods=max_parallel_pods, max_concurrent=max_concurrent
    )
    set_id = beir_set_id(workspace, ids)
    try:
        job = submit(_k8s_executor(namespace, image, queue), manifest, created)
    except DriverRunning as e:
        console.print(f"[yellow]{e}[/yellow]; not submitting a second one", highlight=False)
        typer.echo("\n".join(follow_lines(set_id, e.name, namespace, run_uris=[r.uri for r in created])))
        raise typer.Exit(EXIT_TRANSIENT) from None
    for r in created:
        typer.echo(f"{r.run_id}\t{r.uri}")
    typer.echo(f"driver Job {job} submitted for {len(created)} run(s) (BEIR set {set_id})")
    typer.echo("\n".join(follow_lines(set_id, job, namespace, run_uris=[r.uri for r in created])))
    if len(ready) < len(plans):  # reported, not run: the command says so, as an attached `beir` would
        console.print(f"[red]{len(plans) - len(ready)} dataset(s) missing[/red]: not submitted (see the table)", highlight=False)
        raise typer.Exit(EXIT_PERMANENT)


if __name__ == "__main__":
    app()
