"""Benchmark: documents/s through the OpenAI-compatible backend at concurrency 1 vs 8.

Starts a llama.cpp server itself (llama-cpp-python[server], the packaged SmolLM2 GGUF, 2 threads on
loopback), builds InPars-style prompts for the first ``--n-docs`` sample documents and times greedy
generation of the same prompts at each concurrency, in one run. Writes JSON.

Note: llama-cpp-python's server has ONE model instance and serves one request at a time (it has no
parallel slots, unlike llama.cpp's C++ ``llama-server --parallel N`` or vLLM), so against it a higher
client concurrency can only overlap HTTP/JSON work; the ratio is expected to be ~1. ``--latency-ms``
adds a fixed delay per request through a loopback proxy (tests/faultproxy.py), a stand-in for a
remote API's network round trip, which is what client concurrency hides.

``--against REF`` also times the backend module as it was at git ``REF`` (e.g. the commit before a
change to it), alternating with the current one on the same server and prompts, and prints the ratio.
``--stub`` replaces the llama.cpp server by the instant recording server of tests/apiserver.py, so
the numbers are the client's own cost per request (HTTP, JSON, the SDK, our accounting).

    python benchmarks/api_concurrency.py [--n-docs 16] [--concurrency 1 8] [--latency-ms 0] [--repeat 2]
                                         [--against REF] [--stub] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import machine, write_results  # this folder (see common.py)

REPO = Path(__file__).resolve().parents[1]

KEY_ENV = "INPARS_BENCH_API_KEY"
TEMPLATE = (
    "Example 1:\nDocument: Aspirin lowers fever and pain by blocking COX enzymes.\nRelevant Query: how does aspirin reduce fever\n\n"
    "Example 2:\nDocument: {doc}\nRelevant Query:"
)


def start_server(threads: int, n_ctx: int) -> tuple[subprocess.Popen, str, Path]:
    from inpars.models import resolve_model

    source = resolve_model("smollm2-135m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkdtemp(prefix="llama-bench-")) / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(Path(source.name_or_path) / source.gguf_file),
                "--model_alias",
                "smollm2-135m",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                str(n_ctx),
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
                "--logits_all",
                "true",
                "--verbose",
                "false",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama.cpp server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("llama.cpp server did not start within 180 s")


def backend_at_ref(ref: str):
    """``OpenAIBackend`` as inpars/backends/openai_api.py was at git ``ref`` (its relative imports resolve
    against the current package)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{ref}:inpars/backends/openai_api.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="inpars-ref-")) / "openai_api_ref.py"
    path.write_text(source, encoding="utf-8")
    name = "inpars.backends.openai_api_ref"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.OpenAIBackend


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-docs", type=int, default=16)
    parser.add_argument("--doc-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="server threads (2 stalls badly on a busy 2-core machine)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per concurrency (order alternates)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="extra delay per request (emulated network)")
    parser.add_argument("--against", metavar="REF", help="also time openai_api.py as it was at this git ref, side by side")
    parser.add_argument("--stub", action="store_true", help="an instant local server instead of llama.cpp: the client's own cost")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "api_concurrency.json"))
    args = parser.parse_args()

    from inpars.backends.openai_api import OpenAIBackend
    from inpars.corpus import read_corpus

    os.environ[KEY_ENV] = "unused"  # the local server checks no key
    implementations = {"current": OpenAIBackend}
    if args.against:
        implementations[args.against] = backend_at_ref(args.against)
    sys.path.insert(0, str(REPO / "tests"))
    stub = None
    if args.stub:
        from apiserver import ApiServer

        stub = ApiServer().__enter__()
        proc, url = None, stub.url
    else:
        proc, url, _log = start_server(args.threads, n_ctx=1024)
    try:
        base = url
        proxy = None
        if args.latency_ms > 0:
            from faultproxy import FaultProxy

            proxy = FaultProxy(url, delay_s=args.latency_ms / 1000.0).__enter__()
            base = proxy.url
        docs = list(read_corpus(REPO / "inpars" / "data" / "scifact-sample" / "corpus.jsonl").values())[: args.n_docs]
        backend = OpenAIBackend("smollm2-135m", base_url=f"{url}/v1", api_key_env=KEY_ENV)
        prompts = [TEMPLATE.format(doc=backend.truncate(d.contents, args.doc_tokens)) for d in docs]
        backend.generate(prompts[:1], max_new_tokens=args.max_new_tokens)  # warm-up (loads caches)
        runs, texts = [], {}
        # Alternate the order across repeats so that a change in machine load hits every setting alike.
        settings = [(c, name) for c in args.concurrency for name in implementations]
        order = [s for r in range(args.repeat) for s in (settings if r % 2 == 0 else settings[::-1])]
        for c, name in order:
            b = implementations[name]("smollm2-135m", base_url=f"{base}/v1", api_key_env=KEY_ENV, concurrency=c)
            start = time.perf_counter()
            rows = b.generate(prompts, max_new_tokens=args.max_new_tokens)
            seconds = time.perf_counter() - start
            b.close()
            texts[c, name] = [r.text for r in rows]
            runs.append(
                {
                    "implementation": name,
                    "concurrency": c,
                    "seconds": round(seconds, 3),
                    "docs_per_s": round(len(prompts) / seconds, 4),
                    "completion_tokens": b.usage.completion_tokens,
                    "prompt_tokens": b.usage.prompt_tokens,
                    "retries": b.usage.total_retries,
                }
            )
            print(f"{name} concurrency {c}: {len(prompts)} docs in {seconds:.2f} s = {len(prompts) / seconds:.3f} docs/s", flush=True)
        if proxy is not None:
            proxy.__exit__(None, None, None)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        if stub is not None:
            stub.__exit__(None, None, None)
    rates = {
        (c, name): median([r["docs_per_s"] for r in runs if r["concurrency"] == c and r["implementation"] == name]) for c, name in settings
    }
    median_rates = {c: rates[c, "current"] for c in args.concurrency}
    lo, hi = args.concurrency[0], args.concurrency[-1]
    same = sum(a == b for a, b in zip(texts[lo, "current"], texts[hi, "current"]))
    result = {
        "benchmark": "api_concurrency",
        "server": "tests/apiserver.py (instant answers)"
        if args.stub
        else "llama-cpp-python[server] (one request at a time: no parallel slots)",
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "server_threads": args.threads,
        "n_docs": len(prompts),
        "doc_tokens": args.doc_tokens,
        "max_new_tokens": args.max_new_tokens,
        "latency_ms": args.latency_ms,
        "runs": runs,
        "median_docs_per_s": {str(c): round(v, 4) for c, v in median_rates.items()},
        "speedup": round(median_rates[hi] / median_rates[lo], 3),
        "same_queries": f"{same}/{len(prompts)}",
        "machine": machine(),
    }
    print(f"speedup {hi} vs {lo}: {result['speedup']}x (median docs/s); same queries {result['same_queries']}")
    if args.against:
        ref = args.against
        result["against"] = {
            "ref": ref,
            "median_docs_per_s": {str(c): round(rates[c, ref], 4) for c in args.concurrency},
            "ratio_current_vs_ref": {str(c): round(rates[c, "current"] / rates[c, ref], 3) for c in args.concurrency},
            "same_queries_as_ref": {
                str(c): f"{sum(a == b for a, b in zip(texts[c, 'current'], texts[c, ref]))}/{len(prompts)}" for c in args.concurrency
            },
        }
        for c in args.concurrency:
            print(
                f"concurrency {c}: current {rates[c, 'current']:.3f} vs {ref} {rates[c, ref]:.3f} docs/s = {result['against']['ratio_current_vs_ref'][str(c)]}x"
            )
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
