"""Generation through an OpenAI-compatible API with the official ``openai`` SDK: OpenAI, Azure OpenAI,
vLLM or llama.cpp servers.

The SDK (``openai.AsyncOpenAI``, or ``AsyncAzureOpenAI`` when ``api_version`` is set) owns the transport:
timeouts (``request_timeout``), retries (``max_retries``: 408/409/429/5xx, timeouts and dropped
connections, with its exponential backoff; 429 waits what ``Retry-After`` / ``retry-after-ms`` ask) and
typed errors. Ours are thin layers around it:

- ``concurrency`` requests in flight on one asyncio loop, one prompt per request (llama.cpp's server
  rejects batched prompts), results in input order;
- errors: a rejected key (401/403) or an unknown model or endpoint (404) stops at once with a
  :class:`~inpars.errors.ConfigError`; what is still failing after the SDK's retries (429, 5xx, timeouts,
  connections) is a :class:`~inpars.errors.TransientError` (the worker exits to be retried). A
  ``Retry-After`` longer than the SDK is willing to wait (120 s in openai 2.x/3.x) is not retried by it:
  it surfaces at once as a TransientError quoting the header, and the shard is retried later by the
  launcher (answers so far are journaled, finished chunks checkpointed);
- usage (:class:`~inpars.usage.Usage`, with every retry counted by kind by :class:`RetryCountingTransport`
  on the HTTP client we hand the SDK) and a :class:`~inpars.usage.BudgetGuard` that books each request's
  worst-case cost before it is sent, so a run with ``budget_usd`` stops *before* exceeding it and hands
  back the rows finished so far (:class:`~inpars.usage.BudgetExceeded`);
- the answer journal (:mod:`inpars.backends.journal`) and the tokenizers (:mod:`inpars.backends.tokenizers`).

The API key is read from the environment variable named by ``api_key_env`` and only handed to the SDK:
it is not stored in the config, shown by ``repr``, quoted in an error (server text is passed through
:func:`inpars.secrets.redact`), and an answer that contains it (a server echoing credentials) is refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai

from ..errors import ConfigError, InParsError, TransientError
from ..secrets import find_secret, named_secrets, redact
from ..usage import BudgetExceeded, BudgetGuard, PriceTable, Reservation, Usage
from .base import Generation, GenerationBackend, cut_at_newline, query_tokens
from .journal import AnswerJournal
from .tokenizers import Tokenizer, pick_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from ..config import GenerateConfig

OPENAI_BASE_URL = "https://api.openai.com/v1"

# The outcomes of the HTTP attempts of the request in progress (one list per request, per asyncio task).
_ATTEMPTS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("inpars_api_attempts", default=None)


class RetryCountingTransport(httpx.AsyncBaseTransport):
    """Counts the SDK's retries by kind into ``usage.retries`` (see :data:`inpars.usage.RETRY_KINDS`).

    The SDK retries inside one call; what each attempt met is only seen here, at the transport. An
    attempt's outcome (``rate_limited``, ``server_error``, ``timeout``, ``connection`` or ``ok``) is noted
    in the calling task's attempt list; when a further attempt of the same call starts, the previous one
    was retried and its kind is counted, so the counts are live and a final failure is not a retry.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, usage: Usage):
        self.inner, self.usage = inner, usage

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempts = _ATTEMPTS.get()
        if attempts:
            self.usage.retries[attempts[-1]] += 1
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.TimeoutException:
            _note(attempts, "timeout")
            raise
        except httpx.TransportError:  # refused, reset, dropped mid-answer
            _note(attempts, "connection")
            raise
        status = response.status_code
        _note(attempts, "rate_limited" if status == 429 else "server_error" if status >= 500 or status in (408, 409) else "ok")
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _note(attempts: list[str] | None, kind: str) -> None:
    if attempts is not None:
        attempts.append(kind)


class OpenAIBackend(GenerationBackend):
    """Queries from an OpenAI-compatible ``/v1/completions`` (or ``/v1/chat/completions``) endpoint."""

    name = "openai"
    supports_journal = True

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
        organization: str | None = None,
        project: str | None = None,
        api_version: str | None = None,
    ):
        if concurrency < 1:
            raise ConfigError(f"generate.concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ConfigError(f"generate.max_retries must be >= 0, got {max_retries}")
        if request_timeout <= 0:
            raise ConfigError(f"generate.request_timeout must be > 0, got {request_timeout}")
        self.azure = api_version is not None
        if self.azure and not base_url:
            raise ConfigError(
                "generate.api_version is set (Azure OpenAI): set generate.base_url to the resource endpoint, https://NAME.openai.azure.com"
            )
        self.model = model
        self.base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"generate.base_url must start with http:// or https://, got {self.base_url!r}")
        self.api_key_env = api_key_env
        self.chat = chat
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.organization, self.project, self.api_version = organization, project, api_version
        route = "chat/completions" if chat else "completions"
        # Azure routes by deployment: the SDK puts the model (= deployment name) into the path.
        self.endpoint = f"{self.base_url}/openai/deployments/{model}/{route}" if self.azure else f"{self.base_url}/{route}"
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key and (self.base_url == OPENAI_BASE_URL or self.azure):
            raise ConfigError(
                f"the {'Azure OpenAI' if self.azure else 'OpenAI'} API needs a key: set the environment variable {api_key_env}"
            )
        # The key is handed to the SDK and the tokenizer probe only; repr, errors and rows never show it.
        self._key = key or None
        self._key_only = {api_key_env: key} if key else {}  # what an answer must not contain
        self._secrets = named_secrets([api_key_env] if key else [])  # what quoted server text is scrubbed of
        self.prices = PriceTable.for_model(model, prices)
        self.budget = BudgetGuard(budget_usd, self.prices)
        self.usage = Usage()  # cumulative over every generate() call of this backend
        self.last_usage = Usage()  # what the latest generate() call spent
        self._tokenizer_name = tokenizer
        self._tokenizer: Tokenizer | None = None  # picked on first use (see _get_tokenizer)
        self.journal: AnswerJournal | None = None
        self.replayed = 0  # answers served from the journal instead of a new (paid) request

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
            tokenizer=config.tokenizer,
            organization=config.organization,
            project=config.project,
            api_version=config.api_version,
        )

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, chat={self.chat}, concurrency={self.concurrency})"

    @property
    def model_identity(self) -> str:
        return self.model

    @property
    def cost_usd(self) -> float:
        """What the answered requests cost so far, at :attr:`prices` (0 for unknown prices)."""
        return self.budget.spent

    def use_ledger(self, ledger) -> None:
        self.budget.ledger = ledger
        self.budget.budget_usd = ledger.budget  # booked exactly from here on (see _budget_tokens)

    def use_journal(self, journal: AnswerJournal | str | os.PathLike) -> None:
        """Record every answer in ``journal`` the moment it arrives, and serve answers already there
        instead of requesting (and paying for) them again. A path means a local :class:`AnswerJournal`."""
        self.journal = journal if isinstance(journal, AnswerJournal) else AnswerJournal(Path(journal))

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
        params = self._sampling(max_new_tokens, temperature, top_p, seed)
        results: list[Generation | None] = [None] * len(prompts)
        start = self.usage.copy()
        sem = asyncio.Semaphore(self.concurrency)
        tasks: list[asyncio.Task] = []
        first_error: list[BaseException] = []
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
                    if self.journal is not None and (known := self.journal.get(self._answer_key(prompt, params))):
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

    def _answer_key(self, prompt: str, params: dict[str, Any]) -> str:
        material = json.dumps({"endpoint": self.endpoint, "params": params, "prompt": prompt}, sort_keys=True)
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    async def _generate_one(self, client: openai.AsyncOpenAI, prompt: str, params: dict[str, Any], reservation: Reservation) -> Generation:
        attempts: list[str] = []
        _ATTEMPTS.set(attempts)  # this task's own context: RetryCountingTransport notes each attempt here
        try:
            response = await self._request(client, prompt, params)
            generation, answer = self._parse(response)
        except BaseException as e:
            # A cancelled request (another one failed) may still be billed; the worst-case
            # reservations are what keeps the budget safe despite such unseen spend.
            self.budget.release(reservation)
            if isinstance(e, asyncio.CancelledError):
                raise
            self.usage.errors += 1
            if isinstance(e, openai.OpenAIError):
                raise self._translate(e, retries=max(len(attempts) - 1, 0)) from None
            raise
        self.budget.settle(reservation, generation.prompt_tokens, generation.completion_tokens)  # billed either way
        self.usage.prompt_tokens += generation.prompt_tokens
        self.usage.completion_tokens += generation.completion_tokens
        if self._key_only and (leak := find_secret(answer, self._key_only)):
            self.usage.errors += 1
            raise ConfigError(
                f"{self.endpoint} answered with {leak} (the API key): the server echoes credentials into its answers, "
                "so none of them is kept; check generate.base_url"
            )
        self.usage.requests += 1
        if self.journal is not None:
            self.journal.record(self._answer_key(prompt, params), generation)
        return generation

    async def _request(self, client: openai.AsyncOpenAI, prompt: str, params: dict[str, Any]):
        # Without a key (a local server) no Authorization header is sent at all.
        extra = {} if self._key else {"extra_headers": {"Authorization": openai.Omit()}}
        if self.chat:
            return await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **params, **extra)
        return await client.completions.create(prompt=prompt, **params, **extra)

    def _translate(self, e: openai.OpenAIError, retries: int) -> Exception:
        """Our error for an SDK error that its retries did not fix (or that it does not retry)."""
        if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
            # The body is not quoted: some servers echo (part of) the key back.
            return ConfigError(
                f"API key rejected by {self.base_url} (HTTP {e.status_code}); check the environment variable {self.api_key_env}"
            )
        if isinstance(e, openai.NotFoundError):
            return ConfigError(f"model {self.model!r} or endpoint {self.endpoint} not found (HTTP 404): {self._quote(e)}")
        if isinstance(e, openai.APITimeoutError):
            return TransientError(f"{self.endpoint} failed: no answer within {self.request_timeout:g} s, after {retries} retries")
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__
            detail = f"{type(cause).__name__}: {redact(str(cause), self._secrets) or 'connection failed'}" if cause else "connection failed"
            return TransientError(f"cannot reach {self.base_url} ({detail}) after {retries} retries")
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            if status == 429:
                # A Retry-After beyond the SDK's cap is not retried by it at all: say what was asked.
                headers = e.response.headers
                asked = next((f"{name}: {headers[name]}" for name in ("retry-after-ms", "retry-after") if name in headers), None)
                hint = f"; the server asked for {redact(asked, self._secrets)[:60]}" if asked else ""
                return TransientError(f"{self.endpoint} failed: HTTP 429 (rate limited{hint}), after {retries} retries")
            if status >= 500 or status in (408, 409):
                return TransientError(f"{self.endpoint} failed: HTTP {status}, after {retries} retries")
            return InParsError(f"{self.endpoint} refused the request for model {self.model!r} (HTTP {status}): {self._quote(e)}")
        return InParsError(f"{self.endpoint}: {type(e).__name__}: {redact(str(e), self._secrets)[:300]}")

    def _quote(self, e: openai.APIStatusError, limit: int = 300) -> str:
        """The server's error message (or body), scrubbed of secrets, on one line."""
        body = e.body.get("message") if isinstance(e.body, dict) else None
        text = body if isinstance(body, str) and body else e.response.text  # httpx decodes with errors="replace"
        return redact(" ".join(text.split()), self._secrets)[:limit] or "(empty body)"

    def _parse(self, response: Any) -> tuple[Generation, str]:
        """The :class:`Generation` of an SDK response, and the whole answer text (to check for the key)."""
        try:
            choice = response.choices[0]
            if self.chat:
                text = choice.message.content or ""
                entries = choice.logprobs.content if choice.logprobs is not None else None
                tokens = values = None
                if entries is not None:
                    tokens = [e.token for e in entries]
                    values = [e.logprob for e in entries]
            else:
                text = choice.text or ""
                logprobs = choice.logprobs
                tokens, values = (logprobs.tokens, logprobs.token_logprobs) if logprobs is not None else (None, None)
            usage = response.usage
            prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            finish_reason = choice.finish_reason
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise InParsError(f"{self.endpoint} answered in an unexpected shape ({type(e).__name__})") from None
        if tokens is None or values is None:
            raise ConfigError(
                f"{self.endpoint} returned no log-probs for model {self.model!r}; the filter needs them "
                "(llama.cpp's Python server: start it with --logits_all true)"
            )
        query, cut = cut_at_newline(text)
        q_tokens, q_values = query_tokens(tokens, values)
        generation = Generation(
            text=query.strip(),
            tokens=q_tokens,
            log_probs=q_values,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens or len(tokens),
            finish_reason="stop" if cut or finish_reason != "length" else "length",
        )
        return generation, text + "".join(t or "" for t in tokens)

    def _client(self) -> openai.AsyncOpenAI:
        """An SDK client for one generate() call (an httpx AsyncClient is bound to the loop asyncio.run made)."""
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(self.request_timeout, connect=min(self.request_timeout, 10.0))
        http_client = httpx.AsyncClient(
            transport=RetryCountingTransport(httpx.AsyncHTTPTransport(limits=limits), self.usage), timeout=timeout
        )
        # A placeholder key without a real one: the SDK insists on one; _request omits the header then.
        common: dict[str, Any] = dict(
            api_key=self._key or "no-key",
            organization=self.organization,
            project=self.project,
            timeout=timeout,
            max_retries=self.max_retries,
            http_client=http_client,
        )
        if self.azure:
            return openai.AsyncAzureOpenAI(azure_endpoint=self.base_url, api_version=self.api_version, **common)
        return openai.AsyncOpenAI(base_url=self.base_url, **common)

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

    def _get_tokenizer(self) -> Tokenizer:
        """The server's own tokenizer where it has one (not OpenAI's or Azure's APIs), else a configured
        local HF tokenizer, else ~4 characters per token (see :func:`~inpars.backends.tokenizers.pick_tokenizer`)."""
        if self._tokenizer is None:
            hosted = self.azure or self.base_url == OPENAI_BASE_URL
            self._tokenizer = pick_tokenizer(
                None if hosted else self.base_url.removesuffix("/v1"),
                self.model,
                headers={"Authorization": f"Bearer {self._key}"} if self._key else {},
                timeout=self.request_timeout,
                local_name=self._tokenizer_name,
            )
        return self._tokenizer

    def close(self) -> None:
        if self._tokenizer is not None:
            self._tokenizer.close()
        if self.journal is not None:
            self.journal.flush()
