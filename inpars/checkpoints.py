"""Where training checkpoints are kept: a small interface, a local-folder implementation, and the
manifest that tells a complete checkpoint from a torn one.

A checkpoint is a folder of files (weights, optimizer, RNG and data-order state; see
:mod:`inpars.train`). Stored, it carries ``manifest.json``, written *last*, listing every file with
its size and sha256: a checkpoint without a manifest, or with a file that does not match it, was
cut short (a kill mid-upload, a full disk) and is skipped, never loaded.

:class:`TrainCheckpointer` is what :func:`inpars.train.train_model` needs; :class:`LocalCheckpointer`
keeps checkpoints in a local folder. A workspace-backed implementation (create-only objects under
``train/_checkpoints/step-NNNNNNNNN/``, the manifest last) needs only :func:`folder_manifest` and
:func:`verify_folder`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

from .files import atomic_write, check_files, file_entry, fsync_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{9})$")


class TrainCheckpointer(Protocol):
    """Stores training checkpoints and finds the newest complete one."""

    def save(self, step: int, folder: Path) -> None:
        """Store the files of ``folder`` as the checkpoint of ``step`` (the manifest last)."""

    def latest(self) -> tuple[int, Path] | None:
        """(step, a local folder holding its files) of the newest complete checkpoint, or None."""


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def folder_manifest(folder: Path, step: int) -> dict[str, Any]:
    """The manifest of ``folder``'s files (the manifest itself excluded)."""
    files = {p.name: file_entry(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"step": step, "files": files}


def verify_folder(folder: Path, manifest: dict[str, Any]) -> str | None:
    """None if every file of ``manifest`` is in ``folder`` with its size and sha256, else what is wrong."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return check_files(folder, files) if isinstance(files, dict) else "the manifest is malformed"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


class LocalCheckpointer:
    """Checkpoints in ``root/step-NNNNNNNNN/``; the newest ``keep`` complete ones are kept."""

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def __repr__(self) -> str:
        return f"LocalCheckpointer({str(self.root)!r})"

    def save(self, step: int, folder: Path) -> None:
        dest = self.root / step_dir_name(step)
        manifest = folder_manifest(folder, step)
        existing = read_manifest(dest)
        if existing is not None and verify_folder(dest, existing) is None:
            return  # a twin stored this step already (same inputs, same state)
        if dest.exists():
            shutil.rmtree(dest)  # a torn attempt at this step
        dest.mkdir(parents=True)
        for name in manifest["files"]:
            shutil.copyfile(Path(folder) / name, dest / name)
            fsync_file(dest / name)
        with atomic_write(dest / MANIFEST) as f:  # the manifest appears last and whole
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self._prune()

    def steps(self) -> list[int]:
        """Steps of the checkpoint folders present (complete or not), newest first."""
        if not self.root.is_dir():
            return []
        found = (STEP_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def latest(self) -> tuple[int, Path] | None:
        for step in self.steps():
            folder = self.root / step_dir_name(step)
            manifest = read_manifest(folder)
            problem = "no manifest (cut short)" if manifest is None else verify_folder(folder, manifest)
            if problem is None and manifest.get("step") != step:
                problem = f"the manifest is for step {manifest.get('step')}"
            if problem is None:
                return step, folder
            log.warning("skipping checkpoint %s: %s", folder, problem)
        return None

    def _prune(self) -> None:
        complete = 0
        for step in self.steps():
            folder = self.root / step_dir_name(step)
            if complete >= self.keep:
                shutil.rmtree(folder, ignore_errors=True)
            elif read_manifest(folder) is not None:
                complete += 1

    def clear(self) -> None:
        """Delete every checkpoint (after the trained model is stored)."""
        shutil.rmtree(self.root, ignore_errors=True)


class StorageCheckpointer:
    """Checkpoints in a workspace (:mod:`inpars.storage`: a local folder or gs://), so a training
    restarted on another node resumes: files are uploaded under ``<uri>/step-NNNNNNNNN/``, the manifest
    last (create-only); :meth:`latest` downloads the newest complete one into ``scratch`` and checks it.

    Holds only URIs, so it pickles into the ranks of a multi-process run (rank 0 saves)."""

    def __init__(self, uri: str, scratch: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.uri, self.scratch, self.keep = str(uri).rstrip("/"), Path(scratch), keep

    def __repr__(self) -> str:
        return f"StorageCheckpointer({self.uri!r})"

    @property
    def storage(self):
        from .storage import open_storage

        return open_storage(self.uri)

    def save(self, step: int, folder: Path) -> None:
        storage = self.storage
        name = step_dir_name(step)
        manifest = folder_manifest(folder, step)
        payload = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        if storage.exists(f"{name}/{MANIFEST}"):
            return  # stored already (a twin, or this step saved before a preemption)
        for file in manifest["files"]:
            key = f"{name}/{file}"
            if not storage.upload_file(key, Path(folder) / file):  # a torn attempt's leftover: replace it
                storage.delete(key)
                storage.upload_file(key, Path(folder) / file)
        storage.create_if_absent(f"{name}/{MANIFEST}", payload)  # the manifest last: now it is complete
        self._prune(storage)

    def steps(self) -> list[int]:
        found = {STEP_DIR.match(key.split("/", 1)[0]) for key in self.storage.list("step-")}
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def latest(self) -> tuple[int, Path] | None:
        storage = self.storage
        for step in self.steps():
            name = step_dir_name(step)
            try:
                manifest = json.loads(storage.read_bytes(f"{name}/{MANIFEST}"))
            except (FileNotFoundError, ValueError):
                log.warning("skipping checkpoint %s/%s: no manifest (cut short)", self.uri, name)
                continue
            local = self.scratch / name
            try:
                for file in manifest.get("files", {}):
                    storage.download_file(f"{name}/{file}", local / file)
            except FileNotFoundError as e:
                log.warning("skipping checkpoint %s/%s: %s", self.uri, name, e)
                continue
            problem = verify_folder(local, manifest)
            if problem is None and manifest.get("step") == step:
                return step, local
            log.warning("skipping checkpoint %s/%s: %s", self.uri, name, problem or "the manifest is for another step")
        return None

    def _prune(self, storage) -> None:
        complete = 0
        for step in self.steps():
            name = step_dir_name(step)
            if complete >= self.keep:
                for key in storage.list(f"{name}/"):
                    storage.delete(key)
            elif storage.exists(f"{name}/{MANIFEST}"):
                complete += 1

    def clear(self) -> None:
        """Delete every checkpoint (after the trained model is committed)."""
        storage = self.storage
        for key in storage.list(""):
            storage.delete(key)
        shutil.rmtree(self.scratch, ignore_errors=True)
