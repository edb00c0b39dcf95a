"""Secrets (API keys, tokens): which values count as secret, and finding or removing them in text.

Placeholder of the lead's branch; the API-backend work provides the full version (fragments, base64).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.I)
MIN_SECRET = 8


def secret_values(env_names: Iterable[str] = ()) -> dict[str, str]:
    """``{variable name: value}`` of the named variables and of every *KEY/*TOKEN/*SECRET/*PASSWORD one."""
    names = set(env_names) | {k for k in os.environ if _SECRET_NAME.search(k)}
    return {n: os.environ[n] for n in sorted(names) if len(os.environ.get(n, "")) >= MIN_SECRET}


def find_secret(payload: bytes | str, secrets: dict[str, str]) -> str | None:
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    for name, value in secrets.items():
        if value in text:
            return name
    return None


def redact(text: str, secrets: dict[str, str]) -> str:
    for name, value in secrets.items():
        text = text.replace(value, f"<${name}>")
    return text
