"""The answer journal: every paid answer recorded the moment it arrives, replayed after a restart.

Checkpoints save whole chunks; the journal is what makes a worker that crashed mid-chunk never pay
twice for a document it already had answered. An entry is ``{"key": <request hash>, "generation":
{...}}``, one JSON line.

- The local file (:class:`AnswerJournal` ``local_path``) is appended and fsynced per answer; a torn last
  line (a crash mid-write) is ignored on replay.
- An optional durable :class:`JournalSink` (e.g. :class:`StorageJournalSink`: create-only segment objects
  ``seg-000001.jsonl`` under a workspace prefix) receives the answers in segments every ``flush_every``
  answers or ``flush_seconds`` seconds, so a worker restarted on *another* machine replays them too. What
  was not yet flushed when a machine died is paid again (at most one segment's worth).

>>> journal = AnswerJournal(tmp / "journal.jsonl")  # doctest: +SKIP
>>> journal.record(key, generation); journal.get(key)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .base import Generation

if TYPE_CHECKING:  # pragma: no cover
    from ..storage import Storage

Entry = dict[str, Any]  # {"key": str, "generation": {Generation fields}}


@runtime_checkable
class JournalSink(Protocol):
    """Durable storage for journal entries, written in whole segments."""

    def load(self) -> Iterable[Entry]:
        """Every entry stored so far (any order; duplicates allowed)."""

    def append_segment(self, entries: list[Entry]) -> None:
        """Store ``entries`` durably as one new segment (never overwriting another)."""

    def clear(self) -> None:
        """Remove every segment (once the answers are committed elsewhere)."""


class AnswerJournal:
    """Answers by request key: a local append-only file, optionally mirrored to a :class:`JournalSink`.

    Thread-safe. ``flush_every`` / ``flush_seconds`` bound how many answers a lost machine can take with
    it when a remote sink is set (checked as answers arrive; :meth:`flush` forces it).
    """

    def __init__(
        self,
        local_path: str | os.PathLike,
        remote: JournalSink | None = None,
        *,
        flush_every: int = 32,
        flush_seconds: float | None = 60.0,
    ):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = Path(local_path)
        self.remote = remote
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._answers: dict[str, Generation] = {}
        self._pending: list[Entry] = []  # recorded locally, not yet in the remote sink
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8", errors="replace") if self.path.exists() else ""
        # A torn last line has no newline: the next entry must start on a line of its own, or it would
        # be glued to the torn one and lost on the next replay.
        self._torn_tail = bool(text) and not text.endswith("\n")
        local = _parse_lines(text)
        remote_keys: set[str] = set()
        if self.remote is not None:
            for entry in self.remote.load():
                if (generation := _generation(entry)) is not None:
                    self._answers[entry["key"]] = generation
                    remote_keys.add(entry["key"])
        for entry in local:
            if (generation := _generation(entry)) is not None:
                self._answers[entry["key"]] = generation
                if self.remote is not None and entry["key"] not in remote_keys:
                    self._pending.append(entry)  # answered here before a crash, never flushed: flush it now

    def __len__(self) -> int:
        return len(self._answers)

    def __contains__(self, key: str) -> bool:
        return key in self._answers

    def get(self, key: str) -> Generation | None:
        """The recorded answer for ``key``, or None."""
        return self._answers.get(key)

    def record(self, key: str, generation: Generation) -> None:
        """Append the answer to the local file (fsynced before returning); flush to the sink when due."""
        entry = {"key": key, "generation": dataclasses.asdict(generation)}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            if self._torn_tail:
                line, self._torn_tail = "\n" + line, False
            self._answers[key] = generation
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if self.remote is None:
                return
            self._pending.append(entry)
            due = len(self._pending) >= self.flush_every or (
                self.flush_seconds is not None and time.monotonic() - self._last_flush >= self.flush_seconds
            )
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the answers not yet in the remote sink as one segment (no-op without a sink)."""
        with self._lock:
            if self.remote is None or not self._pending:
                return
            pending, self._pending = self._pending, []
            try:
                self.remote.append_segment(pending)
            except BaseException:
                self._pending = pending + self._pending  # keep them for the next try
                raise
            self._last_flush = time.monotonic()

    def clear(self) -> None:
        """Forget every answer: delete the local file and the sink's segments (after the commit)."""
        with self._lock:
            self._answers.clear()
            self._pending.clear()
            self.path.unlink(missing_ok=True)
            self._torn_tail = False
            if self.remote is not None:
                self.remote.clear()

    def close(self) -> None:
        """Flush what is pending. Safe to call twice."""
        self.flush()

    def __repr__(self) -> str:
        return f"AnswerJournal({str(self.path)!r}, remote={self.remote!r}, answers={len(self._answers)})"


class StorageJournalSink:
    """Journal segments as create-only objects ``<prefix>/seg-000001.jsonl`` in a :class:`~inpars.storage.Storage`.

    A segment is written whole with :meth:`~inpars.storage.Storage.create_if_absent`, so a twin worker
    appending at the same time takes the next number instead of overwriting; readers never see a
    partial segment.
    """

    pattern = re.compile(r"seg-(\d+)\.jsonl$")

    def __init__(self, storage: Storage, prefix: str):
        self.storage = storage
        self.prefix = prefix.strip("/")
        self._next: int | None = None  # the next free segment number, found by listing once

    def _key(self, number: int) -> str:
        return f"{self.prefix}/seg-{number:06d}.jsonl" if self.prefix else f"seg-{number:06d}.jsonl"

    def _segments(self) -> list[tuple[int, str]]:
        keys = self.storage.list(f"{self.prefix}/" if self.prefix else "")
        found = []
        for key in keys:
            tail = key[len(self.prefix) + 1 :] if self.prefix else key
            if "/" not in tail and (m := self.pattern.fullmatch(tail)):
                found.append((int(m.group(1)), key))
        return sorted(found)

    def load(self) -> Iterable[Entry]:
        entries: list[Entry] = []
        for _, key in self._segments():
            try:
                data = self.storage.read_bytes(key)
            except FileNotFoundError:  # cleared meanwhile
                continue
            entries += _parse_lines(data.decode("utf-8", "replace"))
        return entries

    def append_segment(self, entries: list[Entry]) -> None:
        if not entries:
            return
        data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
        if self._next is None:
            segments = self._segments()
            self._next = segments[-1][0] + 1 if segments else 1
        while not self.storage.create_if_absent(self._key(self._next), data):
            self._next += 1  # a twin took this number: the next one
        self._next += 1

    def clear(self) -> None:
        for _, key in self._segments():
            self.storage.delete(key)
        self._next = None

    def __repr__(self) -> str:
        return f"StorageJournalSink({self.storage.uri(self.prefix)!r})"


def _parse_lines(text: str) -> list[Entry]:
    """The well-formed entries of a journal text; a torn or foreign line is skipped."""
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("generation"), dict):
            entries.append(entry)
    return entries


def _generation(entry: Entry) -> Generation | None:
    try:
        return Generation(**entry["generation"])
    except TypeError:  # fields of another version of Generation
        return None


__all__ = ["AnswerJournal", "JournalSink", "StorageJournalSink"]
