"""The run-wide budget ledger: shards racing for blocks never book more than the budget, a retried
shard starts from what its earlier attempts used, unused blocks go back, a raised budget adds blocks."""

from __future__ import annotations

import threading

import pytest

from inpars.ledger import Ledger, run_spend
from inpars.storage import open_storage


@pytest.fixture(params=["local", "gcs"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "run")
    return open_storage(request.getfixturevalue("gcs_uri"))


def test_racing_shards_never_book_more_than_the_budget(storage):
    budget, shards = 1.0, 4
    spent: dict[str, float] = {}
    barrier = threading.Barrier(shards)

    def shard(i: int) -> None:
        ledger = Ledger(storage, budget, f"generate-{i}", shards=shards)
        barrier.wait()
        used = 0.0
        while ledger.ensure(used + 0.01):  # each request may cost up to one cent
            ledger.note_used(used + 0.01)
            used += 0.01
        spent[f"generate-{i}"] = used
        ledger.release_unused(used)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(spent.values()) <= budget + 1e-9
    assert sum(spent.values()) >= budget - shards * 0.01 - 1e-9  # the blocks are used, not wasted
    assert all(v > 0 for v in spent.values())  # every shard got a share
    marks = run_spend(storage)
    assert set(marks) == set(spent) and sum(marks.values()) <= budget + 1e-9


def test_a_retry_starts_from_what_earlier_attempts_used_and_resume_can_raise_it(storage):
    first = Ledger(storage, 1.0, "generate-0", shards=1)
    assert first.ensure(0.6)
    first.note_used(0.6)  # the attempt dies here, holding its blocks
    again = Ledger(storage, 1.0, "generate-0", shards=1)
    assert again.used_before == pytest.approx(0.6)
    assert again.ensure(0.4) and not again.ensure(0.41)  # one budget, across attempts
    raised = Ledger(storage, 2.0, "generate-0", shards=1)  # `resume --set generate.budget_usd=2`
    assert raised.block == again.block  # the block size was fixed when the run first booked
    assert raised.ensure(1.4) and not raised.ensure(1.41)
    raised.note_used(0.4)  # this attempt used 0.4: 1.0 in all
    assert raised.release_unused(0.4) == 8  # blocks beyond the used mark go back (8 of 16 kept)
    other = Ledger(storage, 2.0, "generate-1", shards=1)
    assert other.ensure(0.4)  # ... and another shard can book them
