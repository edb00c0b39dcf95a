"""Publishing a synthetic dataset: the query files, the training triples, a manifest and a dataset card.

Files written under ``destination`` (a local folder or ``gs://bucket/prefix``):

* ``<dataset>_synthetic_queries_<N>.jsonl`` — the N filtered queries, one per line;
* the released InPars-v2 layout (``huggingface.co/datasets/inpars/generated-data``: one folder per
  dataset), so scripts written for the released data read ours unchanged:

  - ``<dataset>/queries.jsonl`` — every generated query (when the generated rows are given),
  - ``<dataset>/queries_filtered_v2.jsonl`` — the filtered queries (same bytes as the file above),
  - ``<dataset>/triples_train_v2.tsv`` — ``query<TAB>positive<TAB>negative`` texts (when given), the
    CSV dialect the toolkit's ``load_dataset("csv", sep="\\t", ...)`` reads back exactly;

* ``README.md`` — the dataset card: model, prompt, seed, filter, counts, query-length and score
  statistics, licence note;
* ``manifest.json`` — size and sha256 of every other file, row counts, statistics, and the run's
  identity (run id, code, packages, model, prompt, seed, config).

Query rows carry the published InPars field names first (``query``, ``doc_id``, ``doc_text``,
``log_probs``, ``prompt_text``, ``fewshot_examples``), then the rest of each row's fields. Model,
prompt and seed come from the run's manifest; outside a run (``inpars publish``) from the rows
themselves (every generated row names them).

Every byte is a function of the inputs (no timestamps), so a rerun produces the same files. Each file
is created only if absent: identical existing files are skipped, a different existing file is an
error (never overwritten), checked for every file before any is written. ``manifest.json`` goes last:
its presence means the publication is complete.

Inputs are consumed as streams (rows one at a time, triples from a file) and spooled to a temporary
folder; only the upload itself holds one file's bytes at a time (the storage interface takes bytes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InParsError
from .files import file_entry, file_sha256
from .storage import join_key, open_storage, sha256_hex

log = logging.getLogger(__name__)

PUBLISHED_FIELDS = ("query", "doc_id", "doc_text", "log_probs", "prompt_text", "fewshot_examples")
# What the published manifest copies from the run manifest (not its later sections: usage etc.).
RUN_KEYS = ("run_id", "created_at", "code", "packages", "model", "prompt", "seed", "config")
# The released InPars-v2 file names, inside a folder named for the dataset.
GENERATED_FILE = "queries.jsonl"
FILTERED_FILE = "queries_filtered_v2.jsonl"
TRIPLES_FILE = "triples_train_v2.tsv"
# Row fields that say how a query was made; outside a run the card reads them from the rows.
ROW_FACTS = ("model", "prompt", "seed")


def order_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The published InPars fields first (those present), then the others in their original order."""
    out = {k: row[k] for k in PUBLISHED_FIELDS if k in row}
    out.update((k, v) for k, v in row.items() if k not in out)
    return out


def jsonl_line(row: Mapping[str, Any]) -> str:
    """One published JSONL line: deterministic (same row -> same bytes)."""
    return json.dumps(order_fields(row), ensure_ascii=False) + "\n"


def dataset_jsonl(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """The published JSONL: deterministic (same rows -> same bytes)."""
    return "".join(jsonl_line(r) for r in rows).encode("utf-8")


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


class _Tally:
    """What the card and the manifest say about a stream of query rows, gathered in one pass."""

    def __init__(self) -> None:
        self.rows = 0
        self.lengths: list[int] = []
        self.scores: list[float] = []
        self.doc_ids: set[str] = set()
        self.fields: list[str] = []
        self.facts: dict[str, Counter] = {k: Counter() for k in ROW_FACTS}

    def add(self, row: Mapping[str, Any]) -> None:
        if not self.rows:
            self.fields = list(order_fields(row))
        self.rows += 1
        self.lengths.append(len(str(row.get("query", "")).split()))
        self.doc_ids.add(str(row.get("doc_id")))
        if isinstance(row.get("score"), (int, float)):
            self.scores.append(float(row["score"]))
        for key in ROW_FACTS:
            value = row.get(key)
            if value is not None and not isinstance(value, (dict, list)):
                self.facts[key][value] += 1

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "queries": self.rows,
            "documents": len(self.doc_ids),
            "query_tokens": {
                "min": min(self.lengths),
                "median": statistics.median(self.lengths),
                "mean": round(statistics.fmean(self.lengths), 3),
                "max": max(self.lengths),
            },
        }
        if self.scores:
            stats["score"] = _quantiles(self.scores)
            stats["filter_threshold"] = min(self.scores)  # the lowest kept score
        return stats

    def fact(self, key: str) -> Any:
        """The one value the rows give for ``key``, a sorted list if they disagree, None if none does."""
        values = sorted(self.facts[key], key=str)
        if not values:
            return None
        return values[0] if len(values) == 1 else values


def dataset_statistics(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Query counts, query length (whitespace tokens) and score distributions."""
    tally = _Tally()
    for row in rows:
        tally.add(row)
    return tally.statistics()


def _spool_rows(rows: Iterable[Mapping[str, Any]], path: Path, what: str) -> _Tally:
    """Write ``rows`` as published JSONL to ``path`` one at a time; their tally. A row without a query
    or a doc_id is an error naming its position."""
    tally, bad = _Tally(), []
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, row in enumerate(rows):
            query = row.get("query")
            # A generated query may be empty (the model wrote nothing: the filter dropped it); a kept one not.
            if query is None or (not query and what == "filtered") or row.get("doc_id") is None:
                bad.append(i)
                continue
            f.write(jsonl_line(row))
            tally.add(row)
    if bad:
        raise InParsError(f"{what} rows {bad[:10]} have no query or doc_id: not publishable")
    return tally


def _count_triples(path: Path) -> int:
    from .negatives import iter_triples_tsv

    return sum(1 for _ in iter_triples_tsv(path))


def _score_kind(filter_stats: Mapping | None) -> str:
    if filter_stats and filter_stats.get("strategy") and filter_stats.get("strategy") != "scores":
        return f"filter strategy `{filter_stats['strategy']}`"
    agg = (filter_stats or {}).get("aggregate", "mean")
    return f"{agg} of the query's token log-probabilities"


def _shown(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value) + " (mixed)"
    return f"`{value}`"


def generation_facts(manifest: Mapping[str, Any], tally: _Tally) -> dict[str, Any]:
    """Model, prompt and seed: the run's manifest first, else what the rows say (None: unknown)."""
    gen = (manifest.get("config") or {}).get("generate") or {}
    model = (manifest.get("model") or {}).get("generate") or gen.get("model") or tally.fact("model")
    prompt = (manifest.get("prompt") or {}).get("name") or gen.get("prompt") or tally.fact("prompt")
    seed = manifest.get("seed", gen.get("seed"))
    return {"model": model, "prompt": prompt, "seed": tally.fact("seed") if seed is None else seed}


def _card(
    dataset: str,
    files: Mapping[str, Mapping[str, Any]],
    filtered: _Tally,
    generated: _Tally | None,
    manifest: Mapping,
    facts: Mapping[str, Any],
    filter_stats: Mapping | None,
) -> str:
    config = manifest.get("config", {})
    gen = config.get("generate", {})
    code = manifest.get("code", {})
    stats = filtered.statistics()
    qt = stats["query_tokens"]
    descriptions = {
        f"{dataset}/{GENERATED_FILE}": "every generated query (JSONL)",
        f"{dataset}/{FILTERED_FILE}": "the filtered queries (JSONL, same content as the file above)",
        f"{dataset}/{TRIPLES_FILE}": "training triples `query<TAB>positive<TAB>negative` (CSV-quoted TSV, no header)",
    }
    lines = [
        f"# {dataset}: InPars synthetic queries",
        "",
        f"{stats['queries']} synthetic queries for {stats['documents']} documents of `{dataset}` "
        + (f"(corpus `{corpus}`), " if (corpus := config.get("data", {}).get("corpus")) else "")
        + "generated with the InPars method: "
        "a language model writes a query for each document from a few-shot prompt, then the queries are filtered.",
        "",
        "## Files",
        "",
        "| file | content | rows |",
        "|---|---|---:|",
        *(f"| `{name}` | {descriptions.get(name, 'the filtered queries (JSONL)')} | {info['rows']} |" for name, info in files.items()),
        "",
        f"`{dataset}/` follows the layout of the released InPars-v2 data. Query fields: "
        + ", ".join(f"`{k}`" for k in filtered.fields)
        + ".",
        "",
        "```python",
        "from datasets import load_dataset",
        f'queries = load_dataset("json", data_files="{dataset}/{FILTERED_FILE}")["train"]',
    ]
    if f"{dataset}/{TRIPLES_FILE}" in files:
        lines.append(
            f'triples = load_dataset("csv", data_files="{dataset}/{TRIPLES_FILE}", sep="\\t", names=("query", "positive", "negative"))["train"]'
        )
    lines += [
        "```",
        "",
        "## Generation",
        "",
        f"- model: {_shown(facts['model'])}" + (f" (backend `{gen['backend']}`)" if gen.get("backend") else ""),
        f"- prompt: {_shown(facts['prompt'])}" + (f", few-shot file `{gen['fewshot_file']}`" if gen.get("fewshot_file") else ""),
        f"- seed: {_shown(facts['seed'])}"
        + (f"; temperature {gen.get('temperature')}, max {gen.get('max_new_tokens')} new tokens" if gen else ""),
    ]
    if code or manifest.get("run_id"):
        lines.append(
            f"- code: inpars {code.get('inpars', '?')}"
            + (f" (git {code['git_commit'][:12]})" if code.get("git_commit") else "")
            + (f"; run `{manifest['run_id']}`" if manifest.get("run_id") else "")
        )
    lines += [
        "",
        "## Counts",
        "",
        f"- generated queries: {generated.rows if generated else (filter_stats or {}).get('n_in', 'not published')}",
        f"- kept by the filter: {stats['queries']}",
    ]
    if f"{dataset}/{TRIPLES_FILE}" in files:
        lines.append(f"- training triples: {files[f'{dataset}/{TRIPLES_FILE}']['rows']}")
    lines += [
        "",
        "## Statistics",
        "",
        f"Query length (whitespace tokens): min {qt['min']}, median {qt['median']}, mean {qt['mean']}, max {qt['max']}.",
        "",
        "```",
        *_histogram(filtered.lengths),
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
    settings = config.get("filter") or {}
    if filter_stats or settings:
        lines += ["## Filtering", ""]
        for key, value in {**settings, **(filter_stats or {})}.items():
            if isinstance(value, (str, int, float, bool)) or value is None:
                lines.append(f"- {key}: {value}")
        dropped = (filter_stats or {}).get("dropped_by_reason") or (filter_stats or {}).get("dropped")
        if isinstance(dropped, Mapping) and dropped:
            lines += ["", "| drop reason | queries |", "|---|---:|", *(f"| {k} | {v} |" for k, v in sorted(dropped.items())), ""]
        lines.append("")
    lines += [
        "## Licence",
        "",
        "`doc_text`, `prompt_text` and the triples copy text from the source corpus (and the few-shot examples): "
        "the corpus's licence applies to them; see the source dataset. The generated queries are model output: "
        f"check the licence of {_shown(facts['model'])} for terms on its outputs. Synthetic queries are not human "
        "judgements: they are training data, not an evaluation set.",
        "",
        "See `manifest.json` for sizes, sha256 checksums and the full generation config.",
        "",
    ]
    return "\n".join(lines)


def publish_dataset(
    rows: Iterable[Mapping[str, Any]],
    destination: str,
    *,
    dataset: str,
    manifest: Mapping[str, Any],
    filter_stats: Mapping[str, Any] | None = None,
    generated: Iterable[Mapping[str, Any]] | None = None,
    triples_tsv: str | os.PathLike | None = None,
    on_file: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Publish a dataset to ``destination`` (see the module doc); returns the published manifest.

    Args:
        rows: the filtered queries (any iterable, read once).
        destination: a local folder or ``gs://bucket/prefix``.
        dataset: the dataset's name (file names and the InPars-v2 folder).
        manifest: the run's manifest (config, code, model, prompt, seed); ``{}`` outside a run, where
            model, prompt and seed are read from the rows.
        filter_stats: the filter's summary (``strategy``, ``n_in``, ``n_kept``, ``dropped_by_reason``...).
        generated: every generated query (read once), published as ``<dataset>/queries.jsonl``.
        triples_tsv: a local triples file as :func:`inpars.negatives.write_triples_tsv` writes it,
            published as ``<dataset>/triples_train_v2.tsv`` (copied byte for byte).
        on_file: called ``(name, "created" | "skipped")`` for each file, in writing order.

    Files are created only if absent: identical files already there are skipped, a different file
    raises :class:`InParsError` before anything is written. The returned dict is exactly the stored
    ``manifest.json`` (deterministic).
    """
    with tempfile.TemporaryDirectory(prefix="inpars-publish-") as tmp:
        spool = Path(tmp)
        filtered = _spool_rows(rows, spool / "filtered.jsonl", "filtered")
        if not filtered.rows:
            raise InParsError("nothing to publish: no rows")
        local: dict[str, Path] = {}  # published name -> local file, in writing order
        local[f"{dataset}_synthetic_queries_{filtered.rows}.jsonl"] = spool / "filtered.jsonl"
        files: dict[str, dict[str, Any]] = {}
        generated_tally = None
        if generated is not None:
            generated_tally = _spool_rows(generated, spool / "generated.jsonl", "generated")
            local[join_key(dataset, GENERATED_FILE)] = spool / "generated.jsonl"
        local[join_key(dataset, FILTERED_FILE)] = spool / "filtered.jsonl"
        if triples_tsv is not None:
            shutil.copyfile(triples_tsv, spool / "triples.tsv")
            local[join_key(dataset, TRIPLES_FILE)] = spool / "triples.tsv"
        for name, path in local.items():
            count = (
                _count_triples(path)
                if name.endswith(TRIPLES_FILE)
                else generated_tally.rows
                if generated_tally and name.endswith(GENERATED_FILE)
                else filtered.rows
            )
            files[name] = {"rows": count, **file_entry(path)}

        facts = generation_facts(manifest, generated_tally or filtered)
        card = _card(dataset, files, filtered, generated_tally, manifest, facts, filter_stats).encode("utf-8")
        (spool / "README.md").write_bytes(card)
        local["README.md"] = spool / "README.md"
        files["README.md"] = file_entry(spool / "README.md")

        published = {
            "dataset": dataset,
            "rows": filtered.rows,
            "files": files,
            "statistics": filtered.statistics(),
            "counts": {
                "generated": generated_tally.rows if generated_tally else (filter_stats or {}).get("n_in"),
                "filtered": filtered.rows,
                "triples": files[join_key(dataset, TRIPLES_FILE)]["rows"] if triples_tsv is not None else None,
            },
            "filter": dict(filter_stats) if filter_stats else None,
            **{k: manifest[k] for k in RUN_KEYS if k in manifest},
        }
        # Outside a run the rows say what made them (the same shapes as a run manifest's sections).
        published.setdefault("model", {"generate": facts["model"]})
        published.setdefault("prompt", {"name": facts["prompt"]})
        published.setdefault("seed", facts["seed"])
        man = (json.dumps(published, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        (spool / "manifest.json").write_bytes(man)
        local["manifest.json"] = spool / "manifest.json"
        _upload(open_storage(destination), local, on_file)
    return json.loads(man)


def _upload(storage, local: Mapping[str, Path], on_file: Callable[[str, str], None] | None) -> None:
    """Create each file unless an identical one is there; refuse (before writing anything) if a different one is."""
    wanted = {name: file_sha256(path) for name, path in local.items()}
    present = set(storage.list(""))
    for name, digest in wanted.items():
        if name in present and sha256_hex(storage.read_bytes(name)) != digest:
            raise InParsError(
                f"{storage.uri(name)} already exists with different content: not overwriting a published file "
                "(publish to another destination or delete it first)"
            )
    for name, path in local.items():
        if storage.create_if_absent(name, path.read_bytes()):
            status = "created"
        elif sha256_hex(storage.read_bytes(name)) == wanted[name]:
            status = "skipped"
        else:  # someone wrote a different file since the check
            raise InParsError(f"{storage.uri(name)} already exists with different content: not overwriting a published file")
        log.info("%s %s", status, storage.uri(name))
        if on_file:
            on_file(name, status)
