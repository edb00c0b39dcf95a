"""The one place for secret handling: which values are secrets, scrubbing them from text, finding them.

- :func:`named_secrets` / :func:`secret_values`: the configured key variables plus every environment
  variable whose name ends in ``KEY``, ``TOKEN``, ``SECRET`` or ``PASSWORD``.
- :func:`redact`: ``text`` with every secret removed: the exact value, any fragment of at least
  :data:`MIN_FRAGMENT` characters, and their base64 and URL-encoded forms.
- :func:`find_secret`: the *name* of the first secret found in a payload (same forms), never its value;
  for scanning what is about to be written to the workspace or published.

>>> redact("Incorrect API key provided: sk-abcdefgh12345678", ["sk-abcdefgh12345678"])
'Incorrect API key provided: ***'
"""

from __future__ import annotations

import base64
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SECRET_NAME_ENDINGS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# Values shorter than this are not treated as secrets: placeholders such as "EMPTY" or "none" (what
# keyless local servers are given) would otherwise be scrubbed from, or flagged in, ordinary text.
MIN_SECRET_CHARS = 8
# A fragment of at least 8 characters counts as a leak. 8 random key characters are ~48 bits: enough
# to matter (a server's "Incorrect API key provided: sk-abc...wxyz" echo, a key cut in half), yet such a
# run practically never occurs in ordinary text by chance. Shorter runs ("sk-", a 4-character tail)
# are shared by every key or common in prose, so flagging them would only produce false alarms.
MIN_FRAGMENT = 8
REDACTED = "***"

# The readable scheme prefix of a key ("sk-", "sk-proj-", "sk-svcacct-", "hf_"): letter-led segments of
# at most 7 characters, each ended by "-" or "_". It is the same in every key of its kind (it appears in
# docs and corpora), so a match lying entirely inside it is not a leak; a match reaching into the rest is.
_SCHEME_PREFIX = re.compile(r"(?:[A-Za-z][A-Za-z0-9]{0,6}[-_]){1,3}")


def named_secrets(env_names: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{variable name: value}`` of the secrets in the environment.

    The variables named in ``env_names`` (the configured key variables, e.g. ``generate.api_key_env``)
    and every variable whose name ends in KEY, TOKEN, SECRET or PASSWORD; values shorter than
    :data:`MIN_SECRET_CHARS` are left out.
    """
    environ = os.environ if environ is None else environ
    names = [n for n in env_names if n]
    names += sorted(n for n in environ if n.upper().endswith(SECRET_NAME_ENDINGS) and n not in names)
    found = {}
    for name in names:
        value = environ.get(name) or ""
        if len(value) >= MIN_SECRET_CHARS and value not in found.values():
            found[name] = value
    return found


def secret_values(env_names: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of :func:`named_secrets` (configured key variables first)."""
    return list(named_secrets(env_names, environ).values())


SecretsArg = Mapping[str, str] | Iterable[str]


def redact(text: str, secrets: SecretsArg) -> str:
    """``text`` with every exact value, fragment of >= :data:`MIN_FRAGMENT` characters, and base64 or
    URL-encoded form of a secret replaced by ``***``. ``secrets``: values, or ``{name: value}``."""
    if not text:
        return text
    spans = []
    for form in _forms(secrets):
        spans += form.spans(text)
    if not spans:
        return text
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, pos = [], 0
    for start, end in merged:
        out += [text[pos:start], REDACTED]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def find_secret(payload: bytes | str, secrets: SecretsArg) -> str | None:
    """What leaked into ``payload``, as a description naming the secret (never its value), or None.

    E.g. ``"the value of $OPENAI_API_KEY (a base64 fragment)"``. Bytes are read as UTF-8 (invalid bytes kept
    as they are); ``secrets``: ``{name: value}``, or bare values
    (then named by position).
    """
    # surrogateescape: valid UTF-8 decodes as text (so a non-ASCII secret matches), other bytes survive.
    text = bytes(payload).decode("utf-8", "surrogateescape") if isinstance(payload, bytes | bytearray) else payload
    for form in _forms(secrets):
        span = form.first_span(text)
        if span is not None:
            whole = span[1] - span[0] >= len(form.needle)
            what = f"{'the value' if whole else 'a fragment'}{'' if form.encoding == 'plain' else f' ({form.encoding})'}"
            return f"{what} of {form.name}"
    return None


# ---------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class _Form:
    """One spelling of a secret (plain, a base64 alignment, URL-encoded) to look for."""

    name: str
    needle: str
    encoding: str
    public: int  # length of the needle's scheme prefix: a match inside it alone is not a leak

    def _hits(self, text: str):
        # Any fragment of >= 8 characters contains a whole 4-character block of the needle that starts
        # at a multiple of 4 (a fragment starting at i holds the block at ceil(i/4)*4, which ends by i+8),
        # so searching for those few blocks with str.find (C speed) and extending each hit both ways
        # finds every fragment without a Python loop over the payload.
        n, k = self.needle, MIN_FRAGMENT // 2
        for a in range(0, len(n) - k + 1, k):
            block, at = n[a : a + k], text.find(n[a : a + k])
            while at >= 0:
                left = 0
                while left < a and at - left - 1 >= 0 and text[at - left - 1] == n[a - left - 1]:
                    left += 1
                right = k
                while a + right < len(n) and at + right < len(text) and text[at + right] == n[a + right]:
                    right += 1
                if left + right >= MIN_FRAGMENT and a + right > self.public:
                    yield at - left, at + right
                at = text.find(block, at + 1)

    def spans(self, text: str) -> list[tuple[int, int]]:
        return list(self._hits(text))

    def first_span(self, text: str) -> tuple[int, int] | None:
        best = None
        for span in self._hits(text):
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
        return best


def _forms(secrets: SecretsArg) -> list[_Form]:
    named = secrets.items() if isinstance(secrets, Mapping) else ((f"secret #{i + 1}", v) for i, v in enumerate(secrets))
    forms: list[_Form] = []
    for name, value in named:
        if not value or len(value) < MIN_SECRET_CHARS:
            continue
        label = name if name.startswith("secret #") else f"${name}"
        prefix = _SCHEME_PREFIX.match(value)
        public = prefix.end() if prefix else 0
        forms.append(_Form(label, value, "plain", public))
        raw = value.encode("utf-8")
        # base64 of a text that holds the secret at any byte offset: one of three alignments. Only the
        # characters fully determined by the secret's own bytes are kept.
        for offset in range(3):
            chunk = raw[offset:]
            usable = len(chunk) // 3 * 3
            encoded = base64.b64encode(chunk[:usable]).decode("ascii")
            head = max(0, public - offset) // 3 * 4
            for alphabet, enc in ((encoded, "base64"), (encoded.replace("+", "-").replace("/", "_"), "base64url")):
                if len(alphabet) >= MIN_FRAGMENT and (enc == "base64" or alphabet != encoded):
                    forms.append(_Form(label, alphabet, enc, head))
        for quoted in {urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value, safe="")} - {value}:
            forms.append(_Form(label, quoted, "url-encoded", len(urllib.parse.quote(value[:public], safe=""))))
    return forms


__all__ = ["MIN_FRAGMENT", "MIN_SECRET_CHARS", "REDACTED", "find_secret", "named_secrets", "redact", "secret_values"]
