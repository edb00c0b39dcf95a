"""Where a run's data comes from: the embedded sample, a local path, ``gs://``, or ir_datasets.

Every source ends up as local files in BEIR layout (``corpus.jsonl``, ``queries.jsonl``,
``qrels/test.tsv``), which :mod:`inpars.corpus` reads; remote ones are fetched into a cache first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .config import PipelineConfig
from .errors import ConfigError
from .files import atomic_write

BUILTIN_DATA = Path(__file__).parent / "data"


@dataclass
class Dataset:
    """Local paths of a run's inputs."""

    corpus: Path
    queries: Path | None
    qrels: Path | None
    fewshot: Path | None


def fetch(uri: str) -> Path:
    """A local path for ``uri`` (a gs:// file or folder is downloaded into the cache)."""
    from .storage import fetch_local

    return Path(fetch_local(uri))


def source_exists(source: str) -> str | None:
    """Why ``source`` (a corpus, queries or few-shot file) cannot be read, or None when it can.
    Cheap: nothing is downloaded (a gs:// object or folder is only looked up)."""
    try:
        if source.startswith("builtin:"):
            builtin_folder(source.split(":", 1)[1])
        elif source.startswith("irds:"):
            try:
                import ir_datasets
            except ImportError:
                return "needs `pip install 'inpars[irds]'` (ir_datasets)"
            try:
                ir_datasets.load(source.split(":", 1)[1])  # looks the id up; downloads nothing yet
            except KeyError:
                return "ir_datasets knows no such dataset"
        elif source.startswith("gs://"):
            from .storage import open_storage

            parent, _, name = source.rstrip("/").rpartition("/")
            if not (name and open_storage(parent).exists(name)) and not open_storage(source).list(""):
                return "no such object or folder"
        elif not Path(source).exists():
            return "no such file or folder"
    except ConfigError as e:
        return str(e)
    return None


def local_corpus_file(source: str) -> Path | None:
    """The corpus file of a packaged (``builtin:``) or local source, without fetching anything; None
    for a remote source (``gs://``, ``irds:``)."""
    from .corpus import resolve_corpus_file

    if source.startswith(("gs://", "irds:")):
        return None
    return resolve_corpus_file(builtin_folder(source.split(":", 1)[1]) if source.startswith("builtin:") else source)


def corpus_source_bytes(source: str) -> int | None:
    """The size of a corpus source without downloading it (None: unknown, e.g. an ir_datasets id)."""
    from .errors import InParsError

    try:
        if source.startswith("gs://"):
            from .storage import open_storage

            sizes = open_storage(source.rstrip("/")).sizes("")
            if not sizes:  # a single object: its folder lists it
                parent, _, name = source.rpartition("/")
                return open_storage(parent).sizes(name).get(name)
            return sizes.get("corpus.jsonl") or sizes.get("corpus.tsv") or sizes.get("corpus.csv") or sum(sizes.values())
        file = local_corpus_file(source)
        return None if file is None else file.stat().st_size
    except (InParsError, OSError):
        return None


def builtin_folder(name: str) -> Path:
    folder = BUILTIN_DATA / name
    if not folder.is_dir():
        known = sorted(p.name for p in BUILTIN_DATA.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise ConfigError(f"unknown builtin corpus {name!r}; known: {known}")
    return folder


def irds_folder(dataset_id: str) -> Path:
    """Export an ir_datasets dataset (e.g. ``beir/scifact/test``) to a cached BEIR folder.

    ir_datasets downloads the data itself on first use: an explicit choice of the user, never the default.
    """
    try:
        import ir_datasets
    except ImportError:
        raise ConfigError(f"corpus 'irds:{dataset_id}' needs `pip install ir_datasets`, or give a BEIR folder") from None
    from .storage import cache_root

    out = Path(cache_root()) / "irds" / dataset_id.replace("/", "__")
    done = out / ".complete"
    if done.exists():
        return out
    try:
        ds = ir_datasets.load(dataset_id)
    except KeyError:
        raise ConfigError(f"ir_datasets knows no dataset {dataset_id!r}") from None
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in ds.docs_iter():
            title = getattr(doc, "title", "") or ""
            text = getattr(doc, "text", None) or getattr(doc, "body", "") or ""
            f.write(json.dumps({"_id": doc.doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
    if ds.has_queries():
        with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
            for q in ds.queries_iter():
                f.write(json.dumps({"_id": q.query_id, "text": q.text}, ensure_ascii=False) + "\n")
    if ds.has_qrels():
        with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qr in ds.qrels_iter():
                f.write(f"{qr.query_id}\t{qr.doc_id}\t{qr.relevance}\n")
    done.touch()
    return out


def resolve_dataset(config: PipelineConfig) -> Dataset:
    """Local paths of the corpus, evaluation queries/qrels and few-shot pairs of a run's config."""
    data, gen = config.data, config.generate
    source = data.corpus
    if source.startswith("builtin:"):
        corpus = builtin_folder(source.split(":", 1)[1])
    elif source.startswith("irds:"):
        corpus = irds_folder(source.split(":", 1)[1])
    else:
        corpus = fetch(source)
    folder = corpus if corpus.is_dir() else None

    def beside(rel: str) -> Path | None:
        return folder / rel if folder and (folder / rel).exists() else None

    fewshot = fetch(gen.fewshot_file) if gen.fewshot_file else None
    if fewshot is None and gen.prompt.startswith("promptagator") and folder:
        # A pool shipped beside the corpus (the sample has one), else one built from the folder's
        # train (or dev) judgements: never from the test split, which is evaluated.
        fewshot = beside("fewshot.jsonl") or fewshot_from_split(folder)
    return Dataset(
        corpus=corpus,
        queries=fetch(data.queries) if data.queries else beside("queries.jsonl"),
        qrels=fetch(data.qrels) if data.qrels else beside("qrels/test.tsv"),
        fewshot=fewshot,
    )


def fewshot_from_split(folder: Path, splits: tuple[str, ...] = ("train", "dev")) -> Path | None:
    """A (query, document) pool from a BEIR folder's train or dev qrels, cached; None if it has neither."""
    from .corpus import iter_corpus, read_qrels, read_queries
    from .storage import cache_root

    split = next((s for s in splits if (folder / "qrels" / f"{s}.tsv").exists()), None)
    if split is None or not (folder / "queries.jsonl").exists():
        return None
    qrels_path = folder / "qrels" / f"{split}.tsv"
    key = f"{folder.resolve()}:{split}:{qrels_path.stat().st_size}:{qrels_path.stat().st_mtime_ns}"
    out = Path(cache_root()) / "fewshot" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.jsonl"
    if out.exists():
        return out
    qrels, queries = read_qrels(qrels_path), read_queries(folder / "queries.jsonl")
    wanted = {
        qid: min(d for d, rel in judged.items() if rel > 0)
        for qid, judged in qrels.items()
        if qid in queries and any(rel > 0 for rel in judged.values())
    }
    docs = {d.doc_id: d for d in iter_corpus(folder) if d.doc_id in set(wanted.values())}
    rows = [
        {"query_id": q, "query": queries[q], "doc_id": d, "title": docs[d].title, "text": docs[d].text}
        for q, d in sorted(wanted.items())
        if d in docs
    ]
    if not rows:
        return None
    with atomic_write(out) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return out
