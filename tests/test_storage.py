"""Storage backends: the same contract on a local folder and on gs:// (real client, fake-gcs-server)."""

from __future__ import annotations

import threading

import pytest

from inpars.errors import ConfigError
from inpars.storage import LocalStorage, fetch_local, open_storage


@pytest.fixture(params=["local", "gcs"])
def root_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("gcs_uri")


def test_open_storage_picks_backend(tmp_path):
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage(f"file://{tmp_path}").uri() == str(tmp_path)
    assert type(open_storage("gs://bucket/prefix")).__name__ == "GCSStorage"
    assert open_storage("gs://bucket/a/b/").uri("x/y.json") == "gs://bucket/a/b/x/y.json"
    with pytest.raises(ConfigError):
        open_storage("s3://bucket/x")


def test_read_write_missing(root_uri):
    s = open_storage(root_uri)
    with pytest.raises(FileNotFoundError):
        s.read_bytes("nope/x.json")
    assert not s.exists("a/b.txt")
    s.write_bytes("a/b.txt", b"one")
    assert s.exists("a/b.txt") and s.read_bytes("a/b.txt") == b"one"
    s.write_bytes("a/b.txt", b"two")  # overwrite
    assert s.read_bytes("a/b.txt") == b"two"
    s.delete("a/b.txt")
    s.delete("a/b.txt")  # absent: no error
    assert not s.exists("a/b.txt")
    with pytest.raises(ConfigError):
        s.read_bytes("../escape")


def test_create_if_absent(root_uri):
    s = open_storage(root_uri)
    assert s.create_if_absent("gen/shard-00000-of-00002.jsonl", b"first") is True
    assert s.create_if_absent("gen/shard-00000-of-00002.jsonl", b"second") is False
    assert s.read_bytes("gen/shard-00000-of-00002.jsonl") == b"first"


def test_create_if_absent_threads_race(root_uri):
    """Eight threads create one key with different content: exactly one wins, its bytes stay."""
    s = open_storage(root_uri)
    results: dict[int, bool] = {}
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        results[i] = open_storage(root_uri).create_if_absent("race/key", f"writer {i}".encode())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, created in results.items() if created]
    assert len(winners) == 1
    assert s.read_bytes("race/key") == f"writer {winners[0]}".encode()


def test_list_prefix_semantics(root_uri):
    s = open_storage(root_uri)
    for key in [
        "gen/shard-00001-of-00002.jsonl",
        "gen/shard-00000-of-00002.jsonl",
        "gen/shard-00000-of-00002.done.json",
        "gen/_checkpoints/shard-00000-of-00002/chunk-000000.jsonl",
        "genx/other",
        "top.json",
    ]:
        s.write_bytes(key, b"x")
    assert s.list("gen/shard-") == [
        "gen/shard-00000-of-00002.done.json",
        "gen/shard-00000-of-00002.jsonl",
        "gen/shard-00001-of-00002.jsonl",
    ]
    assert s.list("gen/") == ["gen/_checkpoints/shard-00000-of-00002/chunk-000000.jsonl"] + s.list("gen/shard-")
    assert "genx/other" in s.list("gen") and "top.json" in s.list("")
    assert s.list("missing/") == []


def test_upload_download_dir(root_uri, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 10)
    s = open_storage(root_uri)
    keys = s.upload_dir(src, "train/model")
    assert keys == ["train/model/config.json", "train/model/sub/weights.bin"]
    out = s.download_dir("train/model", tmp_path / "copy")
    assert (out / "config.json").read_text() == '{"a": 1}'
    assert (out / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 10
    with pytest.raises(FileNotFoundError):
        s.download_dir("train/none", tmp_path / "none")


def test_local_path_and_fetch(root_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("INPARS_CACHE", str(tmp_path / "cache"))
    s = open_storage(root_uri)
    s.write_bytes("data/beir/corpus.jsonl", b'{"_id": "d1", "text": "t"}\n')
    s.write_bytes("data/beir/qrels/test.tsv", b"q\td\t1\n")
    path = s.local_path("data/beir/corpus.jsonl")
    assert path.read_bytes() == b'{"_id": "d1", "text": "t"}\n'
    with pytest.raises(FileNotFoundError):
        s.local_path("data/missing.jsonl")
    # fetch_local: a single object and a whole folder (a BEIR layout given as gs://...)
    assert fetch_local(s.uri("data/beir/corpus.jsonl")).read_bytes() == path.read_bytes()
    folder = fetch_local(s.uri("data/beir"))
    assert (folder / "qrels" / "test.tsv").read_bytes() == b"q\td\t1\n"
    if root_uri.startswith("gs://"):
        assert str(folder).startswith(str(tmp_path / "cache"))
        # a replaced object is fetched again (cache keyed by generation)
        s.write_bytes("data/beir/corpus.jsonl", b"new\n")
        assert s.local_path("data/beir/corpus.jsonl").read_bytes() == b"new\n"


def test_gcs_object_replaced_during_every_download_caches_nothing(gcs_uri, tmp_path, monkeypatch):
    from google.api_core import exceptions
    from google.cloud.storage import Blob

    from inpars.errors import TransientError

    monkeypatch.setenv("INPARS_CACHE", str(tmp_path / "cache"))
    s = open_storage(gcs_uri)
    s.write_bytes("data/corpus.jsonl", b'{"_id": "d1", "text": "t"}\n')

    def replaced_meanwhile(blob, f, **kwargs):
        f.write(b'{"_id": "d1", "te')  # part of it, then the generation changed under the download
        raise exceptions.PreconditionFailed("generation changed")

    monkeypatch.setattr(Blob, "download_to_file", replaced_meanwhile)
    with pytest.raises(TransientError, match="replaced during each of 3 downloads"):
        s.local_path("data/corpus.jsonl")
    monkeypatch.undo()
    monkeypatch.setenv("INPARS_CACHE", str(tmp_path / "cache"))
    # nothing partial was cached: the next download gets the whole object
    assert s.local_path("data/corpus.jsonl").read_bytes() == b'{"_id": "d1", "text": "t"}\n'


def test_gcs_missing_bucket_is_permanent(gcs_emulator):
    from inpars.errors import InParsError

    s = open_storage("gs://no-such-bucket-xyz/p")
    with pytest.raises(InParsError):
        s.create_if_absent("k", b"x")


class _Always503:
    """A loopback HTTP server that answers every request with 503 (an overloaded GCS)."""

    def __enter__(self):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = b'{"error": {"code": 503, "message": "backend unavailable"}}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _reply

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_gcs_transient_errors_surface_as_transient(monkeypatch):
    """5xx and connection errors are retried by the client, then raised as TransientError."""
    pytest.importorskip("google.cloud.storage")
    from google.cloud.storage.retry import DEFAULT_RETRY

    from inpars.errors import TransientError
    from inpars.storage.gcs import GCSStorage

    short = DEFAULT_RETRY.with_timeout(1.0).with_delay(initial=0.05, maximum=0.2)
    with _Always503() as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        s = GCSStorage("gs://bucket/p", retry=short)
        for call in (lambda: s.read_bytes("k"), lambda: s.create_if_absent("k", b"x"), lambda: s.list("")):
            with pytest.raises(TransientError, match="gs://bucket/p"):
                call()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]  # nothing listens once the socket closes
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{dead}")
    with pytest.raises(TransientError):
        GCSStorage("gs://bucket/p", retry=short).exists("k")
