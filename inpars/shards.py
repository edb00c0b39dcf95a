"""Deterministic assignment of rows to shards.

Shards are contiguous, balanced ranges of an input whose order is fixed (e.g. the seeded document
sample), so concatenating shards 0..n-1 reproduces the single-shard order exactly and a rerun of a
shard always sees the same rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")


def shard_range(n_rows: int, index: int, count: int) -> range:
    """Rows ``[start, stop)`` of shard ``index`` of ``count`` over ``n_rows`` rows."""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard index {index} is not in [0, {count})")
    base, extra = divmod(n_rows, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def take_shard(rows: Sequence[T], index: int, count: int) -> list[T]:
    r = shard_range(len(rows), index, count)
    return list(rows[r.start : r.stop])


def shard_index_from_env(default: int | None = None) -> int:
    """The shard index from ``JOB_COMPLETION_INDEX`` (set by Kubernetes Indexed Jobs)."""
    value = os.environ.get("JOB_COMPLETION_INDEX")
    if value is None:
        if default is None:
            raise ConfigError("no shard index given and JOB_COMPLETION_INDEX is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"JOB_COMPLETION_INDEX={value!r} is not an integer") from None


def shard_name(index: int, count: int, ext: str) -> str:
    """``shard-00007-of-00064.jsonl`` — sortable, and says how many siblings to expect."""
    return f"shard-{index:05d}-of-{count:05d}.{ext.lstrip('.')}"
