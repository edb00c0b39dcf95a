"""SIGTERM as a request to stop at the next safe point, so a preempted pod's grace period saves work.

Kubernetes (Spot VMs, TPU maintenance, node drains, a deleted Job) and the local launcher stop a
worker with SIGTERM, then SIGKILL after the grace period. :func:`install` turns SIGTERM into a flag;
code that can stop cleanly runs inside :func:`stoppable` and polls :func:`requested` at its safe
points (generation after each saved chunk, training between steps), saves, and raises
:class:`~inpars.errors.Preempted`, which the CLI turns into :data:`~inpars.errors.EXIT_TRANSIENT`.

Outside a :func:`stoppable` section nothing polls the flag, so SIGTERM keeps its default meaning
(the process ends at once, exit 143 as Kubernetes reports it): a stage that cannot checkpoint is not
left running until the SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from .errors import Preempted

log = logging.getLogger(__name__)

_requested = threading.Event()
_stoppable_depth = 0
_installed = False


def _on_sigterm(signum, frame) -> None:
    if _stoppable_depth == 0:
        # Nobody polls the flag here: behave as if no handler were installed.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if not _requested.is_set():
        log.warning("SIGTERM: stopping at the next checkpoint")
    _requested.set()


def install() -> bool:
    """Install the SIGTERM handler (main thread only; idempotent). Returns whether it is installed."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True
    return True


def installed() -> bool:
    return _installed


def requested() -> bool:
    """Whether a stop was asked for (SIGTERM, or :func:`request`)."""
    return _requested.is_set()


def request() -> None:
    """Ask for a stop as SIGTERM would (for a parent process forwarding the signal, and tests)."""
    _requested.set()


def reset() -> None:
    """Forget a stop request (a new piece of work in the same process; tests)."""
    _requested.clear()


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Mark a section that polls :func:`requested` at safe points; SIGTERM then only sets the flag."""
    global _stoppable_depth
    _stoppable_depth += 1
    try:
        yield
    finally:
        _stoppable_depth -= 1


def check(what: str) -> None:
    """Raise :class:`Preempted` (with ``what`` was saved) if a stop was asked for."""
    if _requested.is_set():
        raise Preempted(f"stopped on request (SIGTERM); {what}")
