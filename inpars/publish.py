"""Publishing a synthetic dataset: the query file, a manifest and a dataset card, uploaded once.

Three files go to ``destination`` (a local folder or ``gs://bucket/prefix``):

* ``<dataset>_synthetic_queries_<N>.jsonl`` — one row per query, the published InPars field names
  first (``query``, ``doc_id``, ``doc_text``, ``log_probs``, ``prompt_text``, ``fewshot_examples``)
  so existing data and tools interoperate, then the rest of each row's fields;
* ``README.md`` — the dataset card (statistics, filter threshold, model, prompt, licence note);
* ``manifest.json`` — row count, size and sha256 of both files, model, prompt, seed, code, config.

Every byte is a function of the rows and the run manifest (no timestamps), so a rerun produces the
same files. Each file is created only if absent: identical existing files are skipped, a different
existing file is an error (never overwritten). ``manifest.json`` goes last: its presence means the
publication is complete.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import InParsError
from .storage import open_storage, sha256_hex

log = logging.getLogger(__name__)

PUBLISHED_FIELDS = ("query", "doc_id", "doc_text", "log_probs", "prompt_text", "fewshot_examples")
# What the published manifest copies from the run manifest (not its later sections: usage etc.).
RUN_KEYS = ("run_id", "created_at", "code", "packages", "model", "prompt", "seed", "config")


def order_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The published InPars fields first (those present), then the others in their original order."""
    out = {k: row[k] for k in PUBLISHED_FIELDS if k in row}
    out.update((k, v) for k, v in row.items() if k not in out)
    return out


def dataset_jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The published JSONL: deterministic (same rows -> same bytes)."""
    return "".join(json.dumps(order_fields(r), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _quantiles(values: Sequence[float], qs=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)) -> dict[str, float]:
    s = sorted(values)
    out = {}
    for q in qs:
        pos = q * (len(s) - 1)  # linear interpolation between closest ranks
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{round(q * 100)}"] = round(s[lo] + (s[hi] - s[lo]) * (pos - lo), 6)
    return out


def _histogram(values: Sequence[int], bins: int = 8, width: int = 40) -> list[str]:
    lo, hi = min(values), max(values)
    step = max(1, math.ceil((hi - lo + 1) / bins))
    counts: dict[int, int] = {}
    for v in values:
        counts[(v - lo) // step] = counts.get((v - lo) // step, 0) + 1
    top = max(counts.values())
    lines = []
    for b in range((hi - lo) // step + 1):
        a = lo + b * step
        label = f"{a}" if step == 1 else f"{a}-{a + step - 1}"
        n = counts.get(b, 0)
        lines.append(f"{label:>9} | {'#' * max(1 if n else 0, round(width * n / top)):<{width}} {n}")
    return lines


def dataset_statistics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Query counts, query length (whitespace tokens) and score distributions."""
    lengths = [len(str(r.get("query", "")).split()) for r in rows]
    stats: dict[str, Any] = {
        "queries": len(rows),
        "documents": len({r.get("doc_id") for r in rows}),
        "query_tokens": {
            "min": min(lengths),
            "median": statistics.median(lengths),
            "mean": round(statistics.fmean(lengths), 3),
            "max": max(lengths),
        },
    }
    scores = [float(r["score"]) for r in rows if isinstance(r.get("score"), (int, float))]
    if scores:
        stats["score"] = _quantiles(scores)
        stats["filter_threshold"] = min(scores)  # the lowest kept score
    return stats


def _score_kind(filter_stats: Mapping | None) -> str:
    if filter_stats and filter_stats.get("strategy") and filter_stats.get("strategy") != "scores":
        return f"filter strategy `{filter_stats['strategy']}`"
    agg = (filter_stats or {}).get("aggregate", "mean")
    return f"{agg} of the query's token log-probabilities"


def _card(dataset: str, file_name: str, stats: dict, manifest: Mapping, filter_stats: Mapping | None, rows) -> str:
    config = manifest.get("config", {})
    gen = config.get("generate", {})
    model = (manifest.get("model") or {}).get("generate") or gen.get("model", "unknown")
    prompt = (manifest.get("prompt") or {}).get("name") or gen.get("prompt", "unknown")
    code = manifest.get("code", {})
    qt = stats["query_tokens"]
    lines = [
        f"# {dataset}: InPars synthetic queries",
        "",
        f"{stats['queries']} synthetic queries for {stats['documents']} documents of `{dataset}` "
        f"(corpus `{config.get('data', {}).get('corpus', 'unknown')}`), generated with the InPars method: "
        "a language model writes a query for each document from a few-shot prompt, then the queries are filtered.",
        "",
        f"File: `{file_name}` (JSONL, one query per line). Fields: " + ", ".join(f"`{k}`" for k in order_fields(rows[0])) + ".",
        "",
        "## Generation",
        "",
        f"- model: `{model}` (backend `{gen.get('backend', '?')}`)",
        f"- prompt: `{prompt}`" + (f", few-shot file `{gen['fewshot_file']}`" if gen.get("fewshot_file") else ""),
        f"- seed: {manifest.get('seed', gen.get('seed'))}; temperature {gen.get('temperature')}, max {gen.get('max_new_tokens')} new tokens",
        f"- code: inpars {code.get('inpars', '?')}"
        + (f" (git {code['git_commit'][:12]})" if code.get("git_commit") else "")
        + (f"; run `{manifest['run_id']}`" if manifest.get("run_id") else ""),
        "",
        "## Statistics",
        "",
        f"Query length (whitespace tokens): min {qt['min']}, median {qt['median']}, mean {qt['mean']}, max {qt['max']}.",
        "",
        "```",
        *_histogram([len(str(r.get("query", "")).split()) for r in rows]),
        "```",
        "",
    ]
    if "score" in stats:
        q = stats["score"]
        lines += [
            f"Filter score quantiles ({_score_kind(filter_stats)}):",
            "",
            "| " + " | ".join(q) + " |",
            "|" + "---|" * len(q),
            "| " + " | ".join(f"{v:.4f}" for v in q.values()) + " |",
            "",
            f"Filter threshold (lowest kept score): {stats['filter_threshold']:.4f}.",
            "",
        ]
    if filter_stats:
        lines += ["## Filtering", ""]
        dropped = filter_stats.get("dropped_by_reason") or filter_stats.get("dropped")
        for key, value in filter_stats.items():
            if isinstance(value, (str, int, float, bool)) or value is None:
                lines.append(f"- {key}: {value}")
        if isinstance(dropped, Mapping) and dropped:
            lines += ["", "| drop reason | queries |", "|---|---:|", *(f"| {k} | {v} |" for k, v in sorted(dropped.items())), ""]
        lines.append("")
    lines += [
        "## Licence",
        "",
        "`doc_text` and `prompt_text` copy text from the source corpus (and the few-shot examples): the "
        "corpus's licence applies to them; see the source dataset. The generated queries are model output: "
        f"check the licence of `{model}` for terms on its outputs. Synthetic queries are not human judgements: "
        "they are training data, not an evaluation set.",
        "",
        "See `manifest.json` for sizes, sha256 checksums and the full generation config.",
        "",
    ]
    return "\n".join(lines)


def publish_dataset(
    rows: Sequence[Mapping[str, Any]],
    destination: str,
    *,
    dataset: str,
    manifest: Mapping[str, Any],
    filter_stats: Mapping[str, Any] | None = None,
    on_file: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Publish ``rows`` (the filtered queries) to ``destination``; returns the published manifest.

    ``manifest`` is the run's manifest (config, code, model, prompt, seed); ``filter_stats`` the
    filter's summary (e.g. ``{"n_in", "n_kept", "dropped_by_reason", "threshold"}``). Files are
    created only if absent: identical files already there are skipped (``on_file(name, "skipped")``,
    else ``"created"``; both are logged), a different file raises :class:`InParsError` before anything
    is written. The returned dict is exactly the stored ``manifest.json`` (deterministic).
    """
    if not rows:
        raise InParsError("nothing to publish: no rows")
    missing = [i for i, r in enumerate(rows) if not r.get("query") or r.get("doc_id") is None]
    if missing:
        raise InParsError(f"rows {missing[:10]} have no query or doc_id: not publishable")
    storage = open_storage(destination)
    name = f"{dataset}_synthetic_queries_{len(rows)}.jsonl"
    data = dataset_jsonl(rows)
    stats = dataset_statistics(rows)
    card = _card(dataset, name, stats, manifest, filter_stats, rows).encode("utf-8")
    published = {
        "dataset": dataset,
        "rows": len(rows),
        "files": {
            name: {"rows": len(rows), "bytes": len(data), "sha256": sha256_hex(data)},
            "README.md": {"bytes": len(card), "sha256": sha256_hex(card)},
        },
        "statistics": stats,
        "filter": dict(filter_stats) if filter_stats else None,
        **{k: manifest[k] for k in RUN_KEYS if k in manifest},
    }
    man = (json.dumps(published, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    files = [(name, data), ("README.md", card), ("manifest.json", man)]
    # Check every existing file first, so a conflict leaves the destination as it was.
    present = set(storage.list(""))
    for fname, content in files:
        if fname in present and sha256_hex(storage.read_bytes(fname)) != sha256_hex(content):
            raise InParsError(
                f"{storage.uri(fname)} already exists with different content: not overwriting a published file "
                "(publish to another destination or delete it first)"
            )
    for fname, content in files:
        if storage.create_if_absent(fname, content):
            status = "created"
        elif sha256_hex(storage.read_bytes(fname)) == sha256_hex(content):
            status = "skipped"
        else:  # someone wrote a different file since the check
            raise InParsError(f"{storage.uri(fname)} already exists with different content: not overwriting a published file")
        log.info("%s %s", status, storage.uri(fname))
        if on_file:
            on_file(fname, status)
    return json.loads(man)
