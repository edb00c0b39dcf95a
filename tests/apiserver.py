"""A tiny OpenAI-compatible HTTP server on loopback that records every request, for tests that need
to see what the client sent (headers, paths, query) or a server that misbehaves on purpose.

``respond(request)`` returns ``(status, headers, body)`` for each POST; the default answers every
``.../completions`` and ``.../chat/completions`` request with a short query and its log-probs.
:func:`echo_authorization` makes a careless server that puts the credential it got into its answer.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str  # without the query string
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any
    at: float = field(default_factory=time.monotonic)


Reply = tuple[int, dict[str, str], Any]


def completion(
    body: dict,
    text: str = " what does aspirin do\nExample 3:",
    logprob: float | Sequence[float] = -0.25,
    prompt_tokens: int = 7,
) -> dict:
    """An answer in the OpenAI shape for ``body`` (completions or chat), with per-token log-probs:
    ``logprob`` for every token, or one value per token (words and newlines) in order."""
    words = [t for t in text.replace("\n", " \n ").split(" ") if t]
    tokens = [("" if t == "\n" else " ") + t for t in words]
    values = [logprob] * len(tokens) if isinstance(logprob, (int, float)) else list(logprob)
    if len(values) != len(tokens):
        raise ValueError(f"{len(values)} log-probs for {len(tokens)} tokens")
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens), "total_tokens": prompt_tokens + len(tokens)}
    if "messages" in body:
        content = [{"token": t, "logprob": v, "bytes": None, "top_logprobs": []} for t, v in zip(tokens, values)]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": {"content": content}, "finish_reason": "stop"}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model"), "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "logprobs": {"tokens": tokens, "token_logprobs": values}, "finish_reason": "stop"}
    return {"id": "c", "object": "text_completion", "created": 0, "model": body.get("model"), "choices": [choice], "usage": usage}


def answer_completions(request: Recorded) -> Reply:
    return 200, {}, completion(request.body)


def echo_authorization(transform: Callable[[str], str] = lambda credential: credential) -> Callable[[Recorded], Reply]:
    """A server that answers with ``transform(<the key it was sent>)`` inside the generated text."""

    def respond(request: Recorded) -> Reply:
        credential = request.headers.get("api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        return 200, {}, completion(request.body, text=f" debug {transform(credential)} query\n")

    return respond


class ApiServer:
    def __init__(self, respond: Callable[[Recorded], Reply] = answer_completions):
        self.respond = respond
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))  # loopback only
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(api: ApiServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers (every reply has a Content-Length)

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            url = urllib.parse.urlsplit(self.path)
            request = Recorded(
                "POST", url.path, dict(urllib.parse.parse_qsl(url.query)), {k.lower(): v for k, v in self.headers.items()}, body
            )
            with api.lock:
                api.requests.append(request)
            status, headers, payload = api.respond(request)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler
