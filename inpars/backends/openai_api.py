"""Generation through an OpenAI-compatible HTTP API: OpenAI, vLLM or llama.cpp servers.

One prompt per request (llama.cpp's server rejects batched prompts), ``concurrency`` requests in
flight on one asyncio loop, results in input order. Retries are ours (the HTTP client never
retries): 429 honours ``Retry-After``; 5xx, timeouts and dropped connections back off exponentially
with full jitter; 401/403/404 stop at once with a clear message. A :class:`~inpars.usage.BudgetGuard`
books every request's worst-case cost before it is sent, so a run with ``budget_usd`` stops *before*
exceeding it and hands back the rows finished so far (:class:`~inpars.usage.BudgetExceeded`).

The API key is read from the environment variable named by ``api_key_env`` and only ever put in
the ``Authorization`` header: it is not stored in the config, shown by ``repr`` or put in an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import ConfigError, InParsError, TransientError
from ..usage import BudgetExceeded, BudgetGuard, PriceTable, Reservation, Usage
from .base import Generation, GenerationBackend, cut_at_newline

if TYPE_CHECKING:  # pragma: no cover
    from ..config import GenerateConfig

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
LOGPROB_FLOOR = -100.0  # stands in for a missing / -inf log-prob so that every value stays finite
APPROX_CHARS_PER_TOKEN = 4  # the documented fallback when no tokenizer is at hand (English text)


class OpenAIBackend(GenerationBackend):
    """Queries from an OpenAI-compatible ``/v1/completions`` (or ``/v1/chat/completions``) endpoint."""

    name = "openai"
    # Full-jitter backoff: sleep uniform(0, min(cap, base * 2**attempt)) seconds before retry `attempt`.
    backoff_base = 0.5
    backoff_cap = 20.0
    retry_after_cap = 120.0  # longest Retry-After we wait for one retry

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        chat: bool = False,
        concurrency: int = 8,
        max_retries: int = 8,
        request_timeout: float = 60.0,
        prices: dict[str, float] | None = None,
        budget_usd: float | None = None,
        tokenizer: str | None = None,
    ):
        if concurrency < 1:
            raise ConfigError(f"generate.concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ConfigError(f"generate.max_retries must be >= 0, got {max_retries}")
        if request_timeout <= 0:
            raise ConfigError(f"generate.request_timeout must be > 0, got {request_timeout}")
        self.model = model
        self.base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"generate.base_url must start with http:// or https://, got {self.base_url!r}")
        self.api_key_env = api_key_env
        self.chat = chat
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.endpoint = f"{self.base_url}/{'chat/completions' if chat else 'completions'}"
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key and self.base_url == OPENAI_BASE_URL:
            raise ConfigError(f"the OpenAI API needs a key: set the environment variable {api_key_env}")
        # The key lives only in this header dict (never in a field that repr/logs/rows show).
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._secret = key or None  # kept only to scrub it from any server text we quote
        self.prices = PriceTable.for_model(model, prices)
        self.budget = BudgetGuard(budget_usd, self.prices)
        self.usage = Usage()  # cumulative over every generate() call of this backend
        self.last_usage = Usage()  # what the latest generate() call spent
        self._tokenizer_name = tokenizer
        self._tokenizer: _Tokenizer | None = None  # picked on first use (see _get_tokenizer)
        self._journal: Path | None = None
        self._answered: dict[str, Generation] = {}
        self.replayed = 0  # answers served from the journal instead of a new (paid) request

    def use_journal(self, path: str | os.PathLike) -> None:
        """Record every answer in ``path`` the moment it arrives, and replay answers already there.

        Checkpoints only save whole chunks; the journal is what makes a worker that crashed mid-chunk
        never pay for a document it already had answered. A torn last line (a crash mid-write) is ignored.
        """
        self._journal = Path(path)
        self._answered = {}
        if self._journal.exists():
            for line in self._journal.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._answered[entry["key"]] = Generation(**entry["generation"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def _answer_key(self, prompt: str, params: dict[str, Any]) -> str:
        material = json.dumps({"endpoint": self.endpoint, "params": params, "prompt": prompt}, sort_keys=True)
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    def _record(self, key: str, generation: Generation) -> None:
        self._answered[key] = generation
        if self._journal is None:
            return
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self._journal, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "generation": dataclasses.asdict(generation)}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def from_config(cls, config: GenerateConfig) -> OpenAIBackend:
        return cls(
            config.model,
            base_url=config.base_url,
            api_key_env=config.api_key_env,
            chat=config.chat,
            concurrency=config.concurrency,
            max_retries=config.max_retries,
            request_timeout=config.request_timeout,
            prices=config.prices or None,
            budget_usd=config.budget_usd,
            tokenizer=getattr(config, "tokenizer", None),
        )

    @classmethod
    def is_available(cls) -> bool:
        return True  # httpx is a core dependency

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, chat={self.chat}, concurrency={self.concurrency})"

    @property
    def model_identity(self) -> str:
        return self.model

    @property
    def cost_usd(self) -> float:
        """What the answered requests cost so far, at :attr:`prices` (0 for unknown prices)."""
        return self.budget.spent

    def usage_summary(self) -> dict[str, Any]:
        """What this backend spent (all calls): tokens, requests, retries by kind, errors, USD.

        The generate worker writes it into the shard's marker (``stats["api"]``) and the run summary.
        """
        summary = self.usage.to_dict()
        summary.update(
            model=self.model,
            base_url=self.base_url,
            cost_usd=round(self.budget.spent, 6) if self.prices is not None else None,
            prices_per_1m=None if self.prices is None else {"prompt": self.prices.prompt, "completion": self.prices.completion},
            budget_usd=self.budget.budget_usd,
        )
        return summary

    # ---- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prefix: str | None = None,
    ) -> list[Generation]:
        """One :class:`Generation` per prompt, in order.

        Raises :class:`~inpars.usage.BudgetExceeded` (with ``.completed``, the finished prefix) when
        the budget stops the run; :class:`~inpars.errors.ConfigError` on a rejected key or unknown
        model; :class:`~inpars.errors.TransientError` when the server stays unreachable or busy.
        """
        coro = self.agenerate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, prefix=prefix)
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        if not in_loop:
            return asyncio.run(coro)
        # Called from inside a running loop (Jupyter, an async caller): run on a helper thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    async def agenerate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prefix: str | None = None,  # servers cache shared prefixes themselves (vLLM, llama.cpp)
    ) -> list[Generation]:
        """The async form of :meth:`generate`."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        start = self.usage.copy()
        results: list[Generation | None] = [None] * len(prompts)
        params = self._sampling(max_new_tokens, temperature, top_p, seed)
        sem = asyncio.Semaphore(self.concurrency)
        first_error: list[BaseException] = []
        tasks: list[asyncio.Task] = []
        stop: BudgetExceeded | None = None

        async def one(i: int, prompt: str, reservation: Reservation) -> None:
            try:
                results[i] = await self._generate_one(client, prompt, params, reservation)
            except BaseException as e:
                if not first_error and not isinstance(e, asyncio.CancelledError):
                    first_error.append(e)
                raise
            finally:
                sem.release()

        async with self._client() as client:
            try:
                # Reserve and launch strictly in input order, so a budget stop at prompt i leaves
                # exactly prompts[:i] answered: a clean prefix for the caller to checkpoint.
                for i, prompt in enumerate(prompts):
                    if self._journal is not None and (known := self._answered.get(self._answer_key(prompt, params))):
                        results[i] = known  # answered before a crash: never requested (or paid) again
                        self.replayed += 1
                        continue
                    await sem.acquire()
                    if first_error:
                        sem.release()
                        break
                    reservation = await self._reserve(prompt, max_new_tokens, tasks, first_error)
                    if isinstance(reservation, BudgetExceeded):
                        sem.release()
                        stop = reservation
                        break
                    if first_error:
                        self.budget.release(reservation)
                        sem.release()
                        break
                    tasks.append(asyncio.create_task(one(i, prompt, reservation)))
                if tasks:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()  # no-op for finished tasks
                await asyncio.gather(*tasks, return_exceptions=True)  # also retrieves their errors
                self.last_usage = self.usage - start
        if first_error:
            raise first_error[0]
        if stop is not None:
            done = [g for g in results if g is not None]
            raise BudgetExceeded(f"{stop} ({len(done)} of {len(prompts)} prompts answered)", completed=done, usage=self.last_usage)
        return results  # type: ignore[return-value]

    async def _reserve(
        self, prompt: str, max_new_tokens: int, tasks: list[asyncio.Task], first_error: list
    ) -> Reservation | BudgetExceeded:
        """Book the worst case of ``prompt``; while the budget is short, wait for requests in flight
        to settle (their real cost is usually far below the worst case). Only when nothing is in
        flight and the worst case still does not fit is the run stopped."""
        tokens = await self._budget_tokens(prompt)
        while True:
            try:
                return self.budget.reserve(tokens, max_new_tokens)
            except BudgetExceeded as e:
                in_flight = [t for t in tasks if not t.done()]
                if not in_flight or first_error:
                    return e
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)

    def _sampling(self, max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_new_tokens,
            "temperature": float(temperature),  # 0: greedy
            "top_p": float(top_p),
            "stop": ["\n"],  # a query is one line; the text is cut client-side too
            "n": 1,
        }
        if seed is not None:
            params["seed"] = int(seed)
        if self.chat:
            params.update(logprobs=True, top_logprobs=1)  # llama.cpp's server needs top_logprobs >= 1
        else:
            params["logprobs"] = 1
        return params

    async def _generate_one(self, client: httpx.AsyncClient, prompt: str, params: dict[str, Any], reservation: Reservation) -> Generation:
        payload = dict(params)
        if self.chat:
            payload["messages"] = [{"role": "user", "content": prompt}]
        else:
            payload["prompt"] = prompt
        try:
            data = await self._post_with_retries(client, payload)
            generation = self._parse(data)
        except BaseException as e:
            # A cancelled request (another one failed) may still be billed; the worst-case
            # reservations are what keeps the budget safe despite such unseen spend.
            self.budget.release(reservation)
            if not isinstance(e, asyncio.CancelledError):
                self.usage.errors += 1
            raise
        self.budget.settle(reservation, generation.prompt_tokens, generation.completion_tokens)
        self.usage.prompt_tokens += generation.prompt_tokens
        self.usage.completion_tokens += generation.completion_tokens
        self.usage.requests += 1
        if self._journal is not None:
            self._record(self._answer_key(prompt, params), generation)
        return generation

    async def _post_with_retries(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> dict[str, Any]:
        attempt = 0
        while True:
            delay: float | None = None
            try:
                response = await client.post(self.endpoint, json=payload)
            except httpx.TimeoutException as e:
                kind, detail = "timeout", f"no answer within {self.request_timeout:g} s ({type(e).__name__})"
            except httpx.TransportError as e:  # refused, reset, dropped mid-answer
                kind, detail = "connection", f"{type(e).__name__}: {self._scrub(str(e)) or 'connection failed'}"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except json.JSONDecodeError:
                        kind, detail = "server_error", "HTTP 200 with a body that is not JSON"
                elif status == 429:
                    kind, detail, delay = "rate_limited", "HTTP 429 (rate limited)", _retry_after(response.headers)
                elif status >= 500 or status in (408, 409):
                    kind, detail, delay = "server_error", f"HTTP {status}", _retry_after(response.headers)
                elif status in (401, 403):
                    # The body is not quoted: some servers echo (part of) the key back.
                    raise ConfigError(
                        f"API key rejected by {self.base_url} (HTTP {status}); check the environment variable {self.api_key_env}"
                    )
                elif status == 404:
                    raise ConfigError(f"model {self.model!r} or endpoint {self.endpoint} not found (HTTP 404): {self._body(response)}")
                else:
                    raise InParsError(
                        f"{self.endpoint} refused the request for model {self.model!r} (HTTP {status}): {self._body(response)}"
                    )
            if attempt >= self.max_retries:
                if kind == "connection":
                    raise TransientError(f"cannot reach {self.base_url} ({detail}) after {attempt} retries") from None
                raise TransientError(f"{self.endpoint} failed: {detail}, after {attempt} retries") from None
            attempt += 1
            self.usage.retries[kind] += 1
            if delay is None:
                delay = random.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2**attempt))
            log.info("%s: %s; retry %d/%d in %.2f s", self.endpoint, detail, attempt, self.max_retries, delay)
            await asyncio.sleep(min(delay, self.retry_after_cap))

    def _parse(self, data: dict[str, Any]) -> Generation:
        try:
            choice = data["choices"][0]
            if self.chat:
                text = (choice.get("message") or {}).get("content") or ""
                entries = (choice.get("logprobs") or {}).get("content")
                tokens = values = None
                if entries is not None:
                    tokens = [e["token"] for e in entries]
                    values = [e["logprob"] for e in entries]
            else:
                text = choice.get("text") or ""
                logprobs = choice.get("logprobs") or {}
                tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
            usage = data.get("usage") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise InParsError(f"{self.endpoint} answered in an unexpected shape ({type(e).__name__}: {e})") from None
        if tokens is None or values is None:
            raise ConfigError(
                f"{self.endpoint} returned no log-probs for model {self.model!r}; the filter needs them "
                "(llama.cpp's Python server: start it with --logits_all true)"
            )
        query, cut = cut_at_newline(text)
        q_tokens, q_values = _query_tokens(tokens, values)
        reason = "stop" if cut or choice.get("finish_reason") != "length" else "length"
        return Generation(
            text=query.strip(),
            tokens=q_tokens,
            log_probs=q_values,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or len(tokens)),
            finish_reason=reason,
        )

    def _client(self) -> httpx.AsyncClient:
        # One client per generate() call: an AsyncClient is bound to the loop that asyncio.run made.
        return httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(self.request_timeout, connect=min(self.request_timeout, 10.0)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _body(self, response: httpx.Response, limit: int = 300) -> str:
        body = response.text  # httpx decodes with errors="replace": never raises
        return self._scrub(" ".join(body.split()))[:limit] or "(empty body)"

    async def _budget_tokens(self, prompt: str) -> int:
        """Prompt tokens to book for the budget: exact where a tokenizer is at hand, else a
        deliberately high estimate (1 token per 2 UTF-8 bytes, about twice the usual English rate).

        Only paid runs count (free prices skip this); note that llama-cpp-python's server tokenizes
        under the same lock as it generates, so there counting waits for the request in progress."""
        if self.budget.budget_usd is None or self.prices is None or self.prices.is_free:
            return 0
        tokenizer = await asyncio.to_thread(self._get_tokenizer)
        if tokenizer.exact:
            return await asyncio.to_thread(tokenizer.count, prompt)
        return math.ceil(len(prompt.encode("utf-8")) / 2)

    # ---- tokens ----------------------------------------------------------------------------

    def truncate(self, text: str, max_tokens: int) -> str:
        return self._get_tokenizer().truncate(text, max_tokens)

    def count_tokens(self, text: str) -> int:
        return self._get_tokenizer().count(text)

    @property
    def tokenizer_kind(self) -> str:
        """How this backend counts tokens: ``server:<flavour>``, ``hf:<name>`` or ``approx``."""
        return self._get_tokenizer().kind

    def _get_tokenizer(self) -> _Tokenizer:
        """The first of: the server's own tokenize/detokenize endpoints (exact for the served
        model), a configured local HF tokenizer, or ~4 characters per token (an approximation)."""
        if self._tokenizer is None:
            root = self.base_url.removesuffix("/v1")
            self._tokenizer = (
                _ServerTokenizer.probe(root, self.model, self._headers, self.request_timeout)
                or _HFTokenizer.load(self._tokenizer_name)
                or _ApproxTokenizer()
            )
            log.info("%s: counting tokens with %s", self.base_url, self._tokenizer.kind)
        return self._tokenizer

    def close(self) -> None:
        if self._tokenizer is not None:
            self._tokenizer.close()


def _query_tokens(tokens: list[str], values: list[float | None]) -> tuple[list[str], list[float]]:
    """The tokens (and log-probs) of the query: those before the first token holding a newline.

    A token like ``".\\n"`` that carries query text before its newline is kept. Log-probs are made
    finite and <= 0 (a missing or -inf value becomes :data:`LOGPROB_FLOOR`).
    """
    out_t: list[str] = []
    out_v: list[float] = []
    for token, value in zip(tokens, values):
        token = token or ""
        newline = "\n" in token
        if newline and not token.split("\n", 1)[0].strip():
            break
        v = LOGPROB_FLOOR if value is None or not math.isfinite(value) else min(float(value), 0.0)
        out_t.append(token)
        out_v.append(max(v, LOGPROB_FLOOR))
        if newline:
            break
    # Leading whitespace-only tokens before a first-token newline produce no query text; drop them
    # too so that an empty query has no tokens.
    if not "".join(out_t).strip():
        return [], []
    return out_t, out_v


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(float(value) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


# ---- tokenizers for truncation and budgets -------------------------------------------------


class _Tokenizer:
    kind = "base"
    exact = True

    def count(self, text: str) -> int:
        raise NotImplementedError

    def truncate(self, text: str, max_tokens: int) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ServerTokenizer(_Tokenizer):
    """The server's own tokenizer over HTTP (exact for the served model).

    Flavours: llama.cpp's C++ server and vLLM serve ``/tokenize`` + ``/detokenize`` at the root (with
    different bodies); llama-cpp-python's server serves ``/extras/tokenize`` + ``/extras/detokenize``.
    """

    def __init__(self, client: httpx.Client, root: str, model: str, flavour: str, offset: int):
        self.client, self.root, self.model, self.flavour, self.offset = client, root, model, flavour, offset
        self.kind = f"server:{flavour}"

    @classmethod
    def probe(cls, root: str, model: str, headers: dict[str, str], timeout: float) -> _ServerTokenizer | None:
        client = httpx.Client(headers=headers, timeout=min(timeout, 30.0))
        for flavour in ("llama.cpp", "vllm", "llama-cpp-python"):
            tokenizer = cls(client, root, model, flavour, 0)
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


class _HFTokenizer(_Tokenizer):
    """A local Hugging Face tokenizer (``generate.tokenizer``: packaged alias, HF id or path)."""

    def __init__(self, tokenizer, name: str):
        self.tok, self.kind = tokenizer, f"hf:{name}"

    @classmethod
    def load(cls, name: str | None) -> _HFTokenizer | None:
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


class _ApproxTokenizer(_Tokenizer):
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
