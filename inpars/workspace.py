"""A run's shared state: layout, manifest, exactly-once shard commits, completion markers, checkpoints.

A run lives at ``<workspace>/runs/<run-id>/`` (a local folder or ``gs://bucket/prefix``)::

    manifest.json                                   written once (create-if-absent), never rewritten
    _manifest/<section>.json                        later additions (usage, cost...): one file per section
    <stage>/shard-00007-of-00064.<ext>              committed output (create-if-absent)
    <stage>/shard-00007-of-00064.done.json          completion marker {rows, bytes, sha256, stats, ...}
    <stage>/_checkpoints/shard-00007-of-00064/chunk-000003.jsonl   partial progress of a shard
    <stage>/<name>                                  other files (put_file) and folders (upload_dir)
    <stage>/<name>.done.json                        a folder's completion marker (file list + sha256s)
    logs/<stage>/shard-7.attempt-0.log              local executor logs (local workspaces only)

Exactly-once: an output is created only if absent, so of two workers racing on a shard one creates
it and the other finds it; identical bytes count as success, different bytes are an error (a stage's
output must be a function of its input). The marker is written after the output, also create-only;
a shard is *done* when its marker exists. A worker that died between the two leaves an output without
a marker: the shard is rerun, produces the same bytes and writes the marker.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import PipelineConfig
from .corpus import dumps_row, parse_jsonl_lines
from .errors import InParsError, InputError
from .shards import shard_name, shard_range
from .storage import Storage, cache_root, is_remote, join_key, open_storage, sha256_hex

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SECTIONS = "_manifest"
CHECKPOINTS = "_checkpoints"
RUN_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Installed versions recorded in the manifest (those present; the rest are left out).
PACKAGES = (
    "torch",
    "transformers",
    "gguf",
    "safetensors",
    "numpy",
    "bm25s",
    "PyStemmer",
    "ir-measures",
    "openai",
    "google-cloud-storage",
    "kubernetes",
    "vllm",
    "pyserini",
    "llama-cpp-python",
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _plain(obj: Any) -> Any:
    """JSON round trip (tuples -> lists) so a config compares equal to what was stored."""
    return json.loads(json.dumps(obj))


def _count_lines(data: bytes) -> int:
    return sum(1 for line in data.splitlines() if line.strip())


LINE_FORMATS = ("jsonl", "tsv", "trec", "txt", "csv")


def _rows(rows: int | None, stats: dict | None, ext: str, data: bytes) -> int | None:
    """A marker's row count: given, else ``stats["rows"]``, else the lines of a line-based format."""
    if rows is not None:
        return rows
    if stats and isinstance(stats.get("rows"), int):
        return stats["rows"]
    return _count_lines(data) if ext.lstrip(".") in LINE_FORMATS else None


# ----------------------------------------------------------------------------- run ids, manifest


def new_run_id(dataset: str, now: _dt.datetime | None = None) -> str:
    """``scifact-20261126-1530-ab12``: readable, sortable, unique, a DNS-1123 label (k8s Job names)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-")[:24].strip("-") or "run"
    return f"{slug}-{now:%Y%m%d-%H%M}-{os.urandom(2).hex()}"


def check_run_id(run_id: str) -> str:
    if len(run_id) > 63 or not RUN_ID_RE.match(run_id):
        raise InParsError(
            f"run id {run_id!r} must be lowercase letters, digits and '-', start and end with a letter "
            "or digit, at most 63 characters (it names Kubernetes Jobs)"
        )
    return run_id


def code_version() -> dict[str, Any]:
    """The package version and, when running from a git checkout (or an image that baked
    ``INPARS_GIT_COMMIT`` in), the commit and whether the tree had local changes."""
    info: dict[str, Any] = {"inpars": __version__, "python": platform.python_version()}
    commit = os.environ.get("INPARS_GIT_COMMIT")
    if not commit:
        repo = Path(__file__).resolve().parent.parent
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            info["git_dirty"] = bool(dirty)
        except (OSError, subprocess.SubprocessError):
            commit = None
    if commit:
        info["git_commit"] = commit
    return info


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _identity(config: PipelineConfig) -> dict[str, Any]:
    """Model and prompt identity, without touching model files (a manifest must be cheap to write)."""
    prompt: dict[str, Any] = {"name": config.generate.prompt, "fewshot_file": config.generate.fewshot_file}
    for key, ref in (("sha256", config.generate.prompt), ("fewshot_sha256", config.generate.fewshot_file)):
        if ref and not is_remote(ref) and Path(ref).is_file():
            prompt[key] = sha256_hex(Path(ref).read_bytes())
    return {
        "model": {"generate": config.generate.model, "generate_backend": config.generate.backend, "train": config.train.model},
        "prompt": prompt,
        "seed": config.generate.seed,
    }


_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.I)  # OPENAI_API_KEY, HF_TOKEN, ...


def _check_no_secrets(payload: bytes, config: PipelineConfig) -> None:
    """Refuse to write any secret-looking environment value (API keys, tokens) into shared state.

    The config holds only the *name* of the API key variable; this catches a key pasted where a
    name or URL belongs.
    """
    text = payload.decode("utf-8", "replace")
    names = {config.generate.api_key_env} | {k for k in os.environ if _SECRET_NAME.search(k)}
    for name in sorted(names):
        value = os.environ.get(name, "")
        if len(value) >= 8 and value in text:
            raise InParsError(f"refusing to write the value of ${name} (a secret) into the run manifest")


# ----------------------------------------------------------------------------- the run


class Run:
    """One pipeline run in a workspace: ``Run.create(...)`` once, ``Run.open(uri)`` in every worker."""

    def __init__(self, uri: str, manifest: dict[str, Any], storage: Storage | None = None):
        self.uri = str(uri).rstrip("/")
        self.storage = storage or open_storage(self.uri)
        self._manifest = manifest
        self.run_id: str = manifest["run_id"]
        self.config = PipelineConfig.from_dict(manifest["config"])

    def __repr__(self) -> str:
        return f"Run({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return not is_remote(self.uri)

    # -------------------------------------------------------------- create / open / manifest

    @classmethod
    def create(cls, workspace_uri: str, config: PipelineConfig, run_id: str | None = None) -> Run:
        """Create ``<workspace>/runs/<run_id>`` with its manifest, or reuse it when the config is the same.

        Raises :class:`InParsError` when ``run_id`` exists with a different config.
        """
        run_id = check_run_id(run_id or new_run_id(config.data.name))
        uri = (
            join_key(str(workspace_uri).rstrip("/"), "runs", run_id)
            if is_remote(workspace_uri)
            else str(Path(str(workspace_uri).removeprefix("file://")).expanduser().absolute() / "runs" / run_id)
        )
        storage = open_storage(uri)
        config_dict = _plain(config.to_dict())
        manifest = {
            "run_id": run_id,
            "created_at": _now(),
            "config": config_dict,
            "code": code_version(),
            "packages": package_versions(),
            **_identity(config),
        }
        payload = _dumps(manifest)
        _check_no_secrets(payload, config)
        if storage.create_if_absent(MANIFEST, payload):
            return cls(uri, manifest, storage)
        existing = cls.open(uri)
        if existing._manifest["config"] != config_dict:
            diff = _diff(existing._manifest["config"], config_dict)
            raise InParsError(
                f"run {run_id} already exists at {uri} with a different config ({', '.join(diff[:8])}"
                f"{' ...' if len(diff) > 8 else ''}); pick another run id or reuse its config"
            )
        return existing

    @classmethod
    def open(cls, run_uri: str) -> Run:
        storage = open_storage(run_uri)
        try:
            manifest = json.loads(storage.read_bytes(MANIFEST))
        except FileNotFoundError:
            raise InParsError(f"no run at {run_uri} ({MANIFEST} is missing)") from None
        except json.JSONDecodeError as e:
            raise InputError(f"corrupt manifest ({e.msg})", path=storage.uri(MANIFEST)) from None
        return cls(storage.uri(), manifest, storage)

    @property
    def manifest(self) -> dict[str, Any]:
        """manifest.json plus every section added by :meth:`update_manifest` (read fresh each time)."""
        merged = dict(self._manifest)
        for key in self.storage.list(SECTIONS + "/"):
            name = key[len(SECTIONS) + 1 :].removesuffix(".json")
            merged[name] = json.loads(self.storage.read_bytes(key))
        return merged

    def update_manifest(self, section: str, data: dict[str, Any]) -> None:
        """Record a later addition (usage, cost, metrics summary) as ``_manifest/<section>.json``.

        manifest.json itself is never rewritten (it was created exactly once); each section is its
        own file, so two stages never lose each other's updates; within one section the last writer
        wins. Core keys (config, run_id, ...) cannot be replaced.
        """
        if section in self._manifest or not re.match(r"^[A-Za-z0-9_.-]+$", section):
            raise InParsError(f"cannot update manifest section {section!r}")
        payload = _dumps(data)
        _check_no_secrets(payload, self.config)
        self.storage.write_bytes(f"{SECTIONS}/{section}.json", payload)

    # -------------------------------------------------------------- shards

    @staticmethod
    def shard_key(stage: str, index: int, count: int, ext: str = "jsonl") -> str:
        shard_range(0, index, count)  # validates index/count
        return f"{stage}/{shard_name(index, count, ext)}"

    @staticmethod
    def marker_key(stage: str, index: int, count: int) -> str:
        return f"{stage}/{shard_name(index, count, 'done.json')}"

    def commit_shard(
        self,
        stage: str,
        index: int,
        count: int,
        data: bytes,
        *,
        ext: str = "jsonl",
        stats: dict[str, Any] | None = None,
        rows: int | None = None,
    ) -> bool:
        """Commit a shard's output exactly once, then its marker.

        Returns True when this call created the output, False when identical bytes were already
        committed (by an earlier attempt or a racing worker). Different bytes already committed
        raise :class:`InParsError`. The marker's ``rows``: ``rows`` if given, else ``stats["rows"]``, else the
        number of non-empty lines for line formats (jsonl, tsv, trec, txt, csv), else null.
        """
        key = self.shard_key(stage, index, count, ext)
        digest = sha256_hex(data)
        created = self.storage.create_if_absent(key, data)
        if not created:
            existing = sha256_hex(self.storage.read_bytes(key))
            if existing != digest:
                raise InParsError(
                    f"{stage} shard {index} of {count} is already committed at {self.storage.uri(key)} with "
                    f"different content (sha256 {existing[:12]}, this worker made {digest[:12]}): a stage's "
                    "output must be deterministic; delete the shard and its .done.json to redo it"
                )
        marker = {
            "stage": stage,
            "shard": index,
            "count": count,
            "key": key,
            "rows": _rows(rows, stats, ext, data),
            "bytes": len(data),
            "sha256": digest,
            "stats": stats or {},
            "committed_at": _now(),
            "host": socket.gethostname(),
        }
        mkey = self.marker_key(stage, index, count)
        if not self.storage.create_if_absent(mkey, _dumps(marker)):
            old = self._marker(stage, index, count)
            if old.get("sha256") != digest:
                raise InParsError(f"{self.storage.uri(mkey)} records sha256 {old.get('sha256')} but the shard holds {digest}")
        return created

    def _marker(self, stage: str, index: int, count: int) -> dict[str, Any]:
        key = self.marker_key(stage, index, count)
        try:
            return json.loads(self.storage.read_bytes(key))
        except json.JSONDecodeError as e:
            raise InputError(f"corrupt completion marker ({e.msg})", path=self.storage.uri(key)) from None

    def shard_marker(self, stage: str, index: int, count: int) -> dict[str, Any] | None:
        """The completion marker of a shard, or None when it is not done."""
        try:
            return self._marker(stage, index, count)
        except FileNotFoundError:
            return None

    def shard_done(self, stage: str, index: int, count: int) -> bool:
        return self.storage.exists(self.marker_key(stage, index, count))

    def _done_markers(self, stage: str) -> dict[int, set[int]]:
        """{count: {done indexes}} from one listing (one request on GCS)."""
        found: dict[int, set[int]] = {}
        for key in self.storage.list(f"{stage}/shard-"):
            m = re.fullmatch(rf"{re.escape(stage)}/shard-(\d+)-of-(\d+)\.done\.json", key)
            if m:
                found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
        return found

    def missing_shards(self, stage: str, count: int) -> list[int]:
        done = self._done_markers(stage).get(count, set())
        return [i for i in range(count) if i not in done]

    def require_complete(self, stage: str, count: int, needed_by: str | None = None) -> None:
        """Raise :class:`InParsError` naming the shards of ``stage`` that are not committed."""
        markers = self._done_markers(stage)
        missing = [i for i in range(count) if i not in markers.get(count, set())]
        if not missing:
            return
        shown = ", ".join(map(str, missing[:20])) + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        msg = f"{needed_by or 'this step'} needs {stage} shards {shown} of {count}; run them first"
        others = sorted(c for c in markers if c != count)
        if others:
            msg += f" (found {stage} shards committed for a shard count of {', '.join(map(str, others))}: the config changed?)"
        raise InParsError(msg)

    def read_shard(self, stage: str, index: int, count: int, ext: str = "jsonl") -> bytes:
        """A committed shard's bytes, checked against the sha256 in its marker."""
        marker = self.shard_marker(stage, index, count)
        if marker is None:
            raise InParsError(f"{stage} shard {index} of {count} is not committed; run it first")
        key = self.shard_key(stage, index, count, ext)
        data = self.storage.read_bytes(key)
        if sha256_hex(data) != marker["sha256"]:
            raise InParsError(f"{self.storage.uri(key)} does not match the sha256 in its marker: corrupted?")
        return data

    def read_rows(self, stage: str, count: int, *, needed_by: str | None = None) -> list[dict]:
        """All rows of a JSONL stage, shards 0..count-1 in order (every shard must be committed)."""
        self.require_complete(stage, count, needed_by)
        rows: list[dict] = []
        for i in range(count):
            data = self.read_shard(stage, i, count)
            rows.extend(parse_jsonl(data, self.storage.uri(self.shard_key(stage, i, count))))
        return rows

    def stage_status(self, stage: str, count: int) -> dict[str, Any]:
        """``{stage, count, done: [...], missing: [...], rows, bytes, partial: [...]}`` from the workspace.

        ``rows``/``bytes`` sum the done shards' markers; ``partial`` lists undone shards that have
        checkpoint chunks (started, possibly running or failed: the workspace alone cannot tell).
        """
        done = sorted(self._done_markers(stage).get(count, set()))
        rows = nbytes = 0
        for i in done:
            marker = self.shard_marker(stage, i, count) or {}
            rows += int(marker.get("rows") or 0)
            nbytes += int(marker.get("bytes") or 0)
        started = set()
        for key in self.storage.list(f"{stage}/{CHECKPOINTS}/"):
            m = re.match(rf"{re.escape(stage)}/{CHECKPOINTS}/shard-(\d+)-of-{count:05d}/", key)
            if m:
                started.add(int(m.group(1)))
        missing = [i for i in range(count) if i not in set(done)]
        return {
            "stage": stage,
            "count": count,
            "done": done,
            "missing": missing,
            "partial": sorted(started & set(missing)),
            "rows": rows,
            "bytes": nbytes,
        }

    # -------------------------------------------------------------- other files and folders

    def file_key(self, stage: str, name: str) -> str:
        return join_key(stage, name)

    def file_uri(self, stage: str, name: str) -> str:
        return self.storage.uri(self.file_key(stage, name))

    def has_file(self, stage: str, name: str) -> bool:
        return self.storage.exists(self.file_key(stage, name))

    def put_file(self, stage: str, name: str, data: bytes, exclusive: bool = True) -> bool:
        """Store ``<stage>/<name>``. Exclusive (default): create-only, identical bytes already there
        return False, different bytes raise :class:`InParsError`. Not exclusive: overwrite, True."""
        key = self.file_key(stage, name)
        if not exclusive:
            self.storage.write_bytes(key, data)
            return True
        if self.storage.create_if_absent(key, data):
            return True
        if sha256_hex(self.storage.read_bytes(key)) != sha256_hex(data):
            raise InParsError(f"{self.storage.uri(key)} already exists with different content")
        return False

    def get_file(self, stage: str, name: str) -> bytes:
        try:
            return self.storage.read_bytes(self.file_key(stage, name))
        except FileNotFoundError:
            raise InParsError(f"{self.file_uri(stage, name)} is missing: run the {stage} stage first") from None

    def local_dir(self, stage: str, name: str) -> Path:
        """A local folder to write ``<stage>/<name>`` into before :meth:`upload_dir`.

        Local workspace: the folder inside the run itself (upload_dir then copies nothing).
        gs:// workspace: a scratch folder under the cache.
        """
        if self.is_local:
            path = Path(self.uri) / stage / name
        else:
            path = cache_root() / "runs" / self.run_id / stage / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def dir_done(self, stage: str, name: str) -> bool:
        return self.storage.exists(self.file_key(stage, f"{name}.done.json"))

    def upload_dir(self, stage: str, name: str, local_dir: str | os.PathLike) -> dict[str, Any]:
        """Store a folder (e.g. train's model) as ``<stage>/<name>/`` and mark it complete.

        Files are copied (overwriting; skipped when ``local_dir`` already is the workspace folder),
        then ``<stage>/<name>.done.json`` (file list with sizes and sha256s) is created; a reader
        only trusts a folder with that marker (:meth:`download_dir`). Returns the marker.
        """
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        if not files:
            raise InParsError(f"{local_dir} is empty: nothing to store as {self.file_uri(stage, name)}")
        prefix = self.file_key(stage, name)
        in_place = self.is_local and local_dir.absolute() == (Path(self.uri) / prefix).absolute()
        listing = {}
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            data = path.read_bytes()
            listing[rel] = {"bytes": len(data), "sha256": sha256_hex(data)}
            if not in_place:
                self.storage.write_bytes(join_key(prefix, rel), data)
        marker = {"stage": stage, "name": name, "files": listing, "committed_at": _now(), "host": socket.gethostname()}
        self.storage.write_bytes(self.file_key(stage, f"{name}.done.json"), _dumps(marker))
        return marker

    def download_dir(self, stage: str, name: str, local_dir: str | os.PathLike | None = None) -> Path:
        """A local folder holding the completed ``<stage>/<name>/`` (the workspace folder itself for a
        local workspace when ``local_dir`` is None; else downloaded, by default into the cache)."""
        if not self.dir_done(stage, name):
            raise InParsError(f"{self.file_uri(stage, name)} is missing or incomplete: run the {stage} stage first")
        prefix = self.file_key(stage, name)
        if local_dir is None:
            if self.is_local:
                return Path(self.uri) / prefix
            local_dir = cache_root() / "runs" / self.run_id / prefix
        return self.storage.download_dir(prefix, local_dir)

    # -------------------------------------------------------------- checkpoints

    def checkpoint(self, stage: str, index: int, count: int) -> Checkpoint:
        return Checkpoint(self.storage, f"{stage}/{CHECKPOINTS}/{shard_name(index, count, '')[:-1]}")


def parse_jsonl(data: bytes, where: str) -> list[dict]:
    return [obj for _, obj in parse_jsonl_lines(data.decode("utf-8").splitlines(), where)]


def dumps_rows(rows: Sequence[dict]) -> bytes:
    """Rows as JSONL bytes, deterministic (same rows -> same bytes): what shards commit."""
    return "".join(dumps_row(r) for r in rows).encode("utf-8")


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


# ----------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """Completed chunks of one shard's work, so a killed worker resumes where it stopped.

    Each chunk is ``chunk-000003.jsonl``: its rows, then a trailer line
    ``{"_checkpoint": {"chunk", "start", "items", "rows", "sha256"}}`` (sha256 of the bytes before
    the trailer). A torn, truncated or edited chunk fails the check, is deleted and redone; chunks
    after a gap are ignored. Chunks are created only if absent: of two workers racing on a shard
    the first chunk stored wins and both continue from it (identical for deterministic work).
    """

    def __init__(self, storage: Storage, prefix: str):
        self.storage = storage
        self.prefix = prefix.rstrip("/")

    def key(self, chunk_no: int) -> str:
        return f"{self.prefix}/chunk-{chunk_no:06d}.jsonl"

    @staticmethod
    def encode(chunk_no: int, rows: Sequence[dict], *, start: int | None = None, items: int | None = None) -> bytes:
        body = dumps_rows(rows)
        trailer = {"chunk": chunk_no, "start": start, "items": items, "rows": len(rows), "sha256": sha256_hex(body)}
        return body + (json.dumps({"_checkpoint": trailer}) + "\n").encode()

    def _decode(self, chunk_no: int, data: bytes) -> tuple[list[dict], dict] | None:
        """(rows, trailer) or None when the chunk fails its integrity check."""
        if not data.endswith(b"\n"):
            return None
        body, _, last = data[:-1].rpartition(b"\n")
        body = body + b"\n" if body else b""
        try:
            trailer = json.loads(last)["_checkpoint"]
            if trailer["chunk"] != chunk_no or trailer["sha256"] != sha256_hex(body):
                return None
            rows = parse_jsonl(body, self.storage.uri(self.key(chunk_no)))
        except (ValueError, KeyError, TypeError, InputError):
            return None
        if len(rows) != trailer["rows"]:
            return None
        return rows, trailer

    def load_chunks(self) -> list[tuple[list[dict], dict]]:
        """The valid chunks 0..k-1 as (rows, trailer); a corrupt chunk k is deleted, later ones ignored."""
        present = set(self.storage.list(self.prefix + "/chunk-"))
        chunks = []
        n = 0
        while self.key(n) in present:
            try:
                data = self.storage.read_bytes(self.key(n))
            except FileNotFoundError:  # cleared meanwhile
                break
            decoded = self._decode(n, data)
            if decoded is None:
                log.warning("checkpoint %s is corrupt: deleting it to redo it", self.storage.uri(self.key(n)))
                self.storage.delete(self.key(n))
                break
            chunks.append(decoded)
            n += 1
        return chunks

    def load(self) -> list[list[dict]]:
        """The rows of each valid completed chunk, in order."""
        return [rows for rows, _ in self.load_chunks()]

    def save(self, chunk_no: int, rows: Sequence[dict], *, start: int | None = None, items: int | None = None) -> list[dict]:
        """Store a chunk (create-only). Returns the rows now stored for it: ``rows``, or those of a
        valid chunk another worker stored first. A corrupt leftover in the way is replaced."""
        data = self.encode(chunk_no, rows, start=start, items=items)
        key = self.key(chunk_no)
        for _ in range(3):
            if self.storage.create_if_absent(key, data):
                return list(rows)
            try:
                existing = self.storage.read_bytes(key)
            except FileNotFoundError:
                continue
            decoded = self._decode(chunk_no, existing)
            if decoded is not None and (start is None or (decoded[1].get("start"), decoded[1].get("items")) == (start, items)):
                if existing != data:
                    log.warning("%s was stored first by another worker with other content: using it", self.storage.uri(key))
                return decoded[0]
            self.storage.delete(key)
        raise InParsError(f"cannot store checkpoint {self.storage.uri(key)}")

    def clear(self) -> None:
        """Delete every chunk (after the shard is committed)."""
        for key in self.storage.list(self.prefix + "/"):
            self.storage.delete(key)


def checkpointed_map(
    items: Sequence,
    fn: Callable[[Sequence], list[dict]],
    checkpoint: Checkpoint,
    chunk_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """``fn`` over ``items`` chunk by chunk, each chunk saved; completed chunks are not redone.

    Chunk ``k`` covers ``items[k*chunk_size:(k+1)*chunk_size]``; ``fn`` must map a chunk to its rows
    deterministically for a resumed run to equal an uninterrupted one byte for byte. Stored chunks
    that were cut with another ``chunk_size`` (or over other items) are discarded and redone.
    ``on_progress(items_done, items_total)`` is called after the restored chunks and after each chunk.
    Returns all rows in order.

    A stop request (SIGTERM, see :mod:`inpars.preemption`) is honoured after the chunk in progress is
    saved: :class:`~inpars.errors.Preempted` is raised unless that was the last chunk.
    """
    from . import preemption

    if chunk_size < 1:
        raise InParsError(f"chunk_size must be >= 1, got {chunk_size}")
    total = len(items)
    n_chunks = (total + chunk_size - 1) // chunk_size
    chunks = checkpoint.load_chunks()
    out: list[dict] = []
    done = 0
    for k, (rows, trailer) in enumerate(chunks[:n_chunks]):
        start, stop = k * chunk_size, min((k + 1) * chunk_size, total)
        if (trailer.get("start"), trailer.get("items")) != (start, stop - start):
            log.warning("checkpoint %s was cut differently: starting over", checkpoint.prefix)
            checkpoint.clear()
            out, done = [], 0
            break
        out.extend(rows)
        done = k + 1
    if on_progress:
        on_progress(min(done * chunk_size, total), total)
    with preemption.stoppable():
        for k in range(done, n_chunks):
            start, stop = k * chunk_size, min((k + 1) * chunk_size, total)
            rows = fn(items[start:stop])
            out.extend(checkpoint.save(k, rows, start=start, items=stop - start))
            if on_progress:
                on_progress(stop, total)
            if k + 1 < n_chunks:
                preemption.check(f"{stop} of {total} items are checkpointed in {checkpoint.prefix}")
    return out
