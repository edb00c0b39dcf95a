"""Storage backends: one small interface (:class:`Storage`), one module per backend.

``open_storage(uri)`` picks the backend from the URI: a local path or ``file://`` ->
:class:`~inpars.storage.local.LocalStorage`; ``gs://bucket/prefix`` ->
:class:`~inpars.storage.gcs.GCSStorage` (needs ``google-cloud-storage``, checked only when used).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .base import Storage, cache_root, check_key, join_key, sha256_hex
from .local import LocalStorage

__all__ = ["Storage", "LocalStorage", "open_storage", "fetch_local", "is_remote", "join_key", "check_key", "sha256_hex", "cache_root"]


def is_remote(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("gs://")


def open_storage(uri: str | os.PathLike) -> Storage:
    """A :class:`Storage` rooted at ``uri`` (local folder, ``file://`` or ``gs://bucket/prefix``)."""
    uri = str(uri)
    if uri.startswith("gs://"):
        from .gcs import GCSStorage

        if not GCSStorage.is_available():
            raise ConfigError(f"{uri}: gs:// needs `pip install google-cloud-storage`")
        return GCSStorage(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"unsupported storage URI {uri!r} (use a local path, file:// or gs://)")
    return LocalStorage(uri)


def fetch_local(uri: str | os.PathLike) -> Path:
    """A local path for an input given as a path or ``gs://`` URI (a file or a folder, e.g. BEIR).

    Local paths come back unchanged; ``gs://`` objects are downloaded into the cache
    (:func:`cache_root`), folders with their whole content.
    """
    uri = str(uri)
    if not is_remote(uri):
        return Path(uri[len("file://") :] if uri.startswith("file://") else uri)
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parent == "gs:/":  # a bare bucket
        parent, name = uri.rstrip("/"), ""
    storage = open_storage(parent)
    if name and storage.exists(name):
        return storage.local_path(name)
    folder = open_storage(uri)
    keys = folder.list("")
    if not keys:
        raise FileNotFoundError(f"{uri} does not exist")
    for key in keys:
        path = folder.local_path(key)
    return path.parents[len(keys[-1].split("/")) - 1]
