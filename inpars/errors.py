"""Errors and the exit-code contract shared by the stage workers and the launchers.

A *permanent* error (bad input, bad config, an unknown prompt) will fail again on retry, so a
worker exits with :data:`EXIT_PERMANENT`; the local launcher and the Kubernetes ``podFailurePolicy``
both treat that code as "fail this shard, do not retry". Any other non-zero exit is transient.
"""

from __future__ import annotations

EXIT_PERMANENT = 42


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
