"""The document store: a corpus on disk that a worker reads by id and by row range without loading it.

``prepare`` writes it once per corpus (:func:`write_store`); every later worker opens it
(:meth:`DocumentStore.open`) and pays only for the documents it touches. A store is a folder::

    documents.arrow   Apache Arrow IPC file, uncompressed: columns doc_id, title, text in corpus
                      file order, record batches of up to BATCH_ROWS rows (fewer when they are long)
    ids.hash.npy      uint64: a 64-bit BLAKE2b hash of every document id, sorted
    ids.row.npy       int64: the row of the document behind each entry of ids.hash.npy
    store.json        written last (a folder without it is not a store): counts, per-file bytes and
                      sha256, per-column character and token counts

Reading maps the files into memory (:class:`MappedFile`, read-only ``mmap``): opening costs
the same at 5 thousand or 15 million documents, row ``i`` is found by arithmetic on the batch
lengths, and id ``x`` by a binary search over the sorted hashes whose hit is checked against the
stored id (so a hash collision can never return the wrong document). No Python object per document
or per id is ever built unless asked for. See docs/DESIGN.md ("Document store") for why Arrow IPC.

:class:`DocumentStore` is a ``Mapping[str, Document]``: code written for ``read_corpus``'s dict
(``docs[doc_id].contents``, ``doc_id in docs``, ``docs.get(...)``) works on it unchanged.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import mmap
import os
from array import array
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence, ValuesView
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .corpus import Document, iter_corpus_lines, resolve_corpus_file
from .errors import InputError
from .files import atomic_write, check_files, file_entry, file_sha256, read_json

FORMAT = "inpars-store/1"
DOCUMENTS_FILE = "documents.arrow"
INFO_FILE = "store.json"
BATCH_ROWS = 4096  # rows per record batch: small enough that one batch is a cheap unit to decode
BATCH_CHARS = 32 * 1024 * 1024  # a batch is cut early past this many characters (Arrow strings: < 2 GiB per batch)
COLUMNS = ("doc_id", "title", "text")
SCALAR_ROWS = 16  # up to this many rows are read cell by cell rather than with Arrow's take


# --------------------------------------------------------------------------- memory maps


class MappedFile:
    """A read-only memory map of a file whose pages can be handed back.

    Linux counts a process's mapped file pages in its RSS although they are clean page cache, and
    maps up to 64 KB around every page fault (fault-around): a worker that reads a few thousand
    documents spread over a store, or a few hundred BM25 columns, would show an RSS close to the size
    of the files. :meth:`release` drops this process's mappings (``madvise(MADV_DONTNEED)``); the
    pages stay in the page cache, and the next read maps them again at the cost of a minor fault.
    Readers release after every :data:`RELEASE_EVERY` reads, so RSS follows recent reads only.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def release(self) -> None:
        """Drop this process's mappings of the file's pages."""
        if hasattr(mmap, "MADV_DONTNEED") and not self.map.closed:
            self.map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Unmap the file, unless arrays over it are still referenced (then it is unmapped with the
        last of them)."""
        with contextlib.suppress(BufferError):
            self.map.close()

    def npy(self) -> np.ndarray:
        """The file as the (read-only) array of a ``.npy`` file, without copying it."""
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise InputError(f"unsupported .npy version {version}", path=str(self.path))
            offset = f.tell()
        if fortran or dtype.hasobject:
            raise InputError("expected a C-ordered numeric .npy array", path=str(self.path))
        count = int(np.prod(shape)) if shape else 1
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset).reshape(shape)


RELEASE_EVERY = 64  # rows read or ids looked up between two releases of a store's mapped pages (each read maps 64 KB or more)


# --------------------------------------------------------------------------- hashing and id lookup


def hash_strings(strings: Iterable[str]) -> np.ndarray:
    """A stable 64-bit hash (BLAKE2b, 8 bytes, little-endian) of each string, as a uint64 array.

    Stable across processes and Python versions, unlike ``hash()``, so it can be written to disk.
    """
    digests = b"".join(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest() for s in strings)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64, copy=False)


class HashIndex:
    """Find strings among ``n`` stored ones in O(log n), with no Python object per stored string.

    Holds the sorted 64-bit hashes of the strings and, for each, the string's position (row); both
    arrays are usually memory-mapped. ``value_at(positions)`` returns the stored strings at those
    positions: every hit is checked against it, so colliding hashes are resolved exactly.
    ``hash_fn`` is :func:`hash_strings` (the tests pass a colliding one).
    """

    def __init__(
        self,
        hashes: np.ndarray,
        positions: np.ndarray,
        value_at: Callable[[np.ndarray], list[str]],
        hash_fn: Callable[[Sequence[str]], np.ndarray] = hash_strings,
        maps: Sequence[MappedFile] = (),
    ):
        self.hashes, self.positions, self.value_at, self.hash_fn = hashes, positions, value_at, hash_fn
        self.maps = list(maps)  # the files the arrays are mapped from (loaded indexes)

    @staticmethod
    def sort(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted hashes, positions)`` for the hashes of strings at positions ``0..n-1``."""
        order = np.argsort(hashes, kind="stable")
        return hashes[order], order.astype(np.int64)

    @staticmethod
    def save(folder: Path, name: str, sorted_hashes: np.ndarray, positions: np.ndarray) -> list[Path]:
        paths = [folder / f"{name}.hash.npy", folder / f"{name}.row.npy"]
        for p in paths:  # a new file, never rewritten in place: a reader that has the old one mapped keeps it
            p.unlink(missing_ok=True)
        np.save(paths[0], sorted_hashes)
        np.save(paths[1], positions)
        return paths

    @classmethod
    def load(cls, folder: Path, name: str, value_at: Callable[[np.ndarray], list[str]]) -> HashIndex:
        """Open a saved index memory-mapped (:meth:`release` hands its pages back)."""
        maps = [MappedFile(folder / f"{name}.hash.npy"), MappedFile(folder / f"{name}.row.npy")]
        return cls(maps[0].npy(), maps[1].npy(), value_at, maps=maps)

    def release(self) -> None:
        for m in self.maps:
            m.release()

    def close(self) -> None:
        self.hashes = self.positions = None  # the references into the maps, dropped before unmapping
        for m in self.maps:
            m.close()

    def lookup_one(self, string: str) -> int:
        """The position of one string, or -1 (no numpy temporaries: the path of ``docs[doc_id]``)."""
        n = len(self.hashes)
        h = self.hash_fn([string])[0]
        i = int(np.searchsorted(self.hashes, h, "left"))
        while i < n and self.hashes[i] == h:
            p = int(self.positions[i])
            if self.value_at([p])[0] == string:
                return p
            i += 1
        return -1

    def lookup(self, strings: Sequence[str]) -> np.ndarray:
        """The position of each string (int64 array; -1 where it is not stored)."""
        strings = list(strings)
        out = np.full(len(strings), -1, dtype=np.int64)
        if not strings or len(self.hashes) == 0:
            return out
        h = self.hash_fn(strings)
        lo = np.searchsorted(self.hashes, h, "left")
        hi = np.searchsorted(self.hashes, h, "right")
        single = np.nonzero(hi - lo == 1)[0]
        if single.size:
            pos = np.asarray(self.positions[lo[single]])
            ok = np.fromiter((a == strings[i] for a, i in zip(self.value_at(pos), single.tolist())), dtype=bool, count=single.size)
            out[single[ok]] = pos[ok]
        for i in np.nonzero(hi - lo > 1)[0].tolist():  # a 64-bit hash shared by several strings: rare
            candidates = np.asarray(self.positions[lo[i] : hi[i]])
            for p, value in zip(candidates.tolist(), self.value_at(candidates)):
                if value == strings[i]:
                    out[i] = p
                    break
        return out


def find_duplicate(sorted_hashes: np.ndarray, positions: np.ndarray, value_at: Callable[[np.ndarray], list[str]]) -> tuple[int, int] | None:
    """The first repeated string as ``(first position, repeat position)``, or None.

    "First" is the repeat with the smallest position, as a reader going through the file would meet
    it. Equal hashes are checked against the strings, so a collision is not a duplicate.
    """
    same = np.nonzero(sorted_hashes[1:] == sorted_hashes[:-1])[0]
    if same.size == 0:
        return None
    best: tuple[int, int] | None = None
    # Runs of equal hashes: [start, stop) in the sorted order.
    starts = same[np.r_[True, same[1:] != same[:-1] + 1]]
    for start in starts.tolist():
        stop = start + 1
        while stop < len(sorted_hashes) and sorted_hashes[stop] == sorted_hashes[start]:
            stop += 1
        run = np.sort(np.asarray(positions[start:stop]))
        first_seen: dict[str, int] = {}
        for p, value in zip(run.tolist(), value_at(run)):
            if value in first_seen:
                if best is None or p < best[1]:
                    best = (first_seen[value], p)
                break
            first_seen[value] = p
    return best


# --------------------------------------------------------------------------- Arrow row access


class MappedTable:
    """Rows of an Arrow IPC file, read through a memory map: only the pages read are touched.

    Record batches are located by their row counts (read from the file's footer and batch headers
    at open, a few microseconds per batch); a row is fetched from its batch without decoding others.
    """

    def __init__(self, path: str | os.PathLike):
        import pyarrow as pa

        self.path = Path(path)
        self.file = MappedFile(path)
        reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self.file.map)))  # zero-copy over the map
        self.schema = reader.schema
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]  # zero-copy views
        self._stops = np.cumsum([b.num_rows for b in self._batches], dtype=np.int64)
        self._starts = self._stops - np.array([b.num_rows for b in self._batches], dtype=np.int64)
        self._stop_list = self._stops.tolist()  # for bisect on single rows
        self._columns: dict[tuple[int, str], object] = {}
        self.num_rows = int(self._stops[-1]) if len(self._stops) else 0

    def close(self) -> None:
        self._batches = []
        self._columns = {}
        self.schema = None  # the last references into the map: it can be closed once they are gone
        self.file.close()

    def release(self) -> None:
        """Hand back this process's mapped pages (see :class:`MappedFile`)."""
        self.file.release()

    def _check(self, rows: np.ndarray) -> None:
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = rows[(rows < 0) | (rows >= self.num_rows)][0]
            raise IndexError(f"row {int(bad)} is out of range (the table has {self.num_rows} rows)")

    def value(self, row: int, column: str):
        """One cell."""
        row = int(row)
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} is out of range (the table has {self.num_rows} rows)")
        b = bisect.bisect_right(self._stop_list, row)
        array = self._columns.get((b, column))
        if array is None:
            array = self._columns[(b, column)] = self._batches[b].column(column)
        return array[row - (self._stop_list[b - 1] if b else 0)].as_py()

    def take(self, rows: Sequence[int] | np.ndarray, columns: Sequence[str]) -> dict[str, list]:
        """``{column: [value of each row]}`` in the order of ``rows`` (repeats allowed)."""
        import pyarrow as pa

        if len(rows) <= SCALAR_ROWS:  # a few rows (a lookup by id): cell by cell is faster than a take
            rows = [int(r) for r in rows]
            return {c: [self.value(r, c) for r in rows] for c in columns}
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._check(rows)
        batch_of = np.searchsorted(self._stops, rows, "right")
        out: dict[str, list] = {c: [None] * rows.size for c in columns}
        order = np.argsort(batch_of, kind="stable")
        bounds = np.nonzero(np.diff(batch_of[order]))[0] + 1
        for group in np.split(order, bounds):
            b = int(batch_of[group[0]])
            part = self._batches[b].select(list(columns)).take(pa.array(rows[group] - self._starts[b]))
            where = group.tolist()
            for c in columns:
                column = out[c]
                for i, value in zip(where, part.column(c).to_pylist()):
                    column[i] = value
        return out

    def iter_batches(self, start: int = 0, stop: int | None = None, columns: Sequence[str] | None = None) -> Iterator[dict[str, list]]:
        """Rows ``[start, stop)`` in order, one ``{column: values}`` per (partial) record batch."""
        stop = self.num_rows if stop is None else min(int(stop), self.num_rows)
        start = max(0, int(start))
        first = int(np.searchsorted(self._stops, start, "right"))
        for b in range(first, len(self._batches)):
            b_start = int(self._starts[b])
            if b_start >= stop:
                break
            batch = self._batches[b]
            lo, hi = max(start - b_start, 0), min(stop - b_start, batch.num_rows)
            part = batch.slice(lo, hi - lo)
            values = {c: part.column(c).to_pylist() for c in (columns or self.schema.names)}
            self.release()  # a scan maps each batch once: RSS stays at one batch
            yield values


# --------------------------------------------------------------------------- writing


@dataclass
class StoreInfo:
    """What :func:`write_store` wrote (also ``store.json``): enough to size pods and pin the corpus."""

    documents: int
    bytes: int  # all store files together
    sha256: str  # of the store: sha256 over the sorted "name sha256" lines of its files
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"bytes", "sha256"}
    columns: dict[str, dict] = field(default_factory=dict)  # title/text -> {"chars", "tokens", "max_chars"}
    batch_rows: int = BATCH_ROWS
    source: str | None = None
    source_sha256: str | None = None
    format: str = FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str) -> StoreInfo:
        if data.get("format") != FORMAT:
            raise InputError(f"not a document store of format {FORMAT} (format {data.get('format')!r})", path=where)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _describe(path: str | None, line: int | None, row: int) -> str:
    if line is not None and line >= 0:
        return f"{path}:{line}" if path else f"line {line}"
    return f"document #{row + 1}" + (f" of {path}" if path else "")


def write_store(
    documents: Iterable[Document | tuple[int, Document]],
    folder: str | os.PathLike,
    *,
    source: str | None = None,
    source_sha256: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> StoreInfo:
    """Write ``documents`` (in their order) as a document store in ``folder``; returns its statistics.

    Items are :class:`Document` or ``(line number, Document)`` pairs (from
    :func:`inpars.corpus.iter_corpus_lines`): with lines, a repeated id is reported as
    ``source:first-line`` and ``source:repeat-line``. Memory: one record batch of documents plus
    24 bytes per document (hash, row, line) for the id index. On error nothing is left in ``folder``
    that looks like a store (``store.json`` is written last).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INFO_FILE).unlink(missing_ok=True)
    (folder / DOCUMENTS_FILE).unlink(missing_ok=True)  # never rewritten in place: a reader may have it mapped
    schema = pa.schema([(name, pa.string()) for name in COLUMNS])
    path = folder / DOCUMENTS_FILE
    hashes: list[np.ndarray] = []
    lines = array("q")  # the source line of each row (-1: not known), 8 bytes a row
    stats = {c: {"chars": 0, "tokens": 0, "max_chars": 0} for c in ("title", "text")}
    n = 0
    written: list[Path] = [path]
    try:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            buffer: dict[str, list[str]] = {c: [] for c in COLUMNS}
            chars = 0

            def flush() -> None:
                nonlocal chars
                if not buffer["doc_id"]:
                    return
                batch = pa.record_batch([pa.array(buffer[c], pa.string()) for c in COLUMNS], schema=schema)
                for c in ("title", "text"):
                    lengths = pc.utf8_length(batch.column(c))
                    stats[c]["chars"] += int(pc.sum(lengths).as_py() or 0)
                    stats[c]["max_chars"] = max(stats[c]["max_chars"], int(pc.max(lengths).as_py() or 0))
                    stats[c]["tokens"] += int(pc.sum(pc.count_substring_regex(batch.column(c), r"\S+")).as_py() or 0)
                writer.write_batch(batch)
                hashes.append(hash_strings(buffer["doc_id"]))
                for c in COLUMNS:
                    buffer[c] = []
                chars = 0

            for item in documents:
                line, doc = item if isinstance(item, tuple) else (-1, item)
                buffer["doc_id"].append(doc.doc_id)
                buffer["title"].append(doc.title)
                buffer["text"].append(doc.text)
                lines.append(line)
                n += 1
                chars += len(doc.title) + len(doc.text)
                if len(buffer["doc_id"]) >= batch_rows or chars >= BATCH_CHARS:
                    flush()
            flush()
        if n == 0:
            raise InputError("the corpus has no documents", path=source)

        table = MappedTable(path)
        try:

            def ids_at(rows: np.ndarray) -> list[str]:
                return table.take(rows, ["doc_id"])["doc_id"]

            all_hashes = np.concatenate(hashes)
            hashes.clear()
            sorted_hashes, positions = HashIndex.sort(all_hashes)
            del all_hashes
            duplicate = find_duplicate(sorted_hashes, positions, ids_at)
            if duplicate is not None:
                first, again = duplicate
                doc_id = table.value(again, "doc_id")
                raise InputError(
                    f"document id {doc_id!r} appears twice: {_describe(source, lines[first], first)} and "
                    f"{_describe(source, lines[again], again)}",
                    path=source,
                    line=lines[again] if lines[again] >= 0 else None,
                )
        finally:
            table.close()
        written += HashIndex.save(folder, "ids", sorted_hashes, positions)
        files = {p.name: file_entry(p) for p in written}
        info = StoreInfo(
            documents=n,
            bytes=sum(f["bytes"] for f in files.values()),
            sha256=hashlib.sha256("".join(f"{name} {files[name]['sha256']}\n" for name in sorted(files)).encode()).hexdigest(),
            files=files,
            columns=stats,
            batch_rows=batch_rows,
            source=source,
            source_sha256=source_sha256,
        )
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    with atomic_write(folder / INFO_FILE) as f:
        f.write(json.dumps(info.to_json(), indent=1) + "\n")
    return info


def write_store_from_corpus(corpus: str | os.PathLike, folder: str | os.PathLike, *, source: str | None = None) -> StoreInfo:
    """Validate a corpus (BEIR folder, JSONL, TSV, CSV) and write it as a store in ``folder``.

    Every bad line is reported with file and line (as :func:`inpars.corpus.iter_corpus`), a repeated
    id with both lines; ``source_sha256`` is the corpus file's own sha256 (to pin the run's corpus).
    ``source``: what ``store.json`` names as the source (default: the local file; a worker passes the
    run's setting, so the store's bytes do not depend on the machine's cache path).
    """
    file = resolve_corpus_file(corpus)
    return write_store(iter_corpus_lines(file), folder, source=source or str(file), source_sha256=file_sha256(file))


def store_files(folder: str | os.PathLike) -> list[Path]:
    """The files of the store in ``folder``, ``store.json`` last (e.g. to download it to local scratch)."""
    folder = Path(folder)
    info = _read_info(folder)
    return [folder / name for name in sorted(info.files)] + [folder / INFO_FILE]


def verify_store(folder: str | os.PathLike) -> StoreInfo:
    """Check every store file's size and sha256 against ``store.json``; an InputError names the file."""
    folder = Path(folder)
    info = _read_info(folder)
    problem = check_files(folder, dict(sorted(info.files.items())))
    if problem is not None:
        raise InputError(f"store file {problem} (store.json lists it; corrupted or replaced?)", path=str(folder))
    return info


def _read_info(folder: Path) -> StoreInfo:
    path = folder / INFO_FILE
    if not path.is_file():
        raise InputError(f"not a document store (no {INFO_FILE}; was it written completely?)", path=str(folder))
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"malformed {INFO_FILE} (not a JSON object)", path=str(path))
    return StoreInfo.from_json(data, str(path))


# --------------------------------------------------------------------------- reading


class DocumentStore(Mapping[str, Document]):
    """A document store opened for reading: ``Mapping[str, Document]`` plus access by row.

    Rows are the corpus file order (row ``i`` is the ``i``-th document). Lookups by id are O(log n);
    an unknown id raises ``KeyError`` naming it (``docs.get(id)`` returns None, as for a dict).
    """

    def __init__(self, folder: Path, info: StoreInfo, table: MappedTable):
        self.folder, self.info, self._table = folder, info, table
        self._ids = HashIndex.load(folder, "ids", self._table_ids)
        self._reads = 0
        if table.num_rows != info.documents or len(self._ids.hashes) != info.documents:
            raise InputError(
                f"store holds {table.num_rows} documents and {len(self._ids.hashes)} ids, store.json says {info.documents}",
                path=str(folder),
            )

    @classmethod
    def open(cls, folder: str | os.PathLike, *, verify: bool = False) -> DocumentStore:
        """Open the store in ``folder`` (memory-mapped); ``verify`` checks every file's sha256 first."""
        folder = Path(folder)
        info = verify_store(folder) if verify else _read_info(folder)
        path = folder / DOCUMENTS_FILE
        if not path.is_file():
            raise InputError("store file is missing", path=str(path))
        return cls(folder, info, MappedTable(path))

    def close(self) -> None:
        """Unmap the store's files (a closed store cannot be read)."""
        self._table.close()
        self._ids.close()

    def release(self) -> None:
        """Hand back the pages of the store's files mapped so far (see :class:`MappedFile`); reads
        do this on their own every :data:`RELEASE_EVERY` rows or lookups."""
        self._table.release()
        self._ids.release()
        self._reads = 0

    def _count(self, n: int) -> None:
        self._reads += n
        if self._reads >= RELEASE_EVERY:
            self.release()

    def _table_ids(self, rows) -> list[str]:
        return self._table.take(rows, ["doc_id"])["doc_id"]

    def __enter__(self) -> DocumentStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DocumentStore({str(self.folder)!r}, documents={len(self)})"

    # Mapping
    def __len__(self) -> int:
        return self._table.num_rows

    def __iter__(self) -> Iterator[str]:
        for batch in self._table.iter_batches(columns=["doc_id"]):
            yield from batch["doc_id"]

    def __contains__(self, doc_id: object) -> bool:
        if not isinstance(doc_id, str):
            return False
        self._count(1)
        return self._ids.lookup_one(doc_id) >= 0

    def __getitem__(self, doc_id: str) -> Document:
        return self.document(self.row_of(doc_id))

    def values(self) -> ValuesView[Document]:
        return _StoreValues(self)

    def items(self) -> ItemsView[str, Document]:
        return _StoreItems(self)

    # by id
    def row_of(self, doc_id: str) -> int:
        """The row of ``doc_id``; ``KeyError`` naming the id if the corpus has no such document."""
        row = self._ids.lookup_one(doc_id) if isinstance(doc_id, str) else -1
        self._count(1)
        if row < 0:
            raise KeyError(doc_id)
        return row

    def rows_of(self, doc_ids: Sequence[str]) -> np.ndarray:
        """The row of each id (int64 array, -1 for unknown ids): one vectorised lookup."""
        doc_ids = list(doc_ids)
        self._count(len(doc_ids))
        return self._ids.lookup(doc_ids)

    # by row
    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The ids at ``rows`` (e.g. BM25 hits), in that order."""
        ids = self._table_ids(rows)
        self._count(len(ids))
        return ids

    def ids(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The ids of rows ``[start, stop)``."""
        return [i for batch in self._table.iter_batches(start, stop, ["doc_id"]) for i in batch["doc_id"]]

    def document(self, row: int) -> Document:
        """The document at ``row`` (``IndexError`` outside ``[0, len)``)."""
        return self.take([row])[0]

    def take(self, rows: Sequence[int] | np.ndarray) -> list[Document]:
        """The documents at ``rows``, in that order."""
        cols = self._table.take(rows, COLUMNS)
        self._count(len(cols["doc_id"]))
        return [Document(*values) for values in zip(cols["doc_id"], cols["title"], cols["text"])]

    def iter_documents(self, start: int = 0, stop: int | None = None) -> Iterator[Document]:
        """Documents of rows ``[start, stop)`` in order, decoded one record batch at a time."""
        for batch in self._table.iter_batches(start, stop, COLUMNS):
            yield from (Document(*values) for values in zip(batch["doc_id"], batch["title"], batch["text"]))

    def documents(self, rows: Sequence[int] | np.ndarray) -> DocumentsView:
        """A lazy ``Sequence[Document]`` of the documents at ``rows``: read when indexed or sliced."""
        return DocumentsView(self, rows)


class DocumentsView(Sequence[Document]):
    """Documents at given rows of a store, read only when indexed or sliced (a slice reads its rows at once).

    A generate worker hands its shard of the sampled rows to ``checkpointed_map`` as this view, so
    only one checkpoint chunk of documents is in memory at a time.
    """

    def __init__(self, store: DocumentStore, rows: Sequence[int] | np.ndarray):
        self.store, self.rows = store, np.asarray(rows, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.store.take(self.rows[i])
        return self.store.document(int(self.rows[i]))

    def __iter__(self) -> Iterator[Document]:
        for start in range(0, len(self), BATCH_ROWS):
            yield from self.store.take(self.rows[start : start + BATCH_ROWS])


class _StoreValues(ValuesView):
    def __iter__(self) -> Iterator[Document]:
        return self._mapping.iter_documents()


class _StoreItems(ItemsView):
    def __iter__(self) -> Iterator[tuple[str, Document]]:
        return ((d.doc_id, d) for d in self._mapping.iter_documents())


__all__ = [
    "BATCH_ROWS",
    "DocumentStore",
    "DocumentsView",
    "HashIndex",
    "MappedFile",
    "MappedTable",
    "StoreInfo",
    "hash_strings",
    "store_files",
    "verify_store",
    "write_store",
    "write_store_from_corpus",
]
