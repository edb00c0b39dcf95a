"""Generation speed: our transformers backend against the reference loop, same model, docs and machine.

Reference (what the original toolkit does): ``model.generate`` with batch size 1, the full prompt each
time, fp32, greedy, stopping at a newline. Ours: :class:`TransformersBackend` (dtype auto = bf16 where
the CPU supports it, batched, shared-prefix KV cache). Both use SmolLM2-135M and the vanilla InPars
prompt on documents of the SciFact sample. The reference is slow, so it runs on the first
``--n-ref`` documents only and rates are compared per document.

Also reported: how many queries agree with the reference (ours in fp32 should give ~100%; bf16
rounds differently, so a few queries may diverge), and the fraction of the compute bound reached:
FLOPs actually computed per document (2 x non-embedding params per token fed, padding included,
plus 2 x vocab x hidden per logit row) over the bf16 matmul rate measured in the same run.

    python benchmarks/generation.py --n-docs 48 --n-ref 6 --batch-size 48 --threads 1 --out benchmarks/results/generation.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))
from common import machine, write_results  # this folder; see common.py

from inpars.backends.transformers_backend import TransformersBackend
from inpars.corpus import read_corpus
from inpars.generate import generate_queries, sample_documents
from inpars.prompts import load_prompt


def matmul_rate(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0, device: str = "cpu") -> float:
    """Best-of measured FLOP/s of an n x n matmul in ``dtype`` (the machine's compute bound)."""
    if device.startswith("cuda"):
        n = max(n, 8192)  # a GPU needs a big product to reach its rate
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def reference_queries(backend: TransformersBackend, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The reference loop: batch 1, full prompt, ``generate`` with a newline stopping criterion."""
    from transformers import StoppingCriteria

    newline = backend.newline_ids

    class StopAtNewline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([input_ids[0, -1].item() in newline], device=input_ids.device)

    tok, model, queries = backend.tokenizer, backend.model, []
    with torch.inference_mode():
        for text in prompts:
            enc = tok(text, return_tensors="pt").to(model.device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=backend.pad_id, stopping_criteria=[StopAtNewline()]
            )
            queries.append(tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True).split("\n")[0].strip())
    return queries


def run_ours(backend, docs, prompt, args) -> tuple[list[dict], float]:
    backend.stats.update(forward_tokens=0, logit_rows=0)
    backend.forget_prefix()  # the shared-prefix cache is part of the measured work
    t = time.perf_counter()
    rows = generate_queries(
        docs, backend, prompt, max_new_tokens=args.max_new_tokens, max_doc_tokens=args.max_doc_tokens, batch_size=args.batch_size
    )
    return rows, time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-docs", type=int, default=48, help="documents for our backend")
    ap.add_argument("--n-ref", type=int, default=6, help="documents for the (slow) reference loop and fp32 check")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-doc-tokens", type=int, default=256)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    docs = sample_documents(read_corpus(ROOT / "inpars" / "data" / "scifact-sample"), args.n_docs, seed=args.seed)
    ref_docs = docs[: args.n_ref]
    prompt = load_prompt("inpars")

    fp32 = TransformersBackend(args.model, dtype="float32", batch_size=args.batch_size, device=args.device)
    prompts = [prompt.build(d, truncate=fp32.truncate, max_doc_tokens=args.max_doc_tokens).text for d in ref_docs]
    print(f"reference loop on {len(ref_docs)} docs (batch 1, full prompt, fp32)...", flush=True)
    t = time.perf_counter()
    ref = reference_queries(fp32, prompts, args.max_new_tokens)
    ref_s = time.perf_counter() - t
    # Batch 1 has no padding: the reference feeds each prompt token once, then one token per step.
    ref_tokens = sum(len(fp32.encode(p)) for p in prompts) + sum(len(fp32.encode(q)) + 1 for q in ref)
    print(f"  {len(ref_docs) / ref_s:.3f} docs/s", flush=True)
    ours32, ours32_s = run_ours(fp32, docs, prompt, args)
    print(f"ours fp32 on {len(docs)} docs: {len(docs) / ours32_s:.3f} docs/s", flush=True)
    fp32.close()

    auto = TransformersBackend(args.model, dtype="auto", batch_size=args.batch_size, device=args.device)
    reuse = "prefix cache" if auto.reuses_prefix else "no prefix cache (sliding-window attention)"
    print(f"ours ({auto.dtype}, batch {args.batch_size}, {reuse}) on {len(docs)} docs...", flush=True)
    ours, ours_s = run_ours(auto, docs, prompt, args)
    print(f"  {len(docs) / ours_s:.3f} docs/s", flush=True)
    stats = dict(auto.stats)

    cfg = auto.model.config
    n_params = sum(p.numel() for p in auto.model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    flops = 2 * (n_params - embed) * stats["forward_tokens"] + 2 * embed * stats["logit_rows"]
    ref_flops = 2 * (n_params - embed) * ref_tokens + 2 * embed * (ref_tokens - sum(len(fp32.encode(p)) for p in prompts) + len(prompts))
    dev = str(auto.model.device)
    rate = matmul_rate(torch.bfloat16 if auto.dtype == torch.bfloat16 else torch.float32, device=dev)
    rate32 = matmul_rate(torch.float32, device=dev)

    ref_rate, ours_rate = len(ref_docs) / ref_s, len(docs) / ours_s
    same32 = sum(a == r["query"] for a, r in zip(ref, ours32)) / len(ref)
    same_auto = sum(a == r["query"] for a, r in zip(ref, ours)) / len(ref)
    result = {
        "machine": {
            **machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "device": dev,
        },  # machine() names the GPU
        "settings": vars(args),
        "reference": {
            "docs": len(ref_docs),
            "seconds": ref_s,
            "docs_per_s": ref_rate,
            "flops_per_doc": ref_flops / len(ref_docs),
            "fraction_of_fp32_bound": (ref_flops / ref_s) / rate32,
        },
        "ours_fp32": {
            "docs": len(docs),
            "seconds": ours32_s,
            "docs_per_s": len(docs) / ours32_s,
            "same_queries_as_reference": same32,
            "speedup": len(docs) / ours32_s / ref_rate,
        },
        "ours": {
            "dtype": str(auto.dtype),
            "prefix_cache": auto.reuses_prefix,
            "docs": len(docs),
            "seconds": ours_s,
            "docs_per_s": ours_rate,
            "same_queries_as_reference": same_auto,
            "forward_tokens_per_doc": stats["forward_tokens"] / len(docs),
        },
        "speedup": ours_rate / ref_rate,
        "compute_bound": {
            "matmul_flops_per_s": rate,
            "fp32_matmul_flops_per_s": rate32,
            "flops_per_doc": flops / len(docs),
            "fraction": (flops / ours_s) / rate,
            "reference_over_ours_flops": (ref_flops / len(ref_docs)) / (flops / len(docs)),
        },
        "examples": [
            {"doc_id": o["doc_id"], "reference": q, "ours_fp32": o32["query"], "ours": o["query"]} for q, o32, o in zip(ref, ours32, ours)
        ],
    }
    print(f"reference: {ref_rate:.3f} docs/s ({len(ref_docs)} docs in {ref_s:.1f} s)")
    print(
        f"ours fp32: {len(docs) / ours32_s:.3f} docs/s ({len(docs) / ours32_s / ref_rate:.1f}x); "
        f"identical queries to reference: {same32:.0%} (of {len(ref_docs)})"
    )
    print(
        f"ours {auto.dtype}: {ours_rate:.3f} docs/s ({len(docs)} docs in {ours_s:.1f} s); "
        f"identical to reference: {same_auto:.0%} (of {len(ref_docs)})"
    )
    print(f"speed-up: {result['speedup']:.1f}x")
    print(
        f"compute: {flops / len(docs) / 1e9:.1f} GFLOP/doc, matmul rate {rate / 1e9:.0f} GFLOP/s, "
        f"fraction of bound reached {result['compute_bound']['fraction']:.0%}"
    )
    print(
        f"reference: {ref_flops / len(ref_docs) / 1e9:.1f} GFLOP/doc ({result['compute_bound']['reference_over_ours_flops']:.1f}x ours), "
        f"fp32 matmul rate {rate32 / 1e9:.0f} GFLOP/s, fraction reached {result['reference']['fraction_of_fp32_bound']:.0%}"
    )
    if args.out:
        write_results(result, args.out)
    return result


if __name__ == "__main__":
    main()
