"""Google Cloud Storage (``gs://bucket/prefix``) through the official ``google-cloud-storage`` client.

Credentials: Application Default Credentials (Workload Identity on GKE, ``gcloud auth
application-default login`` on a laptop). With ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server in the
tests) the client goes anonymous to the emulator.

Exactly-once: ``create_if_absent`` uploads with ``if_generation_match=0`` ("only if no live object
exists"), so GCS itself arbitrates racing writers and answers the loser with 412. Small objects go as
one multipart request (the client picks that under 8 MiB); larger ones as resumable uploads, where
real GCS checks the precondition too (fake-gcs-server does not: tests keep objects small).

Errors: every call goes through the client's ``DEFAULT_RETRY`` (backoff on 429/5xx/connection errors,
up to 120 s). That is safe for ``create_if_absent`` too: with ``if_generation_match=0`` a retried
create that had in fact succeeded answers 412, and callers compare content. What still fails is raised as
:class:`~inpars.errors.TransientError` so a worker exits with a retryable code; permission and
missing-bucket errors are permanent (:class:`~inpars.errors.InParsError`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import ConfigError, InParsError, TransientError
from ..files import atomic_write, file_sha256
from .base import Storage, cache_root, check_key, join_key


def _clients():
    from google.cloud import storage

    return storage


class GCSStorage(Storage):
    scheme = "gs"

    @classmethod
    def is_available(cls) -> bool:
        try:
            _clients()
        except ImportError:
            return False
        return True

    def __init__(self, uri: str, client=None, retry=None):
        """``retry``: a ``google.api_core.retry.Retry`` for every call (default: the client's
        ``DEFAULT_RETRY``: exponential backoff on 429/5xx/connection errors for up to 120 s)."""
        if not uri.startswith("gs://"):
            raise ConfigError(f"not a gs:// URI: {uri!r}")
        bucket, _, prefix = uri[len("gs://") :].partition("/")
        if not bucket:
            raise ConfigError(f"no bucket in {uri!r}")
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        if retry is None:
            from google.cloud.storage.retry import DEFAULT_RETRY as retry
        self.retry = retry

    # The client is made on first use: opening a Storage must not need credentials.
    @property
    def client(self):
        if self._client is None:
            storage = _clients()
            try:
                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    from google.auth.credentials import AnonymousCredentials

                    self._client = storage.Client(project="inpars-emulator", credentials=AnonymousCredentials())
                else:
                    self._client = storage.Client()
            except Exception as e:  # google.auth.exceptions.DefaultCredentialsError and friends
                raise ConfigError(
                    f"cannot reach gs://{self.bucket_name}: no Google Cloud credentials ({e}). "
                    "Run `gcloud auth application-default login` or use Workload Identity."
                ) from None
        return self._client

    @property
    def bucket(self):
        return self.client.bucket(self.bucket_name)

    def _name(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _blob(self, key: str):
        return self.bucket.blob(self._name(key))

    def read_bytes(self, key: str) -> bytes:
        from google.api_core import exceptions

        with _errors(self.uri(key)):
            try:
                return self._blob(key).download_as_bytes(retry=self.retry)
            except exceptions.NotFound:
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        with _errors(self.uri(key)):
            # An overwrite of the same bytes is idempotent, so retrying it is safe.
            self._blob(key).upload_from_string(data, content_type=_content_type(key), retry=self.retry)

    def create_if_absent(self, key: str, data: bytes) -> bool:
        from google.api_core import exceptions

        with _errors(self.uri(key)):
            try:
                self._blob(key).upload_from_string(data, content_type=_content_type(key), if_generation_match=0, retry=self.retry)
            except exceptions.PreconditionFailed:
                return False
            return True

    def exists(self, key: str) -> bool:
        with _errors(self.uri(key)):
            return self._blob(key).exists(retry=self.retry)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        base = self.prefix + "/" if self.prefix else ""
        with _errors(self.uri(prefix)):
            blobs = self.client.list_blobs(self.bucket_name, prefix=base + prefix, retry=self.retry)
            return {b.name[len(base) :]: int(b.size or 0) for b in blobs}

    def swap(self, key: str, expected: bytes | None, data: bytes | None) -> bool:
        """Compare-and-swap on the object's generation: GCS itself refuses a write (412) or delete
        whose ``if_generation_match`` no longer holds, so two swappers never both win."""
        from google.api_core import exceptions

        with _errors(self.uri(key)):
            blob = self.bucket.get_blob(self._name(key), retry=self.retry)
            generation = 0 if blob is None else blob.generation
            if blob is None:
                if expected is not None:
                    return False
            else:
                try:
                    current = blob.download_as_bytes(if_generation_match=generation, retry=self.retry)
                except (exceptions.PreconditionFailed, exceptions.NotFound):
                    return False
                if current != expected:
                    return False
            try:
                if data is None:
                    if blob is not None:
                        self._blob(key).delete(if_generation_match=generation, retry=self.retry)
                else:
                    self._blob(key).upload_from_string(
                        data, content_type=_content_type(key), if_generation_match=generation, retry=self.retry
                    )
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                return False
            return True

    def upload_file(self, key: str, path: str | os.PathLike) -> bool:
        """Create ``key`` from a local file, streamed, only if absent (``if_generation_match=0``; real
        GCS checks it for resumable uploads of large files too)."""
        from google.api_core import exceptions

        with _errors(self.uri(key)):
            try:
                self._blob(key).upload_from_filename(str(path), content_type=_content_type(key), if_generation_match=0, retry=self.retry)
            except exceptions.PreconditionFailed:
                return False
            return True

    def download_file(self, key: str, path: str | os.PathLike) -> str:
        """Stream ``key`` into ``path`` (temp file + rename, never whole in memory); its sha256."""

        from google.api_core import exceptions

        with atomic_write(path, "wb") as f:
            with _errors(self.uri(key)):
                try:
                    self._blob(key).download_to_file(f, retry=self.retry)
                except exceptions.NotFound:
                    raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            f.flush()
            digest = file_sha256(f.name)  # of what was written
        return digest

    def list(self, prefix: str = "") -> list[str]:
        base = self.prefix + "/" if self.prefix else ""
        with _errors(self.uri(prefix)):
            names = [b.name for b in self.client.list_blobs(self.bucket_name, prefix=base + prefix, retry=self.retry)]
        return sorted(n[len(base) :] for n in names)

    def delete(self, key: str) -> None:
        from google.api_core import exceptions

        with _errors(self.uri(key)):
            with contextlib.suppress(exceptions.NotFound):
                self._blob(key).delete(retry=self.retry)

    def uri(self, key: str = "") -> str:
        return "gs://" + join_key(self.bucket_name, self.prefix, key)

    def local_path(self, key: str) -> Path:
        """Download ``key`` into the cache once; reuse it while the object's generation is unchanged."""
        from google.api_core import exceptions

        name = self._name(key)
        target = cache_root() / "gcs" / self.bucket_name / name
        stamp = target.with_name(f".{target.name}.generation")
        with _errors(self.uri(key)):
            blob = self.bucket.get_blob(name, retry=self.retry)
            if blob is None:
                raise FileNotFoundError(f"{self.uri(key)} does not exist")
            if target.exists() and stamp.exists() and stamp.read_text() == str(blob.generation):
                return target
            # Streamed to disk (a corpus can be gigabytes), pinned to the generation just read.
            with atomic_write(target, "wb") as f:
                for _ in range(3):
                    try:
                        f.seek(0)
                        f.truncate()
                        blob.download_to_file(f, if_generation_match=blob.generation, retry=self.retry)
                        break
                    except exceptions.PreconditionFailed:  # replaced meanwhile: take the new one
                        blob = self.bucket.get_blob(name, retry=self.retry)
                        if blob is None:
                            raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
                else:  # never one whole generation: keep nothing (a partial file would be cached for good)
                    raise TransientError(f"{self.uri(key)} was replaced during each of 3 downloads; retry later")
        with atomic_write(stamp, "wb") as f:
            f.write(str(blob.generation).encode())
        return target


def _content_type(key: str) -> str:
    if key.endswith(".json"):
        return "application/json"
    if key.endswith((".jsonl", ".tsv", ".txt", ".trec", ".md", ".log")):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


@contextlib.contextmanager
def _errors(where: str):
    """Map what survives the client's own retries onto the pipeline's transient/permanent errors."""
    from google.api_core import exceptions

    try:
        yield
    except (exceptions.TooManyRequests, exceptions.ServerError, exceptions.RetryError) as e:
        raise TransientError(f"{where}: {e}") from e
    except (exceptions.Forbidden, exceptions.Unauthorized) as e:
        raise InParsError(f"{where}: permission denied ({e.message if hasattr(e, 'message') else e})") from e
    except exceptions.NotFound as e:
        # Objects are handled by the callers; a NotFound reaching here is a missing bucket.
        raise InParsError(f"{where}: bucket not found ({e})") from e
    except FileNotFoundError:
        raise
    except (ConnectionError, TimeoutError) as e:
        raise TransientError(f"{where}: {e}") from e
    except Exception as e:
        # requests / google-auth transport errors without importing them eagerly
        mod = type(e).__module__
        if mod.startswith(("requests", "urllib3", "google.auth")) or "Timeout" in type(e).__name__:
            raise TransientError(f"{where}: {type(e).__name__}: {e}") from e
        raise
