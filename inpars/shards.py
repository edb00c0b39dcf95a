"""Deterministic assignment of rows to shards.

Shards are contiguous, balanced ranges of an input whose order is fixed (e.g. the seeded document
sample), so concatenating shards 0..n-1 reproduces the single-shard order exactly and a rerun of a
shard always sees the same rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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


# --------------------------------------------------------------------------------------------
# The pod environment contract: what a worker reads to know which shard it runs. Written once here;
# the Kubernetes renderer, the local executor and the worker all use these names.

COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes (Indexed Jobs) or the local executor
SHARD_COUNT_ENV = "INPARS_SHARD_COUNT"  # always set: the stage's full shard count (the -of-N of shard names)
SHARD_INDEXES_ENV = "INPARS_SHARD_INDEXES"  # resume Jobs only, "3,7,9": completion index i runs shard [i]
RUN_ID_ENV = "INPARS_RUN_ID"  # the run id (for logs)
# A multi-host TPU slice (a JobSet): one pod per host, all running the same shard. The completion
# index is then the host index; INPARS_SHARD_INDEXES repeats the shard once per host.
HOST_COUNT_ENV = "INPARS_HOST_COUNT"
DEVICE_ENV = "INPARS_DEVICE"  # cpu | cuda | tpu: the accelerator the pod was given (resources.<stage>)


def worker_env(shard_count: int, run_id: str | None = None, indexes: Sequence[int] | None = None, hosts: int = 1) -> dict[str, str]:
    """The contract variables for one stage's workers (the executors add ``JOB_COMPLETION_INDEX``).

    ``indexes``: the shards a resume Job runs, in completion-index order. ``hosts`` > 1: a
    multi-host slice; ``indexes`` then lists each host's shard.
    """
    env = {SHARD_COUNT_ENV: str(shard_count)}
    if run_id is not None:
        env[RUN_ID_ENV] = run_id
    if indexes is not None:
        env[SHARD_INDEXES_ENV] = ",".join(str(int(i)) for i in indexes)
    if hosts > 1:
        env[HOST_COUNT_ENV] = str(hosts)
    return env


def shard_index_from_env(default: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The shard index from ``JOB_COMPLETION_INDEX`` (set by Kubernetes Indexed Jobs).

    A resume Job runs only the missing shards: it has ``completions = len(missing)`` and lists the
    real shard numbers in ``INPARS_SHARD_INDEXES`` ("3,7,9"), which the completion index picks from.
    ``environ``: read this mapping instead of ``os.environ``.
    """
    env = os.environ if environ is None else environ
    value = env.get(COMPLETION_INDEX_ENV)
    if value is None:
        if default is None:
            raise ConfigError(f"no shard index given and {COMPLETION_INDEX_ENV} is not set")
        return default
    try:
        index = int(value)
    except ValueError:
        raise ConfigError(f"{COMPLETION_INDEX_ENV}={value!r} is not an integer") from None
    mapping = env.get(SHARD_INDEXES_ENV)
    if mapping:
        try:
            indexes = [int(i) for i in mapping.split(",") if i.strip()]
        except ValueError:
            raise ConfigError(f"{SHARD_INDEXES_ENV}={mapping!r} is not a list of integers") from None
        if not 0 <= index < len(indexes):
            raise ConfigError(f"{COMPLETION_INDEX_ENV}={index} is outside {SHARD_INDEXES_ENV}={mapping!r}")
        return indexes[index]
    return index


def shard_count_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """``INPARS_SHARD_COUNT`` (None when unset, e.g. a worker started by hand)."""
    env = os.environ if environ is None else environ
    value = env.get(SHARD_COUNT_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{SHARD_COUNT_ENV}={value!r} is not an integer") from None


def host_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(host index, host count)`` of a multi-host slice pod; ``(0, 1)`` everywhere else.

    Only host 0 of a slice should commit the shard: every host runs the same program (SPMD).
    """
    env = os.environ if environ is None else environ
    raw = env.get(HOST_COUNT_ENV)
    if not raw:
        return 0, 1
    try:
        hosts, host = int(raw), int(env.get(COMPLETION_INDEX_ENV, "0"))
    except ValueError:
        raise ConfigError(f"{HOST_COUNT_ENV}={raw!r} / {COMPLETION_INDEX_ENV} must be integers") from None
    if not 0 <= host < hosts:
        raise ConfigError(f"{COMPLETION_INDEX_ENV}={host} is outside the slice's {hosts} hosts")
    return host, hosts


def shard_name(index: int, count: int, ext: str) -> str:
    """``shard-00007-of-00064.jsonl`` — sortable, and says how many siblings to expect."""
    return f"shard-{index:05d}-of-{count:05d}.{ext.lstrip('.')}"
