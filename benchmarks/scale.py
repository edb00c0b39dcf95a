"""Scale: the pipeline's data path on large synthetic corpora, per stage, with 1 and 4 negatives shards side by side.

For each corpus size (default 100k, 300k and 1M documents):

1. builds a synthetic BEIR corpus from SciFact's text (``syn-<i>``: title and text are shuffled word samples
   of two SciFact documents, seeded), with 50 queries made of words of known documents and their qrels;
   cached under ``--work`` (never committed), rebuilt only when the size, seed or source changes;
2. runs ``inpars-launch run --until negatives --parallel 1`` as a user would, generation served by an
   OpenAI-compatible stub on 127.0.0.1 that answers at once (benchmarks/openai_stub.py), so only the
   pipeline is timed: ``generate.n_docs=2000``, ``generate.shards=1``, and ``negatives.shards`` 1 and 4,
   each in a fresh workspace, one after the other (their order alternates between sizes);
3. reads each stage's numbers from the attempt records the workers write (``<stage>/_attempts/``: wall
   seconds, CPU seconds, peak RSS, bytes read from the workspace), and the largest RSS of any process of
   the run (the launcher included) from the kernel's accounting of the launcher's process tree;
   and, from a note each Python process of the run writes at exit (benchmarks/scale_probe/sitecustomize.py),
   what the stage's processes really read (a local workspace serves files in place: nothing is "downloaded")
   and their lifetimes, start-up and imports included;
4. prints the 4-shard/1-shard ratios (whole run, negatives alone), the per-shard fixed cost of negatives
   (derived: the extra worker-process seconds of 4 shards over 1, per extra shard; and each shard's own timing
   notes where the worker writes them), the growth across sizes, the targets of issue 12, and a markdown
   table; writes JSON. A worker's fixed cost is also measured step by step, in fresh processes on the first
   run's prepared workspace: imports, the verified fetch of the store and index, store open + index load,
   and the search of the 50 queries (ms per query).

    nice -n 10 python benchmarks/scale.py --sizes 100000,300000 [--data DIR] [--work DIR] [--n-docs 2000]
    python benchmarks/scale.py --sizes 5000 --keep        # a quick look; keep the workspaces to inspect them
    python benchmarks/scale.py --sizes 100000,300000,1000000 --shards 1 --until prepare --out benchmarks/results/scale-open-cost.json
    python benchmarks/scale.py --report benchmarks/results/scale-100k-300k.json benchmarks/results/scale-300k-repeat.json \
        benchmarks/results/scale-1000k.json benchmarks/results/scale-open-cost.json \
        --out benchmarks/results/scale-100k-300k-1000k.json   # measure nothing: one table from saved runs

The 4/1 ratio on a shared machine: stages before negatives do the same work in both runs, but their wall time
drifts with the machine's load (prepare took 167 s and 261 s in two runs of the same 300k corpus); read the
"same upstream" and CPU ratios beside the raw one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SCIFACT, machine, scifact_missing, write_results  # this folder (see common.py)
from openai_stub import openai_stub

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROBE = Path(__file__).resolve().parent / "scale_probe"
KEY_ENV = "INPARS_SCALE_API_KEY"  # the stub checks no key; the backend still reads one from the environment
CORPUS_FORMAT = 1  # bump when the synthetic corpus recipe changes (invalidates cached corpora)
MB = 1024 * 1024

# Issue 12's targets.
RATIO_TARGET = 1.15  # negatives.shards=4 over 1 shard, until negatives, at 300k documents
SHARD_RSS_TARGET_MB = {300_000: 512, 1_000_000: 1024}  # a negatives or rerank shard worker
PROCESS_RSS_TARGET_MB = {300_000: 2048}  # any process of the run

# Runs the launcher and reports the kernel's accounting of its whole process tree (every worker waited for):
# ru_maxrss of RUSAGE_CHILDREN is the largest RSS any one of them reached.
TREE_RUSAGE = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'max_rss_mb': u.ru_maxrss / 1024, 'cpu_seconds': u.ru_utime + u.ru_stime}))\n"
    "sys.exit(rc)\n"
)


# What a worker pays before its first query, each step timed in a fresh process on a prepared run: imports,
# the verified fetch of the store and index (sha256 of every file: in place on a local workspace), the store
# open and index load (memory-mapped), then the evaluation queries searched (k=100) one at a time.
OPEN_COST = """
import json, resource, sys, time
def rss():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "RssAnon", "RssFile")))
    return {k: int(v.split()[0]) // 1024 for k, v in status.items()}
t = time.perf_counter()
from inpars.prepare import INDEX_DIR, STORE_DIR, open_prepared
from inpars.workspace import Run
out = {"import_seconds": time.perf_counter() - t}
run = Run.open(sys.argv[1])
t = time.perf_counter()
folder = run.fetch("prepare", STORE_DIR).parent
run.fetch("prepare", INDEX_DIR)
out["fetch_verify_seconds"] = time.perf_counter() - t
t = time.perf_counter()
store, index = open_prepared(folder)
out["open_seconds"] = time.perf_counter() - t
out["rss_mb_after_open"] = rss()
queries = [json.loads(line)["text"] for line in open(sys.argv[2]) if line.strip()]
t = time.perf_counter()
for q in queries:
    index.retrieve([q], k=100)
out["search_ms_per_query"] = 1000 * (time.perf_counter() - t) / max(len(queries), 1)
out["rss_mb_after_search"] = rss()
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
"""


def measure_open_cost(run_dir: Path, queries: Path, repeats: int = 2) -> list[dict]:
    """:data:`OPEN_COST` on a prepared run, ``repeats`` times (fresh processes; the first may find a cold
    page cache)."""
    out = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", OPEN_COST, str(run_dir), str(queries)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"    open-cost probe failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            break
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def find_scifact(data: str | None) -> Path:
    """``--data``, else ../shared beside this checkout, else beside the main checkout of a git worktree."""
    if data:
        return Path(data)
    if SCIFACT.is_dir():
        return SCIFACT
    try:
        common_dir = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return SCIFACT
    return Path(common_dir).parents[1] / "shared" / "data" / "scifact"


# ------------------------------------------------------------------ the synthetic corpus


def read_source(scifact: Path) -> tuple[list[tuple[list[str], list[str]]], str]:
    """(title words, text words) of every SciFact document, and the corpus's sha256."""
    raw = (scifact / "corpus.jsonl").read_bytes()
    docs = []
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            docs.append((d.get("title", "").split(), d.get("text", "").split()))
    return docs, hashlib.sha256(raw).hexdigest()


def build_corpus(scifact: Path, n_docs: int, folder: Path, *, seed: int, n_queries: int) -> dict:
    """Write ``folder``/corpus.jsonl, queries.jsonl and qrels/test.tsv (BEIR), unless already there with
    the same recipe; returns what ``folder``/synthetic.json says about it."""
    source, source_sha = read_source(scifact)
    recipe = {"format": CORPUS_FORMAT, "documents": n_docs, "seed": seed, "queries": n_queries, "source_sha256": source_sha}
    marker = folder / "synthetic.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in recipe} == recipe:
            print(f"  corpus of {n_docs:,} documents: reusing {folder}", flush=True)
            return info
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "qrels").mkdir(parents=True)
    rng = random.Random(seed * 1_000_003 + n_docs)
    # Each query comes from a known document spread over the corpus, so retrieval has something to find.
    query_docs = {(q * n_docs) // n_queries + (n_docs // n_queries) // 2: q for q in range(n_queries)}
    queries: dict[int, str] = {}
    started = time.perf_counter()
    n_src = len(source)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as out:
        for i in range(n_docs):
            (title_a, text_a), (title_b, text_b) = source[rng.randrange(n_src)], source[rng.randrange(n_src)]
            titles, words = title_a + title_b, text_a + text_b
            title = rng.sample(titles, len(titles) // 2) if titles else []
            text = rng.sample(words, len(words) // 2) if words else title
            if i in query_docs:
                pool = text or title or ["empty"]
                queries[query_docs[i]] = " ".join(rng.sample(pool, min(6, len(pool))))
            out.write(json.dumps({"_id": f"syn-{i}", "title": " ".join(title), "text": " ".join(text)}) + "\n")
            if i and i % 200_000 == 0:
                print(f"    {i:,} documents written ({time.perf_counter() - started:.0f} s)", flush=True)
    by_query = {q: i for i, q in query_docs.items()}
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as out:
        for q in range(n_queries):
            out.write(json.dumps({"_id": f"q{q}", "text": queries[q]}) + "\n")
    with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        for q in range(n_queries):
            out.write(f"q{q}\tsyn-{by_query[q]}\t1\n")
    info = {**recipe, "bytes": (folder / "corpus.jsonl").stat().st_size, "build_seconds": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    print(f"  corpus of {n_docs:,} documents: {info['bytes'] / MB:,.0f} MB in {info['build_seconds']:.0f} s ({folder})", flush=True)
    return info


# ------------------------------------------------------------------ one run of the pipeline


def run_pipeline(corpus: Path, workspace: Path, stub_url: str, *, n_docs: int, negatives_shards: int, until: str, log: Path) -> dict:
    """``inpars-launch run`` in a fresh ``workspace``; its wall seconds, exit code and process-tree accounting."""
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    settings = {
        "data.corpus": str(corpus),
        "data.name": "synthetic",
        "generate.backend": "openai",
        "generate.base_url": f"{stub_url}/v1",
        "generate.model": "stub",
        "generate.api_key_env": KEY_ENV,
        "generate.n_docs": n_docs,
        "generate.shards": 1,
        "negatives.shards": negatives_shards,
    }
    command = [str(BIN / "inpars-launch"), "run", "--workspace", str(workspace), "--run-id", "scale", "--until", until, "--parallel", "1"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    rusage = workspace / "tree-rusage.json"
    probes = workspace / "probes"
    probes.mkdir()
    env = {
        **os.environ,
        KEY_ENV: "dummy-key-for-the-loopback-stub",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # Every Python process of the run notes what it read and its peak RSS at exit (scale_probe/sitecustomize.py).
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROBE), os.environ.get("PYTHONPATH")) if p),
        "INPARS_SCALE_PROBE_DIR": str(probes),
    }
    started = time.perf_counter()
    with open(log, "wb") as out:
        rc = subprocess.call([sys.executable, "-c", TREE_RUSAGE, str(rusage), *command], stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    tree = json.loads(rusage.read_text()) if rusage.is_file() else {}
    notes = read_probes(probes)
    stages = stage_numbers(workspace / "runs" / "scale", notes)
    prepared = {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # what prepare committed: the store and index sizes
        stats = json.loads((workspace / "runs" / "scale" / "prepare" / "shard-00000-of-00001.json").read_text())
        prepared = {
            "documents": stats["store"]["documents"],
            "store_bytes": stats["store"]["bytes"],
            "index_bytes": stats["index"]["bytes"],
        }
    return {
        "returncode": rc,
        "wall_seconds": round(seconds, 2),
        "tree_max_rss_mb": round(tree.get("max_rss_mb", 0.0), 1),
        "tree_cpu_seconds": round(tree.get("cpu_seconds", 0.0), 2),
        "settings": settings,
        "log": str(log),
        "stages": stages,
        "prepared": prepared,
        "outside_workers_seconds": round(seconds - sum(s.get("process_seconds") or 0 for s in stages.values()), 2),
        "launcher_peak_rss_mb": round(max((n.get("vm_hwm_kb") or 0 for n in notes.get("launcher", [])), default=0) / 1024, 1),
    }


def read_probes(folder: Path) -> dict[str, list[dict]]:
    """The exit notes of the run's processes by stage (``launcher`` for inpars-launch itself)."""
    by_stage: dict[str, list[dict]] = {}
    for path in folder.glob("*.json"):
        try:
            note = json.loads(path.read_text())
        except ValueError:
            continue
        argv = note.get("argv") or []
        if "worker" in argv[:-1]:
            stage = argv[argv.index("worker") + 1]
        elif argv and Path(argv[0]).name == "inpars-launch":
            stage = "launcher"
        else:
            continue  # the wrapper that measures the tree
        by_stage.setdefault(stage, []).append(note)
    return by_stage


def stage_numbers(run_dir: Path, probes: dict[str, list[dict]]) -> dict:
    """Per stage, from the attempt records: wall (first start to last end), CPU, largest peak RSS, bytes read
    from the workspace, and each shard's own numbers (its timing notes too, where the worker writes them);
    from the processes' exit notes (``probes``): what the stage's processes read in all (files and sockets)."""
    from inpars.pipeline import STAGE_NAMES

    stages = {}
    for stage in STAGE_NAMES:
        records = []
        for path in sorted((run_dir / stage / "_attempts").glob("shard-*/*.json")):
            try:
                records.append((path.parent.name, json.loads(path.read_text())))
            except ValueError:
                continue
        if not records:
            continue
        shards = []
        for name, a in sorted(records, key=lambda r: (r[0], r[1].get("started_at", 0))):
            shard = {
                "shard": name,
                "outcome": a.get("outcome"),
                "seconds": a.get("seconds"),
                "cpu_seconds": a.get("cpu_seconds"),
                "peak_rss_mb": a.get("peak_rss_mb"),
                "bytes_read": a.get("bytes_read"),
            }
            timing = {k: v for k, v in a.items() if k in ("timing", "timings", "fixed_cost", "open_seconds")}
            shards.append({**shard, **timing})
        started = min(a.get("started_at", 0) for _, a in records)
        ended = max(a.get("started_at", 0) + (a.get("seconds") or 0) for _, a in records)
        stages[stage] = {
            "shards": len({name for name, _ in records}),
            "attempts": len(records),
            "failed_attempts": sum(a.get("outcome") == "failed" for _, a in records),
            "wall_seconds": round(ended - started, 2),
            "cpu_seconds": round(sum(a.get("cpu_seconds") or 0 for _, a in records), 2),
            "peak_rss_mb": max(a.get("peak_rss_mb") or 0 for _, a in records),
            "bytes_read": sum(a.get("bytes_read") or 0 for _, a in records),
            "process_read_bytes": sum(n.get("rchar", 0) for n in probes.get(stage, [])),
            "process_disk_read_bytes": sum(n.get("read_bytes", 0) for n in probes.get(stage, [])),
            "process_peak_rss_mb": round(max((n.get("vm_hwm_kb") or 0 for n in probes.get(stage, [])), default=0) / 1024, 1),
            "process_seconds": round(sum(n.get("lifetime_seconds", 0) for n in probes.get(stage, [])), 2),
            # At exit: the largest anonymous RSS (the process's own memory) and mapped-file RSS (page cache).
            "process_anon_rss_mb_at_exit": round(max((n.get("rss_anon_kb") or 0 for n in probes.get(stage, [])), default=0) / 1024, 1),
            "process_file_rss_mb_at_exit": round(max((n.get("rss_file_kb") or 0 for n in probes.get(stage, [])), default=0) / 1024, 1),
            "process_wall_seconds": process_span(probes.get(stage, [])),
            "process_cpu_seconds": round(sum(n.get("cpu_seconds", 0) for n in probes.get(stage, [])), 2),
            "per_shard": shards,
        }
    return stages


# ------------------------------------------------------------------ reporting


def process_span(notes: list[dict]) -> float | None:
    """Seconds from the first process's start to the last one's exit (start-up included, unlike the
    attempt records, which start once a worker holds its lease)."""
    spans = [(n["exited_at"] - n["lifetime_seconds"], n["exited_at"]) for n in notes if "exited_at" in n]
    return round(max(e for _, e in spans) - min(s for s, _ in spans), 2) if spans else None


def stage_wall(stage: dict) -> float:
    """A stage's wall seconds, worker start-up included where the processes' notes say it."""
    return stage.get("process_wall_seconds") or stage["wall_seconds"]


def shard_fixed_seconds(one: dict, four: dict) -> dict:
    """The per-shard fixed cost of negatives, derived from the two runs side by side: (4-shard seconds -
    1-shard seconds) / 3 extra shards, of the worker processes' lifetimes (``derived_seconds``: start-up
    and imports included) and of their attempt records (``attempt_seconds``: from the lease on); plus each
    shard's own timing notes where the worker writes any."""
    out: dict = {}
    n1, n4 = one["stages"].get("negatives"), four["stages"].get("negatives")
    if n1 and n4:
        s1 = sum(s["seconds"] or 0 for s in n1["per_shard"])
        s4 = sum(s["seconds"] or 0 for s in n4["per_shard"])
        out["attempt_seconds"] = round((s4 - s1) / 3, 2)
        if n1["process_seconds"] and n4["process_seconds"]:
            out["derived_seconds"] = round((n4["process_seconds"] - n1["process_seconds"]) / 3, 2)
        else:
            out["derived_seconds"] = out["attempt_seconds"]
        out["cpu_seconds"] = round((n4["process_cpu_seconds"] - n1["process_cpu_seconds"]) / 3, 2)
        noted = [s.get("timing") for s in n4["per_shard"] if s.get("timing")]
        if noted:
            out["noted_by_workers"] = noted
    return out


def summarize_size(size: dict) -> None:
    """Set ``size["ratios"]`` and ``size["fixed_cost"]`` from its two runs, and print them.

    Ratios of 4 over 1 negatives shards: ``whole_run`` (wall, as measured); ``whole_run_same_upstream``
    (both runs given the mean of their stages before negatives, and of the time outside the workers: that
    work is identical in both, so this removes the drift of a shared machine's load from the comparison);
    ``whole_run_cpu`` (CPU seconds of every process of the run); ``negatives`` (the stage's wall, worker
    start-up included) and ``negatives_cpu``."""
    one, four = size["runs"].get("1"), size["runs"].get("4")
    if not one or not four or one["returncode"] != 0 or four["returncode"] != 0:
        return
    ratios = {"whole_run": round(four["wall_seconds"] / one["wall_seconds"], 3)}
    if one["tree_cpu_seconds"] > 0:
        ratios["whole_run_cpu"] = round(four["tree_cpu_seconds"] / one["tree_cpu_seconds"], 3)
    n1, n4 = one["stages"].get("negatives"), four["stages"].get("negatives")
    if n1 and n4:
        neg1, neg4 = stage_wall(n1), stage_wall(n4)
        upstream = (one["wall_seconds"] - neg1 + four["wall_seconds"] - neg4) / 2
        ratios["whole_run_same_upstream"] = round((upstream + neg4) / (upstream + neg1), 3)
        ratios["negatives"] = round(neg4 / neg1, 3) if neg1 > 0 else None
        ratios["negatives_cpu"] = round(n4["cpu_seconds"] / n1["cpu_seconds"], 3) if n1["cpu_seconds"] > 0 else None
    size["ratios"] = ratios
    size["fixed_cost"] = shard_fixed_seconds(one, four)
    fixed = size["fixed_cost"]
    print(
        f"  {label(size)} docs, 4/1 shards: whole run {ratios['whole_run']:.2f}x "
        f"({ratios.get('whole_run_same_upstream', float('nan')):.2f}x with the same upstream stages; CPU "
        f"{ratios.get('whole_run_cpu', float('nan')):.2f}x), negatives {ratios.get('negatives') or float('nan'):.2f}x "
        f"(CPU {ratios.get('negatives_cpu') or float('nan'):.2f}x); negatives fixed cost per shard (derived) "
        f"{fixed.get('derived_seconds', float('nan')):.2f} s ({fixed.get('cpu_seconds', float('nan')):.2f} CPU s; "
        f"{fixed.get('attempt_seconds', float('nan')):.2f} s of it after the lease)",
        flush=True,
    )


def report(result: dict, out: str | None) -> dict:
    """Print the tables and the targets of ``result`` (its sizes summarized), and write it to ``out``."""
    for size in result["sizes"]:
        summarize_size(size)
    print()
    print(markdown(result))
    print()
    result["targets"] = target_lines(result)
    print("\n".join(result["targets"]))
    if out:
        write_results(result, out)
    return result


def fmt_mb(n: float | None) -> str:
    return "-" if n is None else f"{n:,.0f}"


def markdown(result: dict) -> str:
    lines = [
        "| documents | neg. shards | stage | wall s | worker processes s | CPU s (after lease) | peak RSS MB (largest worker) "
        "| downloaded from workspace MB | read by its processes MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in result["sizes"]:
        for shards in ("1", "4"):
            run = size["runs"].get(shards)
            if not run:
                continue
            for stage, s in run["stages"].items():
                lines.append(
                    f"| {label(size)} | {shards} | {stage} | {stage_wall(s):.1f} | {s['process_seconds']:.1f} | {s['cpu_seconds']:.1f} | "
                    f"{fmt_mb(s['peak_rss_mb'])} | {s['bytes_read'] / MB:,.1f} | {s['process_read_bytes'] / MB:,.0f} |"
                )
            lines.append(
                f"| {label(size)} | {shards} | **whole run** | {run['wall_seconds']:.1f} | | {run['tree_cpu_seconds']:.1f} | "
                f"{fmt_mb(run['tree_max_rss_mb'])} (any process; launcher {fmt_mb(run['launcher_peak_rss_mb'])}) | | |"
            )
    nan = float("nan")
    lines += [
        "",
        "| documents | whole run 4/1 shards | same upstream | CPU | negatives 4/1 shards | negatives fixed cost per shard s "
        "| negatives shard peak RSS MB | largest process MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in result["sizes"]:
        r = size.get("ratios", {})
        largest = max((run["tree_max_rss_mb"] for run in size["runs"].values()), default=None)
        lines.append(
            f"| {label(size)} | {r.get('whole_run', nan):.2f}x | {r.get('whole_run_same_upstream', nan):.2f}x | "
            f"{r.get('whole_run_cpu', nan):.2f}x | {r.get('negatives') or nan:.2f}x | "
            f"{size.get('fixed_cost', {}).get('derived_seconds', nan):.2f} | {fmt_mb(shard_peak_mb(size))} | {fmt_mb(largest)} |"
        )
    costs = [(label(size), warm_open_cost(size)) for size in result["sizes"] if warm_open_cost(size)]
    if costs:
        lines += [
            "",
            "| documents | worker imports s | fetch + verify store and index s | store open + index load s | search ms/query "
            "| RSS after open MB (anon / file) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for n, c in costs:
            r = c["rss_mb_after_open"]
            lines.append(
                f"| {n} | {c['import_seconds']:.2f} | {c['fetch_verify_seconds']:.2f} | {c['open_seconds']:.2f} | "
                f"{c['search_ms_per_query']:.1f} | {r.get('VmRSS', 0)} ({r.get('RssAnon', 0)} / {r.get('RssFile', 0)}) |"
            )
    return "\n".join(lines)


def label(size: dict) -> str:
    """How tables name a size: its documents, and which repeat it is where a size was measured twice."""
    return size.get("label") or f"{size['documents']:,}"


def warm_open_cost(size: dict) -> dict | None:
    """The fastest of the size's open-cost measurements (the others may have met a cold page cache)."""
    costs = size.get("open_cost") or []
    return min(costs, key=lambda c: c["fetch_verify_seconds"] + c["open_seconds"]) if costs else None


def shard_peak_mb(size: dict) -> float | None:
    """The largest peak RSS of a negatives or rerank shard worker over the size's runs."""
    peaks = [s["peak_rss_mb"] or 0 for run in size["runs"].values() for st, s in run["stages"].items() if st in ("negatives", "rerank")]
    return max(peaks, default=None)


def shard_read_mb(size: dict) -> float | None:
    """What one negatives shard's process read (files and sockets), in the 4-shard run."""
    stage = size["runs"].get("4", {}).get("stages", {}).get("negatives")
    if not stage or not stage.get("process_read_bytes"):
        return None
    return stage["process_read_bytes"] / stage["shards"] / MB


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def target_lines(result: dict) -> list[str]:
    """Issue 12's targets against what was measured (a size without a target is shown for reference)."""
    lines = []
    by_size = [(s["documents"], s) for s in result["sizes"]]
    for n, size in by_size:
        name = label(size)
        where = "target size" if n == 300_000 else "reference: the target is at 300k"
        for key, what in (("whole_run", "as measured"), ("whole_run_same_upstream", "same upstream stages")):
            ratio = size.get("ratios", {}).get(key)
            if ratio is not None:
                lines.append(
                    f"{name:>13} docs: 4/1-shard whole run ({what}) {ratio:.2f}x vs <= {RATIO_TARGET}x ({where}): {verdict(ratio <= RATIO_TARGET)}"
                )
        shard_peak = shard_peak_mb(size)
        if shard_peak is not None:
            limit = SHARD_RSS_TARGET_MB.get(n)
            note = f"vs <= {limit} MB: {verdict(shard_peak <= limit)}" if limit else "(targets: 512 MB at 300k, 1024 MB at 1M)"
            lines.append(f"{name:>13} docs: negatives/rerank shard worker peak {shard_peak:,.0f} MB {note}")
        process_peak = max((run["tree_max_rss_mb"] for run in size["runs"].values()), default=None)
        if process_peak is not None:
            limit = PROCESS_RSS_TARGET_MB.get(n)
            note = f"vs <= {limit} MB: {verdict(process_peak <= limit)}" if limit else "(target: 2048 MB at 300k)"
            lines.append(f"{name:>13} docs: largest process of the run {process_peak:,.0f} MB {note}")
    for key, unit in (("derived_seconds", "s"), ("cpu_seconds", "CPU s")):
        fixed = [(n, s["fixed_cost"][key]) for n, s in by_size if key in s.get("fixed_cost", {})]
        if len(fixed) > 1:
            (n0, f0), (n1, f1) = fixed[0], fixed[-1]
            lines.append(
                f"negatives fixed cost per shard {f0:.2f} {unit} at {n0:,} -> {f1:.2f} {unit} at {n1:,} docs "
                f"({f1 / f0 if f0 > 0 else float('nan'):.2f}x for {n1 / n0:.0f}x the documents; target: nearly flat)"
            )
    costs = [(n, warm_open_cost(s)) for n, s in by_size if warm_open_cost(s)]
    if len(costs) > 1:
        (n0, c0), (n1, c1) = costs[0], costs[-1]
        for key, what in (("open_seconds", "store open + index load"), ("fetch_verify_seconds", "fetch + verify of the store and index")):
            lines.append(
                f"{what}: {c0[key]:.2f} s at {n0:,} -> {c1[key]:.2f} s at {n1:,} docs "
                f"({c1[key] / c0[key] if c0[key] > 0 else float('nan'):.2f}x for {n1 / n0:.0f}x the documents; target: nearly flat)"
            )
    read = [(label(s), shard_read_mb(s)) for _, s in by_size if shard_read_mb(s)]
    if read:
        lines.append(
            "read by one negatives shard: "
            + ", ".join(f"{mb:,.0f} MB at {n}" for n, mb in read)
            + " docs (a shard needing only its queries' top-k should read about the same at every size)"
        )
    return lines


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,300000,1000000", help="corpus sizes, comma-separated")
    ap.add_argument("--data", help="the SciFact BEIR folder (default: ../shared/data/scifact)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "inpars-scale"), help="corpora, workspaces and logs")
    ap.add_argument("--n-docs", type=int, default=2000, help="generate.n_docs")
    ap.add_argument("--queries", type=int, default=50, help="evaluation queries written beside each corpus")
    ap.add_argument("--until", default="negatives", help="the last stage run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", default="1,4", help="negatives.shards of the runs side by side (1,4; or 1 alone)")
    ap.add_argument("--keep", action="store_true", help="keep the workspaces (the corpora are always kept, as a cache)")
    ap.add_argument("--out", help="default: benchmarks/results/scale-<sizes>.json")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="measure nothing: summarize saved results (their sizes merged)")
    args = ap.parse_args(argv)
    if args.report:
        # Files of full runs first; a file of shorter runs (--until prepare) only lends its open costs to
        # the sizes measured in full. A size measured twice is shown twice, numbered.
        merged: dict = {"benchmark": "scale", "sources": args.report, "sizes": []}
        saved = [(path, json.loads(Path(path).read_text())) for path in args.report]
        saved.sort(key=lambda ps: ps[1].get("settings", {}).get("until", "negatives") != "negatives")
        for path, data in saved:
            merged.setdefault("runs_of", []).append({"file": path, "commit": data.get("commit"), "machine": data.get("machine")})
            full = data.get("settings", {}).get("until", "negatives") == "negatives"
            for size in data["sizes"]:
                same = [s for s in merged["sizes"] if s["documents"] == size["documents"]]
                if not full and same and size.get("open_cost"):
                    for s in same:
                        s.setdefault("open_cost", size["open_cost"])
                    continue
                if same:
                    size["label"] = f"{size['documents']:,} ({len(same) + 1})"
                merged["sizes"].append(size)
        merged["sizes"].sort(key=lambda size: size["documents"])
        return report(merged, args.out)

    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    scifact = find_scifact(args.data)
    if scifact_missing(scifact, who="scale"):
        return None
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or str(
        ROOT / "benchmarks" / "results" / f"scale-{'-'.join(f'{n // 1000}k' if n % 1000 == 0 else str(n) for n in sizes)}.json"
    )
    result: dict = {"benchmark": "scale", "settings": {**vars(args), "sizes": sizes, "data": str(scifact)}, "sizes": []}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result["commit"] = commit
    began = time.perf_counter()
    with openai_stub() as stub:
        for k, n in enumerate(sizes):
            print(f"== {n:,} documents", flush=True)
            corpus = work / f"corpus-{n}"
            size: dict = {"documents": n, "corpus": build_corpus(scifact, n, corpus, seed=args.seed, n_queries=args.queries), "runs": {}}
            order = [int(x) for x in args.shards.split(",")]
            for shards in order if k % 2 == 0 else order[::-1]:  # alternate the order: a load drift hits both alike
                workspace = work / f"ws-{n}-{shards}"
                run = run_pipeline(
                    corpus,
                    workspace,
                    stub.url,
                    n_docs=min(args.n_docs, n),
                    negatives_shards=shards,
                    until=args.until,
                    log=work / f"run-{n}-{shards}.log",
                )
                size["runs"][str(shards)] = run
                state = "ok" if run["returncode"] == 0 else f"FAILED (exit {run['returncode']}; see {run['log']})"
                print(
                    f"  negatives.shards={shards}: {run['wall_seconds']:.1f} s, {run['tree_cpu_seconds']:.1f} CPU s, "
                    f"largest process {run['tree_max_rss_mb']:,.0f} MB; {run['outside_workers_seconds']:.1f} s outside the workers: {state}"
                    + (
                        f"; prepared store {run['prepared']['store_bytes'] / MB:,.0f} MB, index {run['prepared']['index_bytes'] / MB:,.0f} MB"
                        if run["prepared"]
                        else ""
                    ),
                    flush=True,
                )
                for stage, s in run["stages"].items():
                    print(
                        f"    {stage:<10} {s['shards']} shard(s): wall {stage_wall(s):7.1f} s (after the lease {s['wall_seconds']:7.1f} s)  "
                        f"CPU {s['cpu_seconds']:7.1f} s  "
                        f"peak RSS {s['peak_rss_mb']:7,.0f} MB  downloaded {s['bytes_read'] / MB:8,.1f} MB  "
                        f"read by its processes {s['process_read_bytes'] / MB:8,.0f} MB"
                        + (f"  ({s['failed_attempts']} failed attempts)" if s["failed_attempts"] else ""),
                        flush=True,
                    )
                if run["returncode"] != 0:
                    print("    " + "\n    ".join(Path(run["log"]).read_text(errors="replace").splitlines()[-15:]), flush=True)
                if run["returncode"] == 0 and "open_cost" not in size:
                    size["open_cost"] = measure_open_cost(workspace / "runs" / "scale", corpus / "queries.jsonl")
                    for c in size["open_cost"]:
                        print(
                            f"    a worker's fixed cost: imports {c['import_seconds']:.2f} s, fetch+verify {c['fetch_verify_seconds']:.2f} s, "
                            f"store open + index load {c['open_seconds']:.2f} s (RSS {c['rss_mb_after_open']}); "
                            f"search {c['search_ms_per_query']:.1f} ms/query (RSS after {c['rss_mb_after_search']})",
                            flush=True,
                        )
                if not args.keep:
                    shutil.rmtree(workspace, ignore_errors=True)
            summarize_size(size)
            result["sizes"].append(size)
        result["stub_requests"] = len(stub.requests)
    result["total_seconds"] = round(time.perf_counter() - began, 1)
    result["machine"] = machine()
    print(
        f"\ntotal {result['total_seconds']:.0f} s on {result['machine']['cpu_count']} CPUs (load {result['machine']['load_average_1min']})"
    )
    return report(result, out)


if __name__ == "__main__":
    main()
