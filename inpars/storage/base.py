"""The storage interface every backend implements: bytes under relative keys below one root URI.

A :class:`Storage` is rooted at a URI (a local folder or ``gs://bucket/prefix``) and takes keys
relative to it, always with ``/`` separators (``generate/shard-00000-of-00004.jsonl``). The one
operation the whole pipeline's exactly-once story rests on is :meth:`Storage.create_if_absent`:
an atomic "create this object unless something is already there".
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path

from ..errors import ConfigError, InputError
from ..files import atomic_write


class Storage(ABC):
    """Bytes under relative keys below a root URI."""

    #: URI scheme handled by the backend ("" for local paths).
    scheme: str = ""

    @classmethod
    def is_available(cls) -> bool:
        """Whether the backend's client library is importable (checked lazily, ir_measures style)."""
        return True

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's content; :class:`FileNotFoundError` when absent."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or overwrite (atomically: readers see the old or the new content, never a mix).

        Only for scratch data and summaries: committed outputs go through :meth:`create_if_absent`.
        """

    @abstractmethod
    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Atomically create ``key``: True when created, False when something already exists there."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the root) starting with ``prefix`` (a string prefix, as in GCS)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error when it is already absent."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The absolute URI of ``key`` (for messages and manifests)."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file holding ``key``'s content (the file itself locally; a cached copy if remote)."""

    # ------------------------------------------------------------------ optional, with generic defaults

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """``{key: size in bytes}`` for the keys under ``prefix`` (one listing where the backend allows)."""
        return {key: len(self.read_bytes(key)) for key in self.list(prefix)}

    def swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        """Compare-and-swap: replace ``key`` by ``data`` (``None``: delete it) only if it now holds
        exactly ``expected`` (``None``: only if absent). True when swapped. Leases are built on this."""
        raise NotImplementedError(f"{type(self).__name__} has no compare-and-swap")

    def upload_file(self, key: str, path: str | os.PathLike) -> bool:
        """Create ``key`` from a local file, only if absent (like :meth:`create_if_absent`)."""
        return self.create_if_absent(key, Path(path).read_bytes())

    def download_file(self, key: str, path: str | os.PathLike) -> str:
        """Copy ``key`` into the local file ``path`` (atomically); returns the sha256 of what was written."""
        data = self.read_bytes(key)
        with atomic_write(path, "wb") as f:
            f.write(data)
        return sha256_hex(data)

    # ------------------------------------------------------------------ generic helpers

    def upload_dir(self, local_dir: str | os.PathLike, key_prefix: str) -> list[str]:
        """Copy every file under ``local_dir`` to ``key_prefix/<relative path>`` (overwriting); the keys."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir} is not a folder")
        keys = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = join_key(key_prefix, path.relative_to(local_dir).as_posix())
            self.write_bytes(key, path.read_bytes())
            keys.append(key)
        return keys

    def download_dir(self, key_prefix: str, local_dir: str | os.PathLike) -> Path:
        """Copy every object below ``key_prefix/`` into ``local_dir`` (same relative layout).

        Every object name is checked before anything is written: a hostile name (``..``, an empty
        segment, an absolute path) would otherwise write outside ``local_dir``.
        """
        local_dir = Path(local_dir)
        prefix = key_prefix.rstrip("/") + "/" if key_prefix else ""
        keys = self.list(prefix)
        if not keys:
            raise FileNotFoundError(f"nothing stored under {self.uri(prefix)}")
        for key in keys:
            check_key(key[len(prefix) :], where=self.uri(key))
        for key in keys:
            self.download_file(key, local_dir / key[len(prefix) :])
        return local_dir

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, ignoring empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def check_key(key: str, *, where: str | None = None) -> str:
    """Refuse keys that could escape the root or alias another key: empty, absolute, a backslash, a
    control character, an empty segment (``a//b``), ``.`` or ``..``. ``where`` names the object in
    the error (for names read back from a bucket)."""
    parts = key.split("/") if isinstance(key, str) else []
    if (
        not parts
        or not key
        or "\\" in key
        or any(ord(c) < 32 or ord(c) == 127 for c in key)
        or any(part in ("", ".", "..") for part in parts)
    ):
        why = "keys are '/'-separated names with no empty, '.' or '..' segment, backslash or control character"
        if where:  # a name read back from a bucket: bad input, not a bad setting
            raise InputError(f"refusing object {where}: invalid key {key!r} ({why})")
        raise ConfigError(f"invalid storage key {key!r} ({why})")
    return key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_root() -> Path:
    """Where remote inputs are cached: ``$INPARS_CACHE``, else ``~/.cache/inpars``.

    Falls back to the temp folder when HOME is unset (a pod with no home must not crash).
    """
    if os.environ.get("INPARS_CACHE"):
        return Path(os.environ["INPARS_CACHE"])
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no passwd entry
        home = None
    if home is None or not os.access(home if home.exists() else home.parent, os.W_OK):
        import tempfile

        return Path(tempfile.gettempdir()) / "inpars-cache"
    return home / ".cache" / "inpars"
