"""Sharding overhead and the cost of a kill, measured side by side in one run.

1. The generate stage on the same documents as 1 shard and as 4 shards (run through the local
   executor, ``--parallel`` at a time): wall seconds of each and their ratio. Each shard is a process
   that loads the model once, so the overhead is mostly model loading.
2. A generate worker killed with SIGKILL once ``--kill-after`` checkpoint chunks are saved, then
   resumed: rows redone (generated twice) and the resumed run's extra seconds, against an
   uninterrupted worker on the same input. The output must be byte-identical.

    python benchmarks/sharding.py --n-docs 24 --checkpoint-every 4 --out benchmarks/results/sharding.json
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_results  # this folder (see common.py)

ROOT = Path(__file__).resolve().parents[1]

BIN = Path(sys.executable).parent


def _env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def main(argv: list[str] | None = None) -> dict:
    from inpars.config import PipelineConfig
    from inpars.launch.local import run_jobs
    from inpars.launch.plan import plan_pipeline
    from inpars.workspace import Run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-docs", type=int, default=24)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--kill-after", type=int, default=2, help="checkpoint chunks saved before the kill")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharding.json"))
    args = ap.parse_args(argv)

    base = {
        "generate.n_docs": args.n_docs,
        "generate.batch_size": args.checkpoint_every,
        "generate.checkpoint_every": args.checkpoint_every,
        "generate.max_new_tokens": 24,
        "generate.dtype": "float32",
    }
    result: dict = {"settings": vars(args), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for shards in (1, 4):
            run = Run.create(tmp, PipelineConfig().override({**base, "generate.shards": shards}), f"shards-{shards}")
            jobs = plan_pipeline(run.config, run.uri, until="generate")
            t = time.perf_counter()
            run_jobs(jobs, max_parallel=args.parallel, run=run, extra_env={"PATH": _env()["PATH"]})
            times[shards] = time.perf_counter() - t
            print(f"generate, {shards} shard(s), {args.parallel} at a time: {times[shards]:.1f} s", flush=True)
        result["sharding"] = {"one_shard_s": times[1], "four_shards_s": times[4], "ratio_4_over_1": times[4] / times[1]}

        config = PipelineConfig().override(base)
        clean, killed = Run.create(tmp, config, "clean"), Run.create(tmp, config, "killed")
        t = time.perf_counter()
        subprocess.run([str(BIN / "inpars"), "worker", "generate", "--run", clean.uri], env=_env(), check=True, capture_output=True)
        clean_s = time.perf_counter() - t
        chunks = Path(killed.uri) / "generate" / "_checkpoints" / "shard-00000-of-00001"
        t = time.perf_counter()
        proc = subprocess.Popen(
            [str(BIN / "inpars"), "worker", "generate", "--run", killed.uri],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while proc.poll() is None and not (chunks.exists() and len(list(chunks.glob("chunk-*"))) >= args.kill_after):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = len(list(chunks.glob("chunk-*")))
        # Rows done before the kill = saved chunks + the chunk in flight (lost, redone after resume).
        subprocess.run([str(BIN / "inpars"), "worker", "generate", "--run", killed.uri], env=_env(), check=True, capture_output=True)
        killed_s = time.perf_counter() - t
        identical = clean.read_shard("generate", 0, 1) == killed.read_shard("generate", 0, 1)
        result["kill"] = {
            "chunks_saved_at_kill": saved,
            "rows_redone_at_most": args.checkpoint_every,
            "uninterrupted_s": clean_s,
            "killed_and_resumed_s": killed_s,
            "extra_s": killed_s - clean_s,
            "identical_output": identical,
        }
        print(
            f"kill after {saved} saved chunks of {args.checkpoint_every} rows: resumed output identical={identical}; "
            f"uninterrupted {clean_s:.1f} s, killed+resumed {killed_s:.1f} s (+{killed_s - clean_s:.1f} s: one model load "
            f"and at most {args.checkpoint_every} rows redone)"
        )
    write_results(result, args.out)
    return result


if __name__ == "__main__":
    main()
