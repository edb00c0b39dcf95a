"""The one small interface every generation backend implements.

A backend turns prompts into queries. Each backend module (transformers, an OpenAI-compatible
API, vLLM) subclasses :class:`GenerationBackend`; :func:`inpars.backends.get_backend` imports a
module only when it is asked for, so a missing optional dependency costs nothing until used
(like ir_measures' providers). ``is_available()`` checks imports only.

Contract for :meth:`GenerationBackend.generate`:

- One :class:`Generation` per prompt, in input order.
- A query ends at the first newline of the generated *text* (any tokenizer; no hard-coded ids).
- ``text`` is stripped; ``tokens``/``log_probs`` cover the query tokens only (the stop newline is
  excluded); every log-prob is finite and <= 0 (normalized: log-softmax of the logits).
- ``temperature == 0`` means greedy; otherwise sampling with ``top_p`` and ``seed``.
- ``prefix``: an optional string that every prompt starts with (the few-shot part). Backends may use
  it to compute the prefix once (KV-cache reuse); results must not depend on it.

Optional features are declared here with neutral defaults, so callers never probe with ``hasattr``:
``batch_size`` (prompts per forward pass; local backends), ``supports_journal`` / :meth:`use_journal`
(answers recorded as they arrive; paid APIs) and :meth:`usage_summary` (tokens, retries, cost; APIs).
"""

from __future__ import annotations

import abc
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..config import GenerateConfig
    from .journal import AnswerJournal

LOGPROB_FLOOR = -100.0  # stands in for a missing / -inf log-prob so that every value stays finite


@dataclass
class Generation:
    """One generated query and what it cost."""

    text: str  # the query: stripped, cut at the first newline
    tokens: list[str] = field(default_factory=list)  # the query's tokens (stop newline excluded)
    log_probs: list[float] = field(default_factory=list)  # one per token in ``tokens``
    prompt_tokens: int = 0
    completion_tokens: int = 0  # the query's tokens: len(log_probs) (a stop newline is not counted)
    finish_reason: str = "stop"  # "stop" (newline / end of text) | "length" (max_new_tokens reached)


class GenerationBackend(abc.ABC):
    """Base class of the generation backends."""

    name: str = "base"
    #: Prompts per forward pass (local backends; the generate stage sets it from ``generate.batch_size``).
    #: Backends that batch by themselves (vLLM) or send one prompt per request (APIs) ignore it.
    batch_size: int = 1
    #: Whether :meth:`use_journal` records answers (backends that pay per request).
    supports_journal: bool = False

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: GenerateConfig) -> GenerationBackend:
        """Build the backend from the generate stage's settings."""

    @classmethod
    def is_available(cls) -> bool:
        """Whether the backend's dependencies import (cheap; loads no model)."""
        return True

    @property
    @abc.abstractmethod
    def model_identity(self) -> str:
        """What rows and the manifest record as the model (alias, HF id, path or API model name)."""

    @abc.abstractmethod
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
        """One :class:`Generation` per prompt, in input order (see the module docstring)."""

    @abc.abstractmethod
    def truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut to at most ``max_tokens`` tokens of this backend's tokenizer."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """The number of tokens ``text`` takes (no special tokens added)."""

    def use_journal(self, journal: AnswerJournal | str | os.PathLike) -> None:
        """Record every answer in ``journal`` as it arrives and serve answers already there instead of
        requesting them again (see :mod:`inpars.backends.journal`). A no-op unless ``supports_journal``."""

    def use_ledger(self, ledger: Any) -> None:
        """Book every paid request against the run-wide budget ledger (:class:`inpars.ledger.Ledger`)
        instead of a per-process budget. A no-op for backends that cost nothing."""

    def usage_summary(self) -> dict[str, Any] | None:
        """What this backend spent (tokens, requests, retries by kind, cost), for the shard's marker;
        None for backends that do not count (local models)."""
        return None

    def close(self) -> None:
        """Release the model / connections. Safe to call twice."""

    def __enter__(self) -> GenerationBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cut_at_newline(text: str) -> tuple[str, bool]:
    """``(text before the first newline, whether a newline was found)``."""
    i = text.find("\n")
    return (text, False) if i < 0 else (text[:i], True)


def query_tokens(tokens: list[str], values: list[float | None]) -> tuple[list[str], list[float]]:
    """The tokens (and log-probs) of the query: those before the first token holding a newline.

    For backends that get per-token text and log-probs back (APIs, vLLM). A token like ``".\\n"`` that
    carries query text before its newline is kept. Log-probs are made finite and <= 0 (a missing or
    -inf value becomes :data:`LOGPROB_FLOOR`).
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
