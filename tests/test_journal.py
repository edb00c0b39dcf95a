"""The answer journal: local replay (torn last line ignored) and segments in a Storage (local and
fake-gcs-server), so a worker restarted on another machine never pays twice."""

from __future__ import annotations

import dataclasses

import pytest

from inpars.backends.base import Generation
from inpars.backends.journal import AnswerJournal, JournalSink, StorageJournalSink
from inpars.storage import open_storage


def _gen(i: int) -> Generation:
    return Generation(text=f"query {i}", tokens=[" query", f" {i}"], log_probs=[-0.5, -0.25], prompt_tokens=10, completion_tokens=3)


def test_local_journal_replays_and_ignores_a_torn_line(tmp_path):
    path = tmp_path / "j" / "journal.jsonl"
    journal = AnswerJournal(path)
    for i in range(3):
        journal.record(f"k{i}", _gen(i))
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "k9", "generation": {"te')  # a crash mid-write
    again = AnswerJournal(path)
    assert len(again) == 3 and again.get("k1") == _gen(1) and again.get("k9") is None
    again.record("k3", _gen(3))  # appends after the torn line: the new entry is still read back
    assert AnswerJournal(path).get("k3") == _gen(3)
    again.clear()
    assert not path.exists() and len(again) == 0


def _sink(uri: str) -> StorageJournalSink:
    return StorageJournalSink(open_storage(uri), "runs/r1/generate/_journal/shard-00000-of-00001")


def _check_segments(uri: str, machines) -> None:
    """``machines / name``: the local journal file of a worker on machine ``name``."""
    sink = _sink(uri)
    assert isinstance(sink, JournalSink)
    first = AnswerJournal(machines / "a.jsonl", sink, flush_every=2, flush_seconds=None)
    for i in range(5):
        first.record(f"k{i}", _gen(i))
    # 5 answers, flush_every 2: two segments written, the fifth answer only local so far
    keys = sink.storage.list(sink.prefix + "/")
    assert [k.rsplit("/", 1)[1] for k in keys] == ["seg-000001.jsonl", "seg-000002.jsonl"]
    assert len(list(sink.load())) == 4
    first.close()  # flushes the rest
    assert len(sink.storage.list(sink.prefix + "/")) == 3

    # another machine: an empty local journal, the same sink -> every answer replayed
    elsewhere = AnswerJournal(machines / "b.jsonl", _sink(uri))
    assert len(elsewhere) == 5 and elsewhere.get("k4") == _gen(4)

    # a twin appending with a stale idea of the next number takes the next free one, never overwrites
    twin = _sink(uri)
    twin._next = 2
    twin.append_segment([{"key": "k5", "generation": dataclasses.asdict(_gen(5))}])
    assert [k.rsplit("/", 1)[1] for k in twin.storage.list(twin.prefix + "/")][-1] == "seg-000004.jsonl"
    assert AnswerJournal(machines / "c.jsonl", _sink(uri)).get("k5") == _gen(5)

    # a crash before the flush: answers only in the local file are pushed on restart
    crashed_path = machines / "d.jsonl"
    lonely = AnswerJournal(crashed_path, None)
    lonely.record("k6", _gen(6))
    restarted = AnswerJournal(crashed_path, _sink(uri))
    restarted.flush()
    assert AnswerJournal(machines / "e.jsonl", _sink(uri)).get("k6") == _gen(6)

    restarted.clear()
    assert _sink(uri).storage.list(sink.prefix + "/") == [] and len(AnswerJournal(machines / "f.jsonl", _sink(uri))) == 0


def test_segments_in_local_storage(tmp_path):
    _check_segments(str(tmp_path / "workspace"), tmp_path / "machines")


def test_segments_in_gcs(tmp_path, gcs_uri):
    _check_segments(gcs_uri, tmp_path / "machines")


def test_flush_failure_keeps_answers_pending(tmp_path):
    class Flaky:
        def __init__(self):
            self.fail, self.segments = True, []

        def load(self):
            return [e for s in self.segments for e in s]

        def append_segment(self, entries):
            if self.fail:
                raise OSError("storage unreachable")
            self.segments.append(list(entries))

        def clear(self):
            self.segments.clear()

    sink = Flaky()
    journal = AnswerJournal(tmp_path / "j.jsonl", sink, flush_every=1)
    with pytest.raises(OSError):
        journal.record("k0", _gen(0))
    assert journal.get("k0") == _gen(0)  # recorded locally all the same
    sink.fail = False
    journal.record("k1", _gen(1))
    assert [e["key"] for s in sink.segments for e in s] == ["k0", "k1"]
