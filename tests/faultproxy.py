"""A fault-injecting HTTP proxy on loopback, in front of a real OpenAI-compatible server.

For each completion request (``POST .../completions``) it draws from a seeded RNG and either
forwards it or injects a fault, counting what it did:

- ``"429"``: answers 429 with ``Retry-After: 0`` or ``1``;
- ``"500"``: answers 500;
- ``"drop"``: closes the connection without an answer (the request never reaches the server);
- ``"stall"``: waits ``stall_s`` seconds, then closes (the client should time out first).

Draws are taken in arrival order, one per completion request, so the number of faults a run meets
is fixed by the seed and the number of prompts. ``mode="401"`` / ``"404"`` answers every completion
request with that status (the 401 body echoes the Authorization header, like a careless server).
``delay_s`` delays every forwarded completion request (an emulated network round trip).
``upstream_ok`` counts the server's successful answers per prompt: a prompt answered twice was
requested again after a success. Other requests (``/v1/models``, tokenize) pass through unchanged.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

FAULTS = ("429", "500", "drop", "stall")


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        rates: dict[str, float] | None = None,
        mode: str | None = None,
        stall_s: float = 3.0,
        delay_s: float = 0.0,
    ):
        rates = dict(rates or {})
        assert set(rates) <= set(FAULTS) and sum(rates.values()) < 1.0, rates
        self.upstream = upstream.rstrip("/")
        self.rates, self.mode, self.stall_s, self.delay_s = rates, mode, stall_s, delay_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: Counter = Counter()  # kind -> times injected
        self.upstream_ok: Counter = Counter()  # prompt -> successful upstream answers
        self.requests = 0  # completion requests received
        self.client = httpx.Client(timeout=300.0)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))  # loopback only
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()

    def draw(self) -> tuple[str | None, int]:
        """The fault for the next completion request (None: forward it) and a Retry-After value."""
        with self.lock:
            self.requests += 1
            r, retry_after = self.rng.random(), self.rng.choice((0, 1))
            edge = 0.0
            for kind in FAULTS:
                edge += self.rates.get(kind, 0.0)
                if r < edge:
                    self.faults[kind] += 1
                    return kind, retry_after
            return None, retry_after


def _prompt_of(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if "messages" in data:
        return data["messages"][-1]["content"]
    return str(data.get("prompt", ""))


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                self.close_connection = True

        def _forward(self, method: str, body: bytes | None) -> httpx.Response:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
            return proxy.client.request(method, proxy.upstream + self.path, content=body, headers=headers)

        def do_GET(self) -> None:
            r = self._forward("GET", None)
            self._reply(r.status_code, r.content)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.path.endswith("/completions"):
                r = self._forward("POST", body)
                return self._reply(r.status_code, r.content)
            if proxy.mode == "401":
                auth = self.headers.get("Authorization", "")
                msg = {"error": {"message": f"Incorrect API key provided: {auth}", "type": "invalid_request_error"}}
                return self._reply(401, json.dumps(msg).encode())
            if proxy.mode == "404":
                model = json.loads(body).get("model")
                msg = {"error": {"message": f"The model `{model}` does not exist", "type": "invalid_request_error"}}
                return self._reply(404, json.dumps(msg).encode())
            fault, retry_after = proxy.draw()
            if fault == "429":
                return self._reply(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": str(retry_after)})
            if fault == "500":
                return self._reply(500, b'{"error": {"message": "injected server error"}}')
            if fault in ("drop", "stall"):
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                self.close_connection = True  # no answer at all: the client sees a dropped connection
                return
            if proxy.delay_s:
                time.sleep(proxy.delay_s)  # an emulated network round trip
            r = self._forward("POST", body)
            if r.status_code == 200:
                with proxy.lock:
                    proxy.upstream_ok[_prompt_of(body)] += 1
            self._reply(r.status_code, r.content)

    return Handler
