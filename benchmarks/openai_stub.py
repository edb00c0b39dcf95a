"""An OpenAI-compatible server on loopback that answers at once, so that a benchmark times the pipeline, not a model.

``POST /v1/completions`` (and ``/v1/chat/completions``) answer with a query made of a few words of the
prompt's last ``Document:`` (not a contiguous run of them, so the filter does not drop it as a copy), with
per-token log-probs and usage; which words and log-probs depend only on the prompt, so two runs get the
same answers. ``GET /v1/models`` lists the model. Tokenizer endpoints answer 404, so the backend counts
tokens approximately (what it does against OpenAI's own API).

    with OpenAIStub() as stub:
        ... generate.base_url=stub.url + "/v1" ...
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

QUERY_WORDS = 6
WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]{2,}")


def stub_query(prompt: str) -> tuple[str, list[float]]:
    """A query from the words of the prompt's last document, and one log-prob per word; deterministic."""
    document = prompt.rsplit("Document:", 1)[-1].split("Relevant Query:", 1)[0]
    words = WORD.findall(document) or ["empty", "document", "query"]
    rng = random.Random(hashlib.sha256(prompt.encode("utf-8")).digest())
    # Every other word from a random start: a bag of the document's words, never a verbatim run of it.
    start = rng.randrange(max(len(words) - 2 * QUERY_WORDS, 1))
    picked = words[start : start + 2 * QUERY_WORDS : 2]
    return " ".join(picked), [round(-rng.uniform(0.05, 3.0), 4) for _ in picked]


def completion(body: dict) -> dict:
    """An answer in the OpenAI shape (text or chat completion) for a request ``body``."""
    chat = "messages" in body
    prompt = body["messages"][-1]["content"] if chat else body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    query, logprobs = stub_query(str(prompt))
    tokens = [" " + w for w in query.split(" ")]
    text = " " + query + "\n"
    usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(tokens), "total_tokens": len(prompt) // 4 + len(tokens)}
    if chat:
        content = [{"token": t, "logprob": v, "bytes": None, "top_logprobs": []} for t, v in zip(tokens, logprobs)]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": {"content": content}, "finish_reason": "stop"}
        return {"id": "stub", "object": "chat.completion", "created": 0, "model": body.get("model"), "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "logprobs": {"tokens": tokens, "token_logprobs": logprobs}, "finish_reason": "stop"}
    return {"id": "stub", "object": "text_completion", "created": 0, "model": body.get("model"), "choices": [choice], "usage": usage}


class OpenAIStub:
    """The server, in a daemon thread of this process; ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, model: str = "stub"):
        self.model = model
        self.requests = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))  # loopback only
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OpenAIStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(stub: OpenAIStub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers (every reply has a Content-Length)

        def log_message(self, *args) -> None:  # quiet
            pass

        def reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": stub.model, "object": "model", "owned_by": "stub"}]})
            else:
                self.reply(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?", 1)[0].rstrip("/")
            if path not in ("/v1/completions", "/v1/chat/completions"):
                self.reply(404, {"error": {"message": f"no route {path}"}})  # /tokenize etc.: approximate tokens
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self.reply(400, {"error": {"message": "body is not JSON"}})
                return
            with stub.lock:
                stub.requests += 1
            self.reply(200, completion(body))

    return Handler
