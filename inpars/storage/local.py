"""Local-folder storage (also ``file://`` URIs).

``create_if_absent`` writes a temp file in the target's folder and ``os.link``s it to the target:
``link`` fails with ``FileExistsError`` when the target exists, so of two racing writers exactly one
wins, and the target never holds a partial file (the content is complete before it gets its name).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .base import Storage, _atomic_write, _write_new, check_key

TMP_PREFIX = ".tmp-"  # temp files being written; never listed


class LocalStorage(Storage):
    scheme = "file"

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if root.startswith("file://"):
            root = root[len("file://") :]
        self.root = Path(root).expanduser().absolute()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{path} does not exist") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), data)

    def create_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        if path.exists():  # cheap fast path; the link below is what makes it atomic
            return False
        tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-{path.name}")
        try:
            _write_new(tmp, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                # A filesystem without hard links (some FUSE/SMB mounts): fall back to an
                # exclusive create. Still exactly-once, but a reader may briefly see a partial file.
                return _exclusive_create(path, data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the folder the prefix names, then filter by string prefix (GCS semantics).
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Prune folders left empty (e.g. a cleared checkpoint), as an object store has none.
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or gone): stop
                break

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def local_path(self, key: str) -> Path:
        path = self._path(key)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        return path

    def download_dir(self, key_prefix: str, local_dir: str | os.PathLike) -> Path:
        # Copying a folder onto itself would be pointless (and would truncate nothing, but still).
        source = self.root / key_prefix if key_prefix else self.root
        if Path(local_dir).absolute() == source:
            if not source.is_dir():
                raise FileNotFoundError(f"nothing stored under {source}")
            return source
        return super().download_dir(key_prefix, local_dir)


def _exclusive_create(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True
