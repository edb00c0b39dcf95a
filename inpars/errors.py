"""Errors and the exit-code contract shared by the stage workers and the launchers.

A *permanent* error (bad input, bad config, an unknown prompt) will fail again on retry, so a
worker exits with :data:`EXIT_PERMANENT`; the local launcher and the Kubernetes ``podFailurePolicy``
both treat that code as "fail this shard, do not retry". Any other non-zero exit is transient.

:data:`EXIT_TRANSIENT` (75, ``EX_TEMPFAIL`` in sysexits.h: "temporary failure, retry") is the exit of
a transient failure (:class:`TransientError`); a :class:`Preempted` worker exits with it too: it was asked to stop (SIGTERM: a Spot/TPU preemption, a node drain, a cancelled launcher), saved
its progress and left cleanly; a retry resumes from that checkpoint. It is not 143 (128 + SIGTERM)
on purpose: 143 is what a worker killed *before* it could save reports too, and logs should tell the
two apart. Both are retried; on Kubernetes the ``DisruptionTarget`` rule keeps a preemption from
counting against the shard's retries.
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


# A transient failure (a worker's, or the launcher's when retries ran out): a retry or
# `inpars-launch resume` may succeed later. EX_TEMPFAIL in sysexits.h.
EXIT_TRANSIENT = 75


def exit_code(error: BaseException) -> int:
    """The exit code a command ends with for ``error``: 42 permanent, 75 transient, 1 unexpected."""
    if isinstance(error, InParsError):
        return EXIT_PERMANENT
    if isinstance(error, TransientError):
        return EXIT_TRANSIENT
    return 1


def cli_errors(fn):
    """Turn the pipeline's errors into one readable line on stderr and their exit code (no traceback);
    anything unexpected keeps its traceback and exits 1, which launchers retry."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InParsError, TransientError) as e:
            from .secrets import redact, secret_values

            if isinstance(e, InParsError):
                kind = "error"
            elif isinstance(e, Preempted):
                kind = "preempted"  # asked to stop (SIGTERM) after saving; a retry resumes
            else:
                kind = "transient error (retry or resume later)"
            print(f"{kind}: {redact(str(e), secret_values())}", file=sys.stderr, flush=True)
            raise SystemExit(exit_code(e)) from None

    return wrapper


class Preempted(TransientError):
    """The worker was asked to stop (SIGTERM) and stopped cleanly after saving its progress."""
