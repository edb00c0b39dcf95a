"""Token usage, prices and a hard budget for paid generation APIs.

- :class:`Usage` counts what a backend spent: tokens, requests, retries by kind, errors.
- :class:`PriceTable` holds USD prices per 1M tokens; :data:`DEFAULT_PRICES` are estimates for a few
  OpenAI models, to be overridden with ``generate.prices`` (a local server costs nothing).
- :class:`BudgetGuard` reserves the *worst-case* cost of every request before it is sent (prompt
  tokens + ``max_new_tokens`` completion tokens) and refuses with :class:`BudgetExceeded` once a
  request could push the spend past the budget, so a run stops *before* exceeding it. When the answer
  arrives, the reservation is replaced by the real cost the server reported.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, InParsError

# Retry kinds counted in Usage.retries (one count per retried attempt).
RETRY_KINDS = ("rate_limited", "server_error", "timeout", "connection")


@dataclass
class Usage:
    """What a backend used: tokens as billed by the server, requests and retries."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0  # successful requests (one per generated row)
    retries: Counter = field(default_factory=Counter)  # kind (RETRY_KINDS) -> retried attempts
    errors: int = 0  # requests that failed for good (after retries, or not retryable)

    def add(self, other: Usage) -> None:
        """Add ``other`` into this usage (e.g. a shard's usage into a run total)."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.requests += other.requests
        self.retries.update(other.retries)
        self.errors += other.errors

    def copy(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.requests, Counter(self.retries), self.errors)

    def __sub__(self, other: Usage) -> Usage:
        """The usage spent since ``other`` (a snapshot taken earlier with :meth:`copy`)."""
        retries = Counter(self.retries)
        retries.subtract(other.retries)
        return Usage(
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.requests - other.requests,
            +retries,  # unary + drops zero counts
            self.errors - other.errors,
        )

    @property
    def total_retries(self) -> int:
        return sum(self.retries.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written into shard markers and the run summary."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "requests": self.requests,
            "retries": {k: int(v) for k, v in sorted(self.retries.items()) if v},
            "errors": self.errors,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        return cls(
            int(data.get("prompt_tokens", 0)),
            int(data.get("completion_tokens", 0)),
            int(data.get("requests", 0)),
            Counter({k: int(v) for k, v in (data.get("retries") or {}).items()}),
            int(data.get("errors", 0)),
        )


@dataclass(frozen=True)
class PriceTable:
    """USD per 1M tokens."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6

    @property
    def is_free(self) -> bool:
        return self.prompt == 0.0 and self.completion == 0.0

    @classmethod
    def for_model(cls, model: str, overrides: dict[str, float] | None = None) -> PriceTable | None:
        """The prices of ``model``: ``overrides`` (``{"prompt": x, "completion": y}``) when given,
        else :data:`DEFAULT_PRICES` (exact name, then the longest known prefix), else ``None``."""
        if overrides:
            unknown = set(overrides) - {"prompt", "completion"}
            if unknown:
                raise ConfigError(f"generate.prices: unknown key(s) {sorted(unknown)}; use 'prompt' and 'completion' (USD per 1M tokens)")
            values = {k: float(v) for k, v in overrides.items()}
            if any(v < 0 for v in values.values()):
                raise ConfigError("generate.prices: prices must be >= 0")
            return cls(values.get("prompt", 0.0), values.get("completion", 0.0))
        if model in DEFAULT_PRICES:
            return DEFAULT_PRICES[model]
        # Dated snapshots ("gpt-4o-mini-2024-07-18") cost what their family costs.
        matches = [name for name in DEFAULT_PRICES if model.startswith(name + "-")]
        return DEFAULT_PRICES[max(matches, key=len)] if matches else None


# ESTIMATES of OpenAI list prices (USD per 1M tokens, standard tier) as known on 2025-06-01.
# Prices change: pass the current ones in `generate.prices` for a budget that matters.
DEFAULT_PRICES: dict[str, PriceTable] = {
    "gpt-3.5-turbo-instruct": PriceTable(1.50, 2.00),
    "gpt-3.5-turbo": PriceTable(0.50, 1.50),
    "davinci-002": PriceTable(2.00, 2.00),
    "babbage-002": PriceTable(0.40, 0.40),
    "gpt-4o": PriceTable(2.50, 10.00),
    "gpt-4o-mini": PriceTable(0.15, 0.60),
    "gpt-4.1": PriceTable(2.00, 8.00),
    "gpt-4.1-mini": PriceTable(0.40, 1.60),
    "gpt-4.1-nano": PriceTable(0.10, 0.40),
}


def estimate_cost(usage: Usage, prices: PriceTable) -> float:
    """USD cost of ``usage`` at ``prices``."""
    return prices.cost(usage.prompt_tokens, usage.completion_tokens)


class BudgetExceeded(InParsError):
    """The next request could exceed the budget; nothing past it was sent.

    ``completed`` holds the generations finished before the stop, in input order (a prefix of the
    prompts), so the caller can checkpoint them; ``usage`` is what the call spent.
    """

    def __init__(self, message: str, *, completed: list | None = None, usage: Usage | None = None):
        super().__init__(message)
        self.completed = list(completed or [])
        self.usage = usage


@dataclass
class Reservation:
    cost: float


class BudgetGuard:
    """Refuses a request whose worst-case cost could push the spend past ``budget_usd``.

    Thread-safe. ``spent`` is the real cost of answered requests; ``reserved`` the worst case of those
    in flight. ``reserve`` raises :class:`BudgetExceeded` when ``spent + reserved + worst > budget``.
    """

    def __init__(self, budget_usd: float | None, prices: PriceTable | None, ledger: Any = None):
        if budget_usd is not None and budget_usd < 0:
            raise ConfigError(f"generate.budget_usd must be >= 0, got {budget_usd}")
        if budget_usd is not None and prices is None:
            raise ConfigError(
                "generate.budget_usd is set but the model's prices are unknown: set generate.prices "
                "({'prompt': USD per 1M tokens, 'completion': USD per 1M tokens})"
            )
        self.budget_usd = budget_usd
        self.prices = prices or PriceTable()
        self.spent = 0.0
        self.reserved = 0.0
        # The run's ledger (inpars.ledger.Ledger): the budget is then the whole run's, booked in blocks
        # shared by every shard, pod and retry, instead of this process's own.
        self.ledger = ledger
        self._lock = threading.Lock()

    def reserve(self, prompt_tokens: int, max_new_tokens: int) -> Reservation:
        """Book the worst case of one request, or raise :class:`BudgetExceeded`."""
        worst = self.prices.cost(prompt_tokens, max_new_tokens)
        with self._lock:
            need = self.spent + self.reserved + worst
            if self.ledger is not None:
                if not self.ledger.ensure(need):
                    raise BudgetExceeded(
                        f"the run's budget of ${self.ledger.budget:.4f} is booked by its shards: ${self.spent:.6f} spent here, "
                        f"${self.reserved:.6f} in flight, the next request could cost up to ${worst:.6f}"
                    )
                if self.ledger.used_before + need > self.ledger.mark:
                    # Noted before the request is sent (and a block ahead, to write rarely), so a crash
                    # never leaves spend the ledger does not know of.
                    self.ledger.note_used(need, ahead=self.ledger.block)
                self.reserved += worst
                return Reservation(worst)
            if self.budget_usd is not None and need > self.budget_usd:
                raise BudgetExceeded(
                    f"budget of ${self.budget_usd:.4f} reached: ${self.spent:.6f} spent, ${self.reserved:.6f} in flight, "
                    f"the next request could cost up to ${worst:.6f}"
                )
            self.reserved += worst
            return Reservation(worst)

    def settle(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int) -> float:
        """Replace a reservation by the cost the server reported; returns that cost."""
        cost = self.prices.cost(prompt_tokens, completion_tokens)
        with self._lock:
            self.reserved -= reservation.cost
            self.spent += cost
        return cost

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose request failed without an answer.

        A request that timed out may still have been billed; such spend is not visible to the
        client, which is one reason the reservation is the worst case.
        """
        with self._lock:
            self.reserved -= reservation.cost
