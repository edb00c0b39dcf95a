"""A run's shared state: layout, manifest, verified stage records, leases, checkpoints.

A run lives at ``<workspace>/runs/<run-id>/`` (a local folder or ``gs://bucket/prefix``)::

    manifest.json                                   written once (create-if-absent), never rewritten
    _manifest/<section>.json                        later additions (usage, settings changed on resume)
    <stage>/shard-00007-of-00064.<ext>              a shard's main output (create-if-absent)
    <stage>/<other files>                           the shard's side files (triples TSV, the model folder...)
    <stage>/shard-00007-of-00064.done.json          the shard's record: every file it committed, with size
                                                    and sha256; written last, create-only
    <stage>/_attempts/shard-00007-of-00064/<id>.json   each attempt's timings, host, usage (not committed)
    <stage>/_leases/shard-00007-of-00064.json       who works on the shard now (see inpars.leases)
    <stage>/_checkpoints/shard-00007-of-00064/chunk-000003.jsonl   partial progress of a shard
    logs/<stage>/shard-7.attempt-0.log              local executor logs (local workspaces only)

Commit protocol. What a shard commits depends only on its inputs and config: timings, hosts and
retry counts go to its attempt record, never into committed bytes. A worker holds the shard's lease
(:mod:`inpars.leases`) while it works, writes every file create-only, then the record, create-only.
A shard is *done* when its record exists and every file it lists is there with its size; readers
check each file's sha256 against the record (:meth:`Run.read_file`, :meth:`Run.fetch`), and
``inpars-launch verify`` checks them all. A worker that died between its files and its record leaves
files without a record: the next holder of the lease replaces them. Without a lease (library use,
tests), identical bytes already there count as success and different bytes are an error.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import PipelineConfig
from .corpus import dumps_row, parse_jsonl_lines
from .errors import InParsError, InputError
from .files import file_sha256
from .leases import Lease
from .secrets import find_secret, named_secrets
from .shards import shard_name, shard_range
from .storage import Storage, cache_root, check_key, is_remote, join_key, open_storage, sha256_hex

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SECTIONS = "_manifest"
SETTINGS_SECTION = "settings"  # runtime settings changed by `resume --set` (budget, resources...)
CORPUS_SECTION = "corpus"  # the corpus pinned by the first prepare: {source, sha256, bytes, documents}
CHECKPOINTS = "_checkpoints"
ATTEMPTS = "_attempts"
LEASES = "_leases"
RECORD_FORMAT = 2
RECORD_KEYS = ("stage", "shard", "count", "files", "rows", "stats")
RUN_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Text files are scanned for secrets before they are written; model weights are binary.
TEXT_SUFFIXES = (".json", ".jsonl", ".tsv", ".csv", ".txt", ".trec", ".md", ".yaml", ".yml", ".log")
SCAN_BLOCK = 8 << 20  # bytes of whole lines scanned for secrets at a time
# Installed versions recorded in the manifest (those present; the rest are left out).
PACKAGES = (
    "torch",
    "transformers",
    "gguf",
    "safetensors",
    "numpy",
    "pyarrow",
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


def _count_lines(data: bytes) -> int:
    return sum(1 for line in data.splitlines() if line.strip())


LINE_FORMATS = ("jsonl", "tsv", "trec", "txt", "csv")


def _rows(rows: int | None, stats: dict | None, ext: str, data: bytes | os.PathLike | None) -> int | None:
    """A record's row count: given, else ``stats["rows"]``, else the lines of a line-based format."""
    if rows is not None:
        return rows
    if stats and isinstance(stats.get("rows"), int):
        return stats["rows"]
    if data is None or ext.lstrip(".") not in LINE_FORMATS:
        return None
    if isinstance(data, bytes):
        return _count_lines(data)
    with open(data, "rb") as f:  # a file main output: streamed, never read whole
        return sum(1 for line in f if line.strip())


def scratch_root() -> Path:
    """Where workers put what they download or build before committing: ``$INPARS_SCRATCH``, else
    ``<cache>/scratch`` (pods point the cache at their ``/scratch`` volume, not the image's layer)."""
    root = Path(os.environ["INPARS_SCRATCH"]) if os.environ.get("INPARS_SCRATCH") else cache_root() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


# Large inputs (the prepared store and index: gigabytes at millions of documents) are hashed whole once
# per machine, not once per shard: a stamp keyed by the file's sha256 remembers the file's identity when
# it was verified (path, size, inode, mtime); a rewritten, replaced or resized file no longer matches it
# and is hashed again. `inpars-launch verify` always hashes. Without this, every shard's fixed cost grew
# with the corpus (about 2 s a GB).
def _stamp_path(sha256: str) -> Path:
    return scratch_root() / "verified" / sha256


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}\t{st.st_size}\t{st.st_ino}\t{st.st_mtime_ns}"


def verified_before(path: Path, sha256: str) -> bool:
    """Whether ``path`` was hashed to ``sha256`` on this machine and has not changed since."""
    try:
        return _file_identity(path) in _stamp_path(sha256).read_text(encoding="utf-8").splitlines()
    except OSError:
        return False


def mark_verified(path: Path, sha256: str) -> None:
    stamp = _stamp_path(sha256)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    with open(stamp, "a", encoding="utf-8") as f:  # one line per verified copy; appends are atomic enough for a cache
        f.write(_file_identity(path) + "\n")


def check_same_corpus(pinned: Mapping[str, Any], where: str, *, sha256: str | None = None, size: int | None = None) -> None:
    """The one corpus-changed error: a run's samples, store and index must all come from one corpus.
    ``where`` is compared by ``sha256``, or by ``size`` alone where hashing would mean downloading it."""
    if sha256 is not None and pinned.get("sha256") != sha256:
        found = f"has sha256 {sha256[:12]}..."
    elif size is not None and pinned.get("bytes") not in (None, size):
        found = f"has {size} bytes, not {pinned['bytes']}"
    else:
        return
    raise InputError(
        f"the corpus changed: this run was prepared from {pinned.get('source')} with sha256 {str(pinned.get('sha256'))[:12]}... "
        f"({pinned.get('documents')} documents), but {where} {found}; a run keeps one corpus: "
        "restore it, or start a new run for the new corpus"
    )


# ----------------------------------------------------------------------------- run ids, manifest


def new_run_id(dataset: str, now: _dt.datetime | None = None) -> str:
    """``scifact-20261126-1530-ab12``: readable, sortable, unique, a DNS-1123 label (k8s Job names)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{_slug(dataset, 24)}-{now:%Y%m%d-%H%M}-{os.urandom(2).hex()}"


def _slug(text: str, length: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "run"


def config_digest(config: PipelineConfig) -> str:
    """A short hash of every setting that can change a committed byte (runtime settings left out)."""
    data = config.to_dict()
    data.pop("resources", None)
    data.pop("image", None)
    for key in ("budget_usd", "concurrency", "request_timeout", "max_retries"):
        data["generate"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def stable_run_id(config: PipelineConfig) -> str:
    """``<dataset>-<config hash>``: the same config gives the same run, so running it again resumes it."""
    return check_run_id(f"{_slug(config.data.name, 40)}-{config_digest(config)}")


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or len(run_id) > 63 or not RUN_ID_RE.match(run_id):
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


def secret_env_names(config: PipelineConfig) -> list[str]:
    """The variables whose values this run must never write: the API key and the hub token."""
    return [config.generate.api_key_env, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]


# ----------------------------------------------------------------------------- the run


class Run:
    """One pipeline run in a workspace: ``Run.create(...)`` once, ``Run.open(uri)`` in every worker."""

    def __init__(self, uri: str, manifest: dict[str, Any], storage: Storage | None = None):
        self.uri = str(uri).rstrip("/")
        self.storage = storage or open_storage(self.uri)
        if not isinstance(manifest, dict) or "run_id" not in manifest or "config" not in manifest:
            raise InputError("the manifest lacks run_id or config", path=f"{self.uri}/{MANIFEST}")
        self._manifest = manifest
        self.run_id: str = check_run_id(manifest["run_id"])
        self.config = self._effective_config()
        self._secrets = named_secrets(secret_env_names(self.config))
        self.bytes_read = 0  # what this process read from the workspace (benchmarks, attempt records)

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
        config_dict = config.to_dict()
        manifest = {
            "run_id": run_id,
            "created_at": _now(),
            "config": config_dict,
            "code": code_version(),
            "packages": package_versions(),
            **_identity(config),
        }
        payload = _dumps(manifest)
        _refuse_secrets(payload, named_secrets(secret_env_names(config)), f"{uri}/{MANIFEST}")
        if storage.create_if_absent(MANIFEST, payload):
            return cls(uri, manifest, storage)
        existing = cls.open(uri)
        if config_digest(PipelineConfig.from_dict(existing._manifest["config"])) != config_digest(config):
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
            raw = storage.read_bytes(MANIFEST)
        except FileNotFoundError:
            raise InParsError(f"no run at {run_uri} ({MANIFEST} is missing)") from None
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"corrupt manifest ({getattr(e, 'msg', e)})", path=storage.uri(MANIFEST)) from None
        return cls(storage.uri(), manifest, storage)

    def _effective_config(self) -> PipelineConfig:
        """The manifest's config with the runtime settings changed on resume applied on top."""
        config = PipelineConfig.from_dict(self._manifest["config"], where=f"{self.uri}/{MANIFEST}")
        try:
            raw = self.storage.read_bytes(f"{SECTIONS}/{SETTINGS_SECTION}.json")
        except FileNotFoundError:
            return config
        from .config import runtime_only

        overrides = json.loads(raw)
        runtime_only(overrides)
        return config.override(overrides)

    def change_settings(self, dotted: Mapping[str, Any]) -> PipelineConfig:
        """Change runtime settings (budget, concurrency, resources...) of an existing run; returns the new config."""
        from .config import runtime_only

        runtime_only(dict(dotted))
        current = self.manifest.get(SETTINGS_SECTION) or {}
        merged = {**current, **dotted}
        config = PipelineConfig.from_dict(self._manifest["config"]).override(merged)  # validates
        self.update_manifest(SETTINGS_SECTION, merged)
        self.config = config
        return config

    @property
    def manifest(self) -> dict[str, Any]:
        """manifest.json plus every section added by :meth:`update_manifest` (read fresh each time)."""
        merged = dict(self._manifest)
        for key in self.storage.list(SECTIONS + "/"):
            name = key[len(SECTIONS) + 1 :].removesuffix(".json")
            merged[name] = json.loads(self.storage.read_bytes(key))
        return merged

    def update_manifest(self, section: str, data: dict[str, Any]) -> None:
        """Record a later addition (usage, cost, settings) as ``_manifest/<section>.json``.

        manifest.json itself is never rewritten (it was created exactly once); each section is its
        own file, so two stages never lose each other's updates; within one section the last writer
        wins. Core keys (config, run_id, ...) cannot be replaced.
        """
        if section in self._manifest or section == CORPUS_SECTION or not re.match(r"^[A-Za-z0-9_.-]+$", section):
            raise InParsError(f"cannot update manifest section {section!r}")
        self.write_bytes(f"{SECTIONS}/{section}.json", _dumps(data))

    # -------------------------------------------------------------- the pinned corpus

    def corpus_pin(self) -> dict[str, Any] | None:
        """The corpus this run was prepared from (``{source, sha256, bytes, documents}``), or None before prepare."""
        try:
            return json.loads(self.storage.read_bytes(f"{SECTIONS}/{CORPUS_SECTION}.json"))
        except FileNotFoundError:
            return None

    def pin_corpus(self, pin: Mapping[str, Any]) -> dict[str, Any]:
        """Pin the run's corpus, create-only: the first prepare wins, for the life of the run. A later
        pin of another corpus (another sha256) is an :class:`InputError` saying what changed."""
        if not self._create(f"{SECTIONS}/{CORPUS_SECTION}.json", _dumps(dict(pin))):
            pinned = self.corpus_pin() or {}
            check_same_corpus(pinned, pin.get("source", "?"), sha256=pin["sha256"])
            return pinned
        return dict(pin)

    def check_corpus(self, sha256: str, where: str) -> None:
        """Raise :class:`InputError` unless ``sha256`` is the pinned corpus (no pin yet: nothing to check)."""
        pinned = self.corpus_pin()
        if pinned is not None:
            check_same_corpus(pinned, where, sha256=sha256)

    # -------------------------------------------------------------- writing (every payload scanned)

    def scan(self, payload: bytes | str, where: str) -> None:
        """Refuse (permanent error naming the variable and the file, never the value) to write a secret."""
        _refuse_secrets(payload, self._secrets, where)

    def _scan_file(self, path: Path, where: str) -> str:
        """:meth:`scan` a text file a block of whole lines at a time (memory stays flat however large the
        file; a secret never spans a line), hashing it on the same read; returns its sha256."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while lines := f.readlines(SCAN_BLOCK):
                block = b"".join(lines)
                digest.update(block)
                self.scan(block, where)
        return digest.hexdigest()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Overwrite ``key`` (uncommitted state only: sections, attempts, summaries), after a secret scan."""
        self.scan(data, self.storage.uri(key))
        self.storage.write_bytes(key, data)

    def _create(self, key: str, data: bytes) -> bool:
        self.scan(data, self.storage.uri(key))
        return self.storage.create_if_absent(key, data)

    # -------------------------------------------------------------- layout

    @staticmethod
    def shard_key(stage: str, index: int, count: int, ext: str = "jsonl") -> str:
        shard_range(0, index, count)  # validates index/count
        return f"{stage}/{shard_name(index, count, ext)}"

    @staticmethod
    def record_key(stage: str, index: int, count: int) -> str:
        return f"{stage}/{shard_name(index, count, 'done.json')}"

    marker_key = record_key

    @staticmethod
    def _shard_dir(stage: str, kind: str, index: int, count: int) -> str:
        return f"{stage}/{kind}/{shard_name(index, count, '')[:-1]}"

    def lease(self, stage: str, index: int, count: int) -> Lease:
        """The lease object of one shard (see :mod:`inpars.leases`); not yet acquired."""
        return Lease(self.storage, f"{stage}/{LEASES}/{shard_name(index, count, 'json')}")

    # -------------------------------------------------------------- commit

    def commit_shard(
        self,
        stage: str,
        index: int,
        count: int,
        data: bytes | os.PathLike | None = None,
        *,
        ext: str = "jsonl",
        files: Mapping[str, bytes | os.PathLike] | None = None,
        stats: dict[str, Any] | None = None,
        rows: int | None = None,
        lease: Lease | None = None,
    ) -> bool:
        """Commit one shard: its main output ``data`` (bytes or a local file, as ``shard-i-of-n.<ext>``), its side ``files``
        (``{name under <stage>/: bytes or a local file}``; a model folder is its files, ``model/...``),
        then its record. Returns True when this call created the main output (the record too),
        False when it was already there with the same bytes (an earlier attempt or a twin).

        With ``lease`` (what workers pass), files left by an attempt that died before its record are
        replaced; without one, different bytes already committed raise :class:`InParsError` (a
        stage's output must be deterministic). ``rows``: given, else ``stats["rows"]``, else the
        lines of a line-based main output.
        """
        shard_range(0, index, count)
        payloads: dict[str, bytes | Path] = {}
        if data is not None:
            payloads[shard_name(index, count, ext)] = data if isinstance(data, bytes) else Path(data)
        for name, value in (files or {}).items():
            check_key(name)
            payloads[name] = value if isinstance(value, bytes) else Path(value)
        if not payloads:
            raise InParsError(f"{stage} shard {index}: nothing to commit")
        if lease is not None:
            lease.check()
            if self.shard_done(stage, index, count):
                return False
        listing: dict[str, dict[str, Any]] = {}
        created = {}
        for name, value in payloads.items():
            listing[name], created[name] = self._put(stage, name, value, lease=lease, index=index, count=count)
        primary = shard_name(index, count, ext) if data is not None else None
        record = {
            "format": RECORD_FORMAT,
            "stage": stage,
            "shard": index,
            "count": count,
            "files": listing,
            "rows": _rows(rows, stats, ext if data is not None else "", data),
            "stats": stats or {},
        }
        if primary is not None:  # the main file's identity at the top level, as readers of format 1 expect
            record.update(key=f"{stage}/{primary}", bytes=listing[primary]["bytes"], sha256=listing[primary]["sha256"])
        if lease is not None:
            lease.check()
        rkey = self.record_key(stage, index, count)
        if not self._create(rkey, _dumps(record)):
            old = self.record(stage, index, count) or {}
            if old.get("files") != listing:
                raise InParsError(
                    f"{self.storage.uri(rkey)} records other files than this worker committed: a stage's output must be deterministic"
                )
            return created[primary] if primary is not None else False
        return created[primary] if primary is not None else True

    def _put(
        self, stage: str, name: str, value: bytes | Path, *, lease: Lease | None, index: int, count: int
    ) -> tuple[dict[str, Any], bool]:
        """Store one file create-only; ``({bytes, sha256}, whether this call created it)``."""
        key = join_key(stage, name)
        text = name.endswith(TEXT_SUFFIXES) or "." not in name.rsplit("/", 1)[-1]
        if isinstance(value, bytes):
            size, digest = len(value), sha256_hex(value)
            if text:
                self.scan(value, self.storage.uri(key))
            created = self.storage.create_if_absent(key, value)
        else:
            size = value.stat().st_size
            digest = self._scan_file(value, self.storage.uri(key)) if text and self._secrets else file_sha256(value)
            created = self.storage.upload_file(key, value)
        entry = {"bytes": size, "sha256": digest}
        if created:
            return entry, True
        existing = self._sha256_of(key)
        if existing == digest:
            return entry, False
        if lease is None:
            raise InParsError(
                f"{stage} shard {index} of {count} is already committed at {self.storage.uri(key)} with different content "
                f"(sha256 {existing[:12]}, this worker made {digest[:12]}): a stage's output must be deterministic; "
                "delete the shard and its .done.json to redo it"
            )
        # The lease holder replaces what an attempt that died before its record left behind.
        log.warning("replacing %s left by an earlier attempt (it has no record)", self.storage.uri(key))
        self.storage.delete(key)
        ok = self.storage.create_if_absent(key, value) if isinstance(value, bytes) else self.storage.upload_file(key, value)
        if not ok:
            lease.check()
            raise InParsError(f"{self.storage.uri(key)} was written by someone else while this worker held the shard's lease")
        return entry, True

    def _sha256_of(self, key: str) -> str:
        if self.is_local:
            return file_sha256(Path(self.storage.uri(key)))
        with tempfile.TemporaryDirectory(dir=scratch_root()) as tmp:
            return self.storage.download_file(key, Path(tmp) / "blob")

    # -------------------------------------------------------------- records

    def record(self, stage: str, index: int, count: int) -> dict[str, Any] | None:
        """The shard's record (None when it is not committed); a malformed one is an InputError."""
        key = self.record_key(stage, index, count)
        try:
            raw = self.storage.read_bytes(key)
        except FileNotFoundError:
            return None
        return parse_record(raw, self.storage.uri(key))

    shard_marker = record

    def shard_done(self, stage: str, index: int, count: int) -> bool:
        return self.storage.exists(self.record_key(stage, index, count))

    def _done_records(self, stage: str) -> dict[int, set[int]]:
        """{count: {done indexes}} from one listing (one request on GCS)."""
        found: dict[int, set[int]] = {}
        for key in self.storage.list(f"{stage}/shard-"):
            m = re.fullmatch(rf"{re.escape(stage)}/shard-(\d+)-of-(\d+)\.done\.json", key)
            if m:
                found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
        return found

    def missing_shards(self, stage: str, count: int) -> list[int]:
        done = self._done_records(stage).get(count, set())
        return [i for i in range(count) if i not in done]

    def require_complete(self, stage: str, count: int, needed_by: str | None = None) -> None:
        """Raise :class:`InParsError` naming the shards of ``stage`` that are not committed."""
        records = self._done_records(stage)
        missing = [i for i in range(count) if i not in records.get(count, set())]
        if not missing:
            return
        shown = ", ".join(map(str, missing[:20])) + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        msg = f"{needed_by or 'this step'} needs {stage} shards {shown} of {count}; run them first"
        others = sorted(c for c in records if c != count)
        if others:
            msg += f" (found {stage} shards committed for a shard count of {', '.join(map(str, others))}: the config changed?)"
        raise InParsError(msg)

    def _listed(self, stage: str, name: str, index: int, count: int) -> dict[str, Any]:
        record = self.record(stage, index, count)
        if record is None:
            raise InParsError(f"{stage} shard {index} of {count} is not committed; run the {stage} stage first")
        entry = record["files"].get(name)
        if entry is None:
            raise InParsError(f"{stage} shard {index} of {count} committed no file {name!r}")
        return entry

    def read_file(self, stage: str, name: str, index: int = 0, count: int = 1) -> bytes:
        """A committed file's bytes, checked against the size and sha256 in its shard's record."""
        entry = self._listed(stage, name, index, count)
        key = join_key(stage, name)
        try:
            data = self.storage.read_bytes(key)
        except FileNotFoundError:
            raise InParsError(
                f"{self.storage.uri(key)} is listed in its record but missing: run `inpars-launch verify` and resume"
            ) from None
        self.bytes_read += len(data)
        if len(data) != entry["bytes"] or sha256_hex(data) != entry["sha256"]:
            raise InParsError(f"{self.storage.uri(key)} does not match the sha256 in its record: corrupted? run `inpars-launch verify`")
        return data

    def has_file(self, stage: str, name: str, index: int = 0, count: int = 1) -> bool:
        record = self.record(stage, index, count)
        return record is not None and name in record["files"]

    def read_shard(self, stage: str, index: int, count: int, ext: str = "jsonl") -> bytes:
        """A committed shard's main output, verified."""
        return self.read_file(stage, shard_name(index, count, ext), index, count)

    def fetch(self, stage: str, name: str, index: int = 0, count: int = 1, *, into: str | os.PathLike | None = None) -> Path:
        """A local path holding the committed file or folder ``<stage>/<name>`` (every file under
        ``name/`` for a folder), each file verified against the record. A local workspace serves its
        own files in place; a gs:// one streams them to ``into`` (default: under :func:`scratch_root`)."""
        record = self.record(stage, index, count)
        if record is None:
            raise InParsError(f"{stage} shard {index} of {count} is not committed; run the {stage} stage first")
        entries = {n: e for n, e in record["files"].items() if n == name or n.startswith(name.rstrip("/") + "/")}
        if not entries:
            raise InParsError(f"{stage} shard {index} of {count} committed nothing under {name!r}")
        base = (
            Path(self.storage.uri(stage)) if self.is_local and into is None else Path(into or scratch_root() / "runs" / self.run_id / stage)
        )
        for rel, entry in sorted(entries.items()):
            target = base / rel
            key = join_key(stage, rel)
            if target.is_file() and verified_before(target, entry["sha256"]):
                continue  # hashed whole by an earlier reader on this machine, unchanged since
            if self.is_local and into is None:
                if not target.is_file():
                    raise InParsError(f"{target} is listed in its record but missing: run `inpars-launch verify` and resume")
                digest = file_sha256(target)
                self.bytes_read += entry["bytes"]  # read whole to verify it
            elif target.is_file() and target.stat().st_size == entry["bytes"] and file_sha256(target) == entry["sha256"]:
                mark_verified(target, entry["sha256"])
                continue  # fetched before by this pod
            else:
                try:
                    digest = self.storage.download_file(key, target)
                except FileNotFoundError:
                    raise InParsError(f"{self.storage.uri(key)} is listed in its record but missing: run `inpars-launch verify`") from None
                self.bytes_read += entry["bytes"]
            if digest != entry["sha256"]:
                raise InParsError(f"{self.storage.uri(key)} does not match the sha256 in its record: corrupted? run `inpars-launch verify`")
            mark_verified(target, entry["sha256"])
        return base / name

    def iter_rows(
        self, stage: str, count: int, *, needed_by: str | None = None, name: str | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[dict]:
        """The rows of a JSONL stage, shard after shard, streamed (each shard verified as it is read).

        ``start``/``stop``: only rows ``[start, stop)`` of the whole stage (a query shard's slice). Shards
        wholly before ``start`` are not read (their records give their row counts); rows before it in the
        first shard read are skipped unparsed."""
        self.require_complete(stage, count, needed_by)
        position = 0
        for i in range(count):
            if stop is not None and position >= stop:
                return
            fname = name.format(shard=shard_name(i, count, "jsonl")) if name else shard_name(i, count, "jsonl")
            rows = (self.record(stage, i, count) or {}).get("rows") if name is None else None
            if isinstance(rows, int) and position + rows <= start:
                position += rows
                continue
            path = self.fetch(stage, fname, i, count)
            skip = max(0, start - position)
            position += skip
            for _, row in iter_jsonl_file(path, skip):
                if stop is not None and position >= stop:
                    return
                position += 1
                yield row

    def read_rows(self, stage: str, count: int, *, needed_by: str | None = None) -> list[dict]:
        """All rows of a JSONL stage, shards 0..count-1 in order (every shard must be committed)."""
        return list(self.iter_rows(stage, count, needed_by=needed_by))

    # -------------------------------------------------------------- status and verification

    def stage_status(self, stage: str, count: int) -> dict[str, Any]:
        """``{stage, count, done, missing, partial, invalid, rows, bytes}`` from the workspace alone.

        A shard is *done* when its record exists and every file it lists is present with its size
        (one listing of the stage); ``invalid`` lists records whose files are missing or of the wrong
        size (they count as missing: resume redoes them). ``partial`` lists missing shards with
        checkpoint chunks (started: running, or failed — the workspace alone cannot tell).
        """
        sizes = self.storage.sizes(f"{stage}/")
        recorded = sorted(self._done_records(stage).get(count, set()))
        done, invalid, rows, nbytes = [], [], 0, 0
        for i in recorded:
            try:
                record = self.record(stage, i, count) or {}
            except InputError:
                invalid.append(i)
                continue
            if all(sizes.get(join_key(stage, n)) == e["bytes"] for n, e in record["files"].items()):
                done.append(i)
                rows += int(record.get("rows") or 0)
                nbytes += sum(int(e["bytes"]) for e in record["files"].values())
            else:
                invalid.append(i)
        started = set()
        for key in sizes:
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
            "invalid": invalid,
            "rows": rows,
            "bytes": nbytes,
        }

    def verify_shard(self, stage: str, index: int, count: int, *, deep: bool = True) -> list[str]:
        """What is wrong with a committed shard (empty: nothing): missing files, wrong sizes and, with
        ``deep``, wrong sha256s."""
        try:
            record = self.record(stage, index, count)
        except InputError as e:
            return [str(e)]
        if record is None:
            return [f"{stage} shard {index} of {count}: not committed"]
        problems = []
        sizes = self.storage.sizes(f"{stage}/")
        for name, entry in sorted(record["files"].items()):
            key = join_key(stage, name)
            uri = self.storage.uri(key)
            if key not in sizes:
                problems.append(f"{uri}: missing")
            elif sizes[key] != entry["bytes"]:
                problems.append(f"{uri}: {sizes[key]} bytes, the record says {entry['bytes']}")
            elif deep and self._sha256_of(key) != entry["sha256"]:
                problems.append(f"{uri}: sha256 differs from the record")
        return problems

    def invalidate(self, stage: str, index: int, count: int, reason: str) -> None:
        """Set a bad shard aside so that it is redone: its record moves to ``_invalid/`` with the reason."""
        key = self.record_key(stage, index, count)
        try:
            raw = self.storage.read_bytes(key)
        except FileNotFoundError:
            return
        # unique per call: a shard set aside twice within a second keeps both reasons
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%f") + "-" + os.urandom(3).hex()
        aside = f"{stage}/_invalid/{shard_name(index, count, '')[:-1]}.{stamp}.json"
        self.write_bytes(aside, _dumps({"reason": reason, "record": raw.decode("utf-8", "replace")}))
        self.storage.delete(key)
        log.warning("%s shard %d of %d set aside to be redone: %s", stage, index, count, reason)

    # -------------------------------------------------------------- uncommitted state

    def put_file(self, stage: str, name: str, data: bytes, exclusive: bool = True) -> bool:
        """Store an uncommitted ``<stage>/<name>`` (reports, summaries). Exclusive (default):
        create-only, identical bytes already there return False, different bytes raise
        :class:`InParsError`. Not exclusive: overwrite, True. Committed outputs go through
        :meth:`commit_shard`."""
        key = join_key(stage, check_key(name))
        if not exclusive:
            self.write_bytes(key, data)
            return True
        if self._create(key, data):
            return True
        if sha256_hex(self.storage.read_bytes(key)) != sha256_hex(data):
            raise InParsError(f"{self.storage.uri(key)} already exists with different content")
        return False

    def get_file(self, stage: str, name: str) -> bytes:
        """An uncommitted file (or any file, unverified); see :meth:`read_file` for committed ones."""
        try:
            return self.storage.read_bytes(join_key(stage, check_key(name)))
        except FileNotFoundError:
            raise InParsError(f"{self.storage.uri(join_key(stage, name))} is missing: run the {stage} stage first") from None

    def record_attempt(self, stage: str, index: int, count: int, info: dict[str, Any]) -> str:
        """Store one attempt's timings, host and usage beside the shard (never part of what is committed)."""
        attempt = info.get("attempt") or new_attempt_id()
        key = f"{self._shard_dir(stage, ATTEMPTS, index, count)}/{attempt}.json"
        self.write_bytes(key, _dumps({"attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(), **info}))
        return key

    def attempts(self, stage: str, index: int, count: int) -> list[dict[str, Any]]:
        out = []
        for key in self.storage.list(self._shard_dir(stage, ATTEMPTS, index, count) + "/"):
            with contextlib.suppress(ValueError, FileNotFoundError):
                out.append(json.loads(self.storage.read_bytes(key)))
        return out

    def stage_progress(self, stage: str, shards: Sequence[int], count: int) -> dict[str, Any] | None:
        """What the workers of ``shards`` last noted (:meth:`inpars.workers.Shard.progress`), summed:
        ``{done, total, unit, rate (units/s), eta (s)}``, or None when none of them noted anything."""
        done = total = 0
        rate = 0.0
        unit = None
        for i in shards:
            notes = [a for a in self.attempts(stage, i, count) if a.get("progress") and a.get("outcome") not in ("failed",)]
            if not notes:
                continue
            latest = max(notes, key=lambda a: a["progress"].get("at", 0))
            prog = latest["progress"]
            unit = prog.get("unit", unit)
            done += int(prog.get("done") or 0)
            total += int(prog.get("total") or 0)
            elapsed = float(prog.get("at", 0)) - float(latest.get("started_at") or prog.get("at", 0))
            if elapsed > 0:
                rate += int(prog.get("done") or 0) / elapsed
        if unit is None:
            return None
        eta = (total - done) / rate if rate > 0 and total >= done else None
        return {"done": done, "total": total, "unit": unit, "rate": rate, "eta": eta}

    # -------------------------------------------------------------- checkpoints

    def checkpoint(self, stage: str, index: int, count: int) -> Checkpoint:
        return Checkpoint(self.storage, self._shard_dir(stage, CHECKPOINTS, index, count), scan=self.scan)


def new_attempt_id() -> str:
    """``20261201T223015.123-<host>-<pid>-<random>``: sortable by start time, unique per call. The random
    tail matters: two attempts in one process within a millisecond (a retry in-process, a fast shard) must
    not overwrite each other's record."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"
    return f"{stamp}-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


def parse_record(raw: bytes, where: str) -> dict[str, Any]:
    """A record read back, checked: malformed JSON or a missing key is an InputError naming the file."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt completion record ({getattr(e, 'msg', e)})", path=where) from None
    if not isinstance(record, dict):
        raise InputError("corrupt completion record (not a JSON object)", path=where)
    if "files" not in record and {"key", "bytes", "sha256"} <= set(record):  # format 1: one file
        record["files"] = {record["key"].split("/", 1)[-1]: {"bytes": record["bytes"], "sha256": record["sha256"]}}
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise InputError(f"completion record lacks {', '.join(missing)}", path=where)
    if not isinstance(record["files"], dict) or not all(
        isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str) for e in record["files"].values()
    ):
        raise InputError("completion record lists files without bytes and sha256", path=where)
    for name in record["files"]:
        check_key(name, where=where)
    return record


def iter_jsonl_file(path: str | os.PathLike, skip: int = 0) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` of a local JSONL file, streamed; bad lines raise naming file and line. The first
    ``skip`` rows (non-blank lines) are passed over unparsed."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if skip and raw.strip():
                skip -= 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("not UTF-8 text", path=str(path), line=lineno) from None
            yield from ((lineno, obj) for _, obj in parse_jsonl_lines([line], str(path), start=lineno))


def _refuse_secrets(payload: bytes | str, secrets: dict[str, str], where: str) -> None:
    what = find_secret(payload, secrets) if secrets else None
    if what:
        raise InParsError(f"refusing to write {what} (a secret) into {where}")


def parse_jsonl(data: bytes, where: str) -> list[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError("not UTF-8 text", path=where, line=line) from None
    return [obj for _, obj in parse_jsonl_lines(text.splitlines(), where)]


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

    def __init__(self, storage: Storage, prefix: str, *, scan: Callable[[bytes, str], None] | None = None):
        self.storage = storage
        self.prefix = prefix.rstrip("/")
        self.scan = scan  # refuses secrets (the run's scan); checkpoints are workspace payloads too

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
        if self.scan is not None:
            self.scan(data, self.storage.uri(key))
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
