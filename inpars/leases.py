"""Leases: at most one live worker per shard, across processes, machines and launchers.

A lease is a small object ``<stage>/_leases/shard-i-of-n.json`` holding who has the shard and until
when. It is taken create-only, renewed by a heartbeat thread with a compare-and-swap
(:meth:`inpars.storage.Storage.swap`, a generation match on GCS), and taken over only once it has
expired (its holder died without releasing it: SIGKILL, a lost node). So a twin started by a
``resume`` while an old worker still runs waits instead of paying for the same requests again, and a
worker whose lease was taken over (it stalled longer than the lease) finds out at its next heartbeat
and stops before it commits.

Expiry compares wall clocks of different machines; the lease time (``INPARS_LEASE_SECONDS``, 60 s by
default) is far above the clock skew of NTP-synchronised nodes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from .errors import TransientError
from .storage import Storage

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 60.0


def lease_seconds() -> float:
    return float(os.environ.get("INPARS_LEASE_SECONDS") or DEFAULT_SECONDS)


class LeaseLost(TransientError):
    """Another worker took the shard over (this one stalled past its lease): stop, do not commit."""


class ShardBusy(TransientError):
    """A live worker holds the shard; retry later."""


class Lease:
    """One worker's claim on one shard. Use as a context manager around the shard's work::

    with Lease(storage, key).acquire(done=lambda: run.shard_done(...)) as lease:
        ...            # lease.check() before committing
    """

    def __init__(self, storage: Storage, key: str, *, seconds: float | None = None):
        self.storage, self.key = storage, key
        self.seconds = seconds or lease_seconds()
        self.holder = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self.taken_over: dict | None = None  # the expired lease this one replaced, if any
        self._content: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps(
            {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "renewed_at": now, "expires_at": now + self.seconds},
            sort_keys=True,
        ).encode()

    def current(self) -> dict | None:
        """The lease as stored now (None when free)."""
        try:
            return json.loads(self.storage.read_bytes(self.key))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"expires_at": 0}  # unreadable: treat as expired

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired; True when this worker now holds it."""
        payload = self._payload()
        if self.storage.create_if_absent(self.key, payload):
            self._content, self.held = payload, True
            return True
        try:
            existing = self.storage.read_bytes(self.key)
        except FileNotFoundError:
            return False  # released meanwhile: the caller tries again
        try:
            info = json.loads(existing)
            expired = time.time() > float(info.get("expires_at", 0))
        except (ValueError, TypeError, UnicodeDecodeError):
            info, expired = {}, True
        if not expired:
            return False
        if self.storage.swap(self.key, existing, payload):
            log.warning("took over the expired lease %s (held by %s pid %s)", self.key, info.get("host"), info.get("pid"))
            self._content, self.held, self.taken_over = payload, True, info
            return True
        return False

    def acquire(self, *, done: Callable[[], bool] = lambda: False, wait: float | None = None, poll: float = 1.0) -> Lease | None:
        """Hold the lease (and start the heartbeat), waiting up to ``wait`` seconds (default: as long
        as its holder keeps it alive: a twin waits for the other worker, and takes over if that one
        dies). Returns None when ``done()`` turns true while waiting (another worker finished the
        shard); raises :class:`ShardBusy` when a live worker still holds it after ``wait``."""
        deadline = float("inf") if wait is None else time.monotonic() + wait
        while True:
            if done():
                return None
            if self.try_acquire():
                self._start_heartbeat()
                return self
            if time.monotonic() > deadline:
                holder = self.current() or {}
                raise ShardBusy(
                    f"{self.key}: a live worker holds this shard (host {holder.get('host')}, pid {holder.get('pid')}); retry later"
                )
            time.sleep(poll)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease:{self.key}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except LeaseLost:
                log.error("lost the lease %s: another worker took this shard over", self.key)
                return
            except Exception as e:  # a storage hiccup: try again at the next beat
                log.warning("could not renew the lease %s: %s", self.key, e)

    def renew(self) -> None:
        payload = self._payload()
        if not self.held or not self.storage.swap(self.key, self._content, payload):
            self.lost, self.held = True, False
            raise LeaseLost(f"lost the lease on {self.key}: another worker took this shard over")
        self._content = payload

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this worker still holds the lease (call before committing)."""
        if self.lost or not self.held:
            raise LeaseLost(f"lost the lease on {self.key}: another worker took this shard over")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held and self._content is not None:
            try:
                self.storage.swap(self.key, self._content, None)
            except Exception as e:  # the lease expires by itself anyway
                log.warning("could not release the lease %s: %s", self.key, e)
        self.held = False

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
