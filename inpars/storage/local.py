"""Local-folder storage (also ``file://`` URIs).

``create_if_absent`` writes a temp file in the target's folder and ``os.link``s it to the target:
``link`` fails with ``FileExistsError`` when the target exists, so of two racing writers exactly one
wins, and the target never holds a partial file (the content is complete before it gets its name).
On a filesystem without hard links, ``renameat2(RENAME_NOREPLACE)`` gives the same guarantee; the
new name is made durable with an fsync of the folder.

``swap`` (compare-and-swap, for leases) holds an ``flock`` on a sidecar lock file while it compares
and replaces: a local workspace is one machine's folder, where advisory locks hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from ..files import TMP_PREFIX, atomic_write, fsync_dir, fsync_file, open_new, temp_path_beside
from .base import Storage, check_key


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
        with atomic_write(self._path(key), "wb") as f:
            f.write(data)

    def create_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        if path.exists():  # cheap fast path; the link below is what makes it atomic
            return False
        tmp = temp_path_beside(path)
        try:
            with open_new(tmp) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return _publish_new(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, key: str, path: str | os.PathLike) -> bool:
        target = self._path(key)
        if target.exists():
            return False
        tmp = temp_path_beside(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                os.link(path, tmp)  # same filesystem: no copy (the source is never modified afterwards)
            except OSError:
                shutil.copyfile(path, tmp)
                fsync_file(tmp)
            return _publish_new(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def download_file(self, key: str, path: str | os.PathLike) -> str:
        source, target = self._path(key), Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist")
        digest = hashlib.sha256()
        with open(source, "rb") as src, atomic_write(target, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        return digest.hexdigest()

    def sizes(self, prefix: str = "") -> dict[str, int]:
        out = {}
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):
                out[key] = (self.root / key).stat().st_size
        return out

    def swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f"{TMP_PREFIX}lock-{path.name}")  # never listed (TMP_PREFIX)
        with open(lock, "a+b") as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = path.read_bytes() if path.is_file() else None
                if current != expected:
                    return False
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    with atomic_write(path, "wb") as f:
                        f.write(data)
                return True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

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
        key = key.rstrip("/")  # a prefix names a folder
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


def _publish_new(tmp: Path, path: Path) -> bool:
    """Give the complete file ``tmp`` the name ``path`` unless that name exists; True when it did."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP):
            raise
        # No hard links here (some FUSE/SMB mounts): an atomic rename that refuses to replace.
        if not _rename_noreplace(tmp, path):
            return False
    fsync_dir(path.parent)
    return True


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """``renameat2(src, dst, RENAME_NOREPLACE)``: False when ``dst`` exists. Linux only."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        raise OSError(errno.ENOSYS, "no hard links and no renameat2 on this platform: cannot create files exactly once here")
    if libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    raise OSError(err, f"renameat2 {src} -> {dst}: {os.strerror(err)}")
