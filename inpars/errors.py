"""Errors and the exit-code contract shared by the stage workers and the launchers.

A *permanent* error (bad input, bad config, an unknown prompt) will fail again on retry, so a
worker exits with :data:`EXIT_PERMANENT`; the local launcher and the Kubernetes ``podFailurePolicy``
both treat that code as "fail this shard, do not retry". Any other non-zero exit is transient.

:data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` in sysexits.h: "temporary failure, retry") means the
worker was asked to stop (SIGTERM: a Spot/TPU preemption, a node drain, a cancelled launcher), saved
its progress and left cleanly; a retry resumes from that checkpoint. It is not 143 (128 + SIGTERM)
on purpose: 143 is what a worker killed *before* it could save reports too, and logs should tell the
two apart. Both are retried; on Kubernetes the ``DisruptionTarget`` rule keeps a preemption from
counting against the shard's retries.
"""

from __future__ import annotations

EXIT_PERMANENT = 42
EXIT_PREEMPTED = 75


class InParsError(Exception):
    """A permanent error: retrying the same input will not help."""


class InputError(InParsError):
    """Bad input data; names the file and line (or the id) at fault."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(where + message)
        self.path, self.line = path, line


class ConfigError(InParsError):
    """A bad setting (unknown prompt, unknown backend, missing model)."""


class TransientError(Exception):
    """A failure that a retry may fix (network, preemption, a busy server)."""


class Preempted(TransientError):
    """The worker was asked to stop (SIGTERM) and stopped cleanly after saving its progress."""
