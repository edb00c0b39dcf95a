"""Token counting and truncation for backends that do not hold the model: one small interface.

:class:`Tokenizer` has ``count(text)``, ``truncate(text, max_tokens)``, ``kind`` (what it is, for logs and
manifests) and ``exact`` (whether counts are the served model's own). Three kinds, tried in this order
by :func:`pick_tokenizer`:

- :class:`ServerTokenizer`: the server's own tokenize/detokenize endpoints (exact for the served model);
  flavours ``llama.cpp`` (C++ server), ``vllm`` and ``llama-cpp-python``, found by probing;
- :class:`HFTokenizer`: a local Hugging Face tokenizer (``generate.tokenizer``);
- :class:`ApproxTokenizer`: ~4 characters per token (no tokenizer at hand; budgets then book more).
"""

from __future__ import annotations

import logging
import math

import httpx

from ..errors import ConfigError, InParsError, TransientError

log = logging.getLogger(__name__)

APPROX_CHARS_PER_TOKEN = 4  # the documented fallback when no tokenizer is at hand (English text)


class Tokenizer:
    """Counts and cuts text in tokens (no special tokens added)."""

    kind = "base"
    exact = True  # counts are the served model's own (False: an estimate)

    def count(self, text: str) -> int:
        raise NotImplementedError

    def truncate(self, text: str, max_tokens: int) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections. Safe to call twice."""


class ServerTokenizer(Tokenizer):
    """The server's own tokenizer over HTTP (exact for the served model).

    Flavours: llama.cpp's C++ server and vLLM serve ``/tokenize`` + ``/detokenize`` at the root (with
    different bodies); llama-cpp-python's server serves ``/extras/tokenize`` + ``/extras/detokenize``.
    """

    FLAVOURS = ("llama.cpp", "vllm", "llama-cpp-python")

    def __init__(self, client: httpx.Client, root: str, model: str, flavour: str, offset: int = 0):
        self.client, self.root, self.model, self.flavour, self.offset = client, root, model, flavour, offset
        self.kind = f"server:{flavour}"

    @classmethod
    def probe(cls, root: str, model: str, headers: dict[str, str], timeout: float) -> ServerTokenizer | None:
        """The first flavour that ``root`` (the server URL without ``/v1``) answers, or None."""
        client = httpx.Client(headers=headers, timeout=min(timeout, 30.0))
        for flavour in cls.FLAVOURS:
            tokenizer = cls(client, root, model, flavour)
            try:
                tokens = tokenizer._tokenize("probe")
                empty = tokenizer._tokenize("")
            except (httpx.HTTPError, InParsError, KeyError, TypeError, ValueError):
                continue
            if tokens and all(isinstance(t, int) for t in tokens):
                tokenizer.offset = len(empty)  # special tokens (BOS) the server adds to any text
                return tokenizer
        client.close()
        return None

    def _tokenize(self, text: str) -> list[int]:
        if self.flavour == "llama.cpp":
            url, body = f"{self.root}/tokenize", {"content": text, "add_special": False}
        elif self.flavour == "vllm":
            url, body = f"{self.root}/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}
        else:
            url, body = f"{self.root}/extras/tokenize", {"model": self.model, "input": text}
        response = self.client.post(url, json=body)
        if response.status_code != 200:
            raise InParsError(f"{url}: HTTP {response.status_code}")
        return list(response.json()["tokens"])

    def _detokenize(self, tokens: list[int]) -> str:
        if self.flavour == "llama-cpp-python":
            url, body, key = f"{self.root}/extras/detokenize", {"model": self.model, "tokens": tokens}, "text"
        elif self.flavour == "vllm":
            url, body, key = f"{self.root}/detokenize", {"model": self.model, "tokens": tokens}, "prompt"
        else:
            url, body, key = f"{self.root}/detokenize", {"tokens": tokens}, "content"
        response = self.client.post(url, json=body)
        if response.status_code != 200:
            raise InParsError(f"{url}: HTTP {response.status_code}")
        return response.json()[key]

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except httpx.TransportError as e:
            raise TransientError(f"tokenizer endpoint of {self.root} unreachable ({type(e).__name__})") from None

    def count(self, text: str) -> int:
        return len(self._call(self._tokenize, text)) - self.offset

    def truncate(self, text: str, max_tokens: int) -> str:
        tokens = self._call(self._tokenize, text)[self.offset :]
        if len(tokens) <= max_tokens:
            return text
        # A cut inside a multi-byte character can fail to decode on the server: step back a token.
        for stop in range(max_tokens, max(max_tokens - 4, 0), -1):
            try:
                return self._call(self._detokenize, tokens[:stop])
            except InParsError:
                continue
        raise InParsError(f"{self.root}: could not detokenize a truncated document")

    def close(self) -> None:
        self.client.close()


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer (``generate.tokenizer``: packaged alias, HF id or path)."""

    def __init__(self, tokenizer, name: str):
        self.tok, self.kind = tokenizer, f"hf:{name}"

    @classmethod
    def load(cls, name: str | None) -> HFTokenizer | None:
        """The tokenizer ``name`` names, or None when no name is given."""
        if not name:
            return None
        from transformers import AutoTokenizer

        from ..models import resolve_model

        source = resolve_model(name)
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        try:
            return cls(AutoTokenizer.from_pretrained(source.name_or_path, **kwargs), source.identity)
        except OSError as e:
            raise ConfigError(f"generate.tokenizer {name!r} could not be loaded: {e}") from e

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tok.decode(ids[:max_tokens])


class ApproxTokenizer(Tokenizer):
    """No tokenizer at hand: ~4 characters per token (a rule of thumb for English; documents are
    cut at a word boundary). Counts are estimates, so budgets book prompts more conservatively."""

    kind = "approx"
    exact = False

    def count(self, text: str) -> int:
        return math.ceil(len(text) / APPROX_CHARS_PER_TOKEN)

    def truncate(self, text: str, max_tokens: int) -> str:
        limit = max_tokens * APPROX_CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        head = text[:limit]
        space = head.rfind(" ")
        return head[:space] if space > limit // 2 else head


def pick_tokenizer(
    server_root: str | None,
    model: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    local_name: str | None = None,
) -> Tokenizer:
    """The first of: the server's own tokenizer at ``server_root`` (None: do not probe, e.g. a hosted
    API known to have none), the local HF tokenizer ``local_name``, or :class:`ApproxTokenizer`."""
    tokenizer = (
        (ServerTokenizer.probe(server_root, model, headers or {}, timeout) if server_root else None)
        or HFTokenizer.load(local_name)
        or ApproxTokenizer()
    )
    log.info("%s: counting tokens with %s", server_root or model, tokenizer.kind)
    return tokenizer


__all__ = ["APPROX_CHARS_PER_TOKEN", "ApproxTokenizer", "HFTokenizer", "ServerTokenizer", "Tokenizer", "pick_tokenizer"]
