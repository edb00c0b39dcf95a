"""inpars.secrets: which values are secrets, and finding / scrubbing them in every form they leak in."""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from inpars.secrets import MIN_FRAGMENT, find_secret, named_secrets, redact, secret_values

KEY = "sk-proj-Q7vR2mX9pL4tK8wZ3nB6yH1cJ5"
ODD_KEY = "Zx9+q/W8e=Rt7&u?Yi6 Op5"  # characters that base64 and URL encoding change


def test_secret_values_configured_first_then_by_name():
    environ = {
        "MY_API": KEY,  # configured: counts whatever its name
        "HF_TOKEN": "hf_abcdefghijklmnop",
        "DB_PASSWORD": "correct-horse-battery",
        "AWS_SECRET": "aws/secret/value/123",
        "SHORT_KEY": "EMPTY",  # a placeholder, not a secret
        "HOME": "/root/not/a/secret/at/all",
        "SAME_KEY": KEY,  # a value only once
    }
    assert named_secrets(["MY_API"], environ) == {
        "MY_API": KEY,
        "AWS_SECRET": "aws/secret/value/123",
        "DB_PASSWORD": "correct-horse-battery",
        "HF_TOKEN": "hf_abcdefghijklmnop",
    }
    assert secret_values(["MY_API"], environ)[0] == KEY
    assert secret_values([], {"OPENAI_API_KEY": "sk-1234567890"}) == ["sk-1234567890"]
    assert secret_values(["UNSET"], {}) == []


@pytest.mark.parametrize(
    "leak",
    [
        pytest.param(KEY, id="exact"),
        pytest.param(KEY[9:17], id="8-char fragment"),
        pytest.param(KEY[-12:], id="tail"),
        pytest.param(KEY[4:14], id="fragment across the prefix"),
        pytest.param(base64.b64encode(KEY.encode()).decode(), id="base64"),
        pytest.param(base64.b64encode(f"user:{KEY}".encode()).decode(), id="base64 at another offset"),
        pytest.param(base64.b64encode(f"ab:{KEY}".encode()).decode(), id="base64 at a third offset"),
        pytest.param(base64.b64encode(KEY[10:24].encode()).decode(), id="base64 of a fragment"),
        pytest.param(base64.urlsafe_b64encode(f"x{ODD_KEY}".encode()).decode(), id="urlsafe base64"),
        pytest.param(urllib.parse.quote(ODD_KEY, safe=""), id="url-encoded"),
        pytest.param(urllib.parse.quote_plus(ODD_KEY), id="form-encoded"),
    ],
)
def test_every_form_is_found_and_redacted(leak):
    text = f"server said: <{leak}> and more"
    secrets = {"MY_KEY": KEY, "ODD_KEY": ODD_KEY}
    found = find_secret(text, secrets)
    assert found is not None and ("$MY_KEY" in found or "$ODD_KEY" in found)
    assert KEY not in found and ODD_KEY not in found  # the name, never the value
    assert find_secret(text.encode("utf-8"), secrets) == found  # bytes payloads too
    clean = redact(text, secrets)
    assert clean.startswith("server said: <") and clean.endswith("> and more") and "***" in clean
    assert find_secret(clean, secrets) is None
    # no window of MIN_FRAGMENT characters of a plain leak survives (encoded ones: checked just above)
    assert leak not in KEY or not any(leak[i : i + MIN_FRAGMENT] in clean for i in range(len(leak) - MIN_FRAGMENT + 1))


def test_what_is_not_a_leak():
    secrets = {"MY_KEY": KEY}
    assert find_secret(f"7 chars {KEY[10:17]} only", secrets) is None  # below MIN_FRAGMENT
    assert find_secret("every project key starts with sk-proj- and that is public", secrets) is None
    assert find_secret("", secrets) is None and find_secret(b"\xff\xfe binary", secrets) is None
    assert redact("nothing here", secrets) == "nothing here"
    assert redact("short EMPTY key", ["EMPTY"]) == "short EMPTY key"  # placeholders are not secrets


def test_find_secret_names_what_leaked():
    secrets = {"INPARS_API_KEY": KEY}
    assert find_secret(json.dumps({"query": f"x {KEY} y"}), secrets) == "the value of $INPARS_API_KEY"
    assert find_secret(f"x {KEY[12:22]} y", secrets) == "a fragment of $INPARS_API_KEY"
    assert "base64" in find_secret(base64.b64encode(KEY.encode()).decode(), secrets)
    assert find_secret(f"x {KEY}", [KEY]) == "the value of secret #1"


def test_redact_merges_overlapping_matches():
    other = "tok_Lm3Nq8Rs2Tu7Vw"
    text = f"a {KEY}{other} b {KEY[9:20]} c"
    assert redact(text, [KEY, other]) == "a *** b *** c"
