"""An OpenAI-compatible server on loopback that answers at once, so that a benchmark times the pipeline, not a model.

The server is the tests' recording server (``tests/apiserver.py``); this module gives it answers made
for a corpus: ``POST .../completions`` and ``.../chat/completions`` answer with a query made of a few
words of the prompt's last ``Document:`` (not a contiguous run of them, so the filter does not drop it
as a copy), with per-token log-probs and usage; which words and log-probs depend only on the prompt, so
two runs get the same answers. Other paths (the tokenizer endpoints) answer 404, so the backend counts
tokens approximately (what it does against OpenAI's own API).

    with openai_stub() as stub:
        ... generate.base_url=stub.url + "/v1" ...   # len(stub.requests): the requests served
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from apiserver import ApiServer, Recorded, Reply, completion  # the tests' server

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


def answer_from_document(request: Recorded) -> Reply:
    """The stub's answer to one request (see the module doc)."""
    if not request.path.rstrip("/").endswith("completions"):
        return 404, {}, {"error": {"message": f"no route {request.path}"}}  # /tokenize etc.: approximate tokens
    body = request.body if isinstance(request.body, dict) else {}
    prompt = body["messages"][-1]["content"] if "messages" in body else body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    query, logprobs = stub_query(str(prompt))
    # The newline token ends the query; the backend drops it with its log-prob.
    return 200, {}, completion(body, text=f" {query}\n", logprob=[*logprobs, 0.0], prompt_tokens=len(str(prompt)) // 4)


def openai_stub() -> ApiServer:
    """The server, not yet started: use it as a context manager; ``url`` is ``http://127.0.0.1:<port>``."""
    return ApiServer(answer_from_document)
