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
    """The shard index from ``JOB_COMPLETION_INDEX`` (set by Kubernetes Indexed Jobs).

    A resume Job runs only the missing shards: it has ``completions = len(missing)`` and lists the
    real shard numbers in ``INPARS_SHARD_INDEXES`` ("3,7,9"), which the completion index picks from.
    """
    value = os.environ.get("JOB_COMPLETION_INDEX")
    if value is None:
        if default is None:
            raise ConfigError("no shard index given and JOB_COMPLETION_INDEX is not set")
        return default
    try:
        index = int(value)
    except ValueError:
        raise ConfigError(f"JOB_COMPLETION_INDEX={value!r} is not an integer") from None
    mapping = os.environ.get("INPARS_SHARD_INDEXES")
    if mapping:
        indexes = [int(i) for i in mapping.split(",") if i.strip()]
        if not 0 <= index < len(indexes):
            raise ConfigError(f"JOB_COMPLETION_INDEX={index} is outside INPARS_SHARD_INDEXES={mapping!r}")
        return indexes[index]
    return index


def shard_name(index: int, count: int, ext: str) -> str:
    """``shard-00007-of-00064.jsonl`` — sortable, and says how many siblings to expect."""
    return f"shard-{index:05d}-of-{count:05d}.{ext.lstrip('.')}"
