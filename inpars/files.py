"""Local files: written whole (a reader sees the old content or the new, never a part), and hashed.

:func:`atomic_write` is the one temp-file-then-rename in the package: the content goes to a temp file
in the target's folder (named with :data:`TMP_PREFIX`, which local workspaces never list), is fsynced,
then renamed over the target, and the rename is made durable with an fsync of the folder. A writer
that raises leaves the target as it was and no temp file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import InputError

TMP_PREFIX = ".tmp-"  # files being written; never listed as workspace files


def temp_path_beside(path: Path) -> Path:
    """A fresh temp name in ``path``'s folder (same filesystem, so a rename to ``path`` is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-{path.name}")


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """sha256 of a file, read in blocks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, int | str]:
    """``{"bytes", "sha256"}`` of a file: how manifests (checkpoints, the store, published datasets) list it."""
    return {"bytes": os.stat(path).st_size, "sha256": file_sha256(path)}


def check_files(folder: str | os.PathLike, files: Mapping[str, Mapping]) -> str | None:
    """None if every ``{name: {"bytes", "sha256"}}`` entry is a file in ``folder`` with that size and
    sha256 (sizes first: a cheap check before any hashing), else what is wrong with the first that is not."""
    try:
        for name, entry in files.items():
            path = Path(folder) / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
            if file_sha256(path) != entry["sha256"]:
                return f"{name} does not match its sha256"
    except (KeyError, TypeError, AttributeError):
        return "the manifest is malformed"
    return None


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; malformed JSON (or not UTF-8) is an :class:`~inpars.errors.InputError`
    naming the file: permanent, since a retry reads the same bytes."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"malformed JSON ({getattr(e, 'msg', None) or e})", path=str(path)) from None


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's content to disk (before it gets its final name)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a new name in ``folder`` (a link or a rename) durable: POSIX keeps it in the directory,
    which needs its own fsync. Best effort where the platform cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_new(path: Path, mode: str = "wb", **kwargs) -> IO:
    """``open(path, mode)``, making its folder (again, if a concurrent delete pruned the empty folder)."""
    for attempt in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return open(path, mode, **kwargs)
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8", newline: str | None = None) -> Iterator[IO]:
    """Write the whole file ``path`` through the yielded file object; it gets its name only when complete.

    ``mode`` is ``"w"`` (text, ``encoding``/``newline`` as :func:`open`) or ``"wb"``. The folder is
    made if missing. If the body raises, the target keeps its old content (or stays absent) and the
    temp file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = temp_path_beside(path)
    text = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    try:
        with open_new(tmp, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
