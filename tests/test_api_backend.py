"""The OpenAI-compatible API backend against a REAL llama.cpp server (llama-cpp-python[server]) on
loopback serving the packaged SmolLM2 GGUF, with faults injected by tests/faultproxy.py; what the client
sends (Azure, organization, project, Retry-After) and a server echoing the key, against the recording
server of tests/apiserver.py.

Server tests are marked ``server`` and skip when llama_cpp is not importable.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from inpars.backends.base import GenerationBackend, query_tokens
from inpars.backends.journal import AnswerJournal
from inpars.backends.openai_api import OpenAIBackend
from inpars.config import GenerateConfig
from inpars.corpus import read_corpus
from inpars.errors import ConfigError, InParsError, TransientError
from inpars.usage import BudgetExceeded, BudgetGuard, PriceTable, Usage, estimate_cost

sys.path.insert(0, str(Path(__file__).parent))
from apiserver import ApiServer, answer_completions, completion, echo_authorization
from faultproxy import FaultProxy

KEY_ENV = "INPARS_TEST_API_KEY"
SERVER_KEY = "sk-inpars-test-4f9a1c77e2"  # the key the server accepts
WRONG_KEY = "sk-WRONG-9d8e7f6a5b4c3d2e1f"  # a key the server rejects; must never leak
SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample" / "corpus.jsonl"
TEMPLATE = (
    "Example 1:\nDocument: Aspirin lowers fever and pain by blocking COX enzymes.\nRelevant Query: how does aspirin reduce fever\n\n"
    "Example 2:\nDocument: {doc}\nRelevant Query:"
)
N_DOCS = 4
# One server thread: on a shared 2-core machine, llama.cpp's 2 threads stall each other at every
# barrier when a core is taken (measured: 0.2 s requests taking 10-50 s); one thread stays ~0.7 s.
THREADS = os.environ.get("INPARS_TEST_LLAMA_THREADS", "1")
NEW = 16  # max_new_tokens: the tests' queries are short; the machine is small and shared


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """``python -m llama_cpp.server`` on a free loopback port (THREADS threads, n_ctx 1024), key-protected."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] not installed")
    from inpars.models import resolve_model

    try:
        source = resolve_model("smollm2-135m")
    except ConfigError as e:
        pytest.skip(str(e))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = tmp_path_factory.mktemp("llama") / "server.log"
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(Path(source.name_or_path) / source.gguf_file),
                "--model_alias",
                "smollm2-135m",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "1024",
                "--n_threads",
                THREADS,
                "--n_threads_batch",
                THREADS,
                "--logits_all",
                "true",
                "--verbose",
                "false",
                "--api_key",
                SERVER_KEY,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited ({proc.returncode}): {logfile.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {SERVER_KEY}"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama.cpp server did not start within 180 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    return KEY_ENV


def _backend(base_url: str, **kw) -> OpenAIBackend:
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("concurrency", 4)
    kw.setdefault("request_timeout", 60.0)
    return OpenAIBackend("smollm2-135m", base_url=base_url, **kw)


@pytest.fixture(scope="session")
def prompts(llama_server):
    """Prompts over the first sample documents, cut to 32 tokens by the server's own tokenizer."""
    os.environ.setdefault(KEY_ENV, SERVER_KEY)
    backend = _backend(f"{llama_server}/v1")
    docs = list(read_corpus(SAMPLE).values())[:N_DOCS]
    out = [TEMPLATE.format(doc=backend.truncate(d.contents, 32)) for d in docs]
    backend.close()
    return out


@pytest.fixture(scope="session")
def reference(llama_server, prompts):
    """Greedy generations one request at a time: what every other run must reproduce."""
    os.environ.setdefault(KEY_ENV, SERVER_KEY)
    backend = _backend(f"{llama_server}/v1", concurrency=1)
    return backend.generate(prompts, max_new_tokens=NEW)


def _texts(generations):
    return [g.text for g in generations]


# ---------------------------------------------------------------------------- generation


@pytest.mark.server
def test_generates_in_order_with_finite_log_probs(llama_server, prompts, reference, key_env):
    backend = _backend(f"{llama_server}/v1", concurrency=4)
    rows = backend.generate(prompts, max_new_tokens=NEW)
    assert len(rows) == len(prompts)
    assert _texts(rows) == _texts(reference)  # concurrency keeps input order
    assert sum(1 for g in rows if g.text) >= len(rows) - 1
    for g in rows:
        assert "\n" not in g.text and g.text == g.text.strip()
        assert len(g.tokens) == len(g.log_probs)
        assert all(math.isfinite(v) and v <= 0 for v in g.log_probs)
        assert g.prompt_tokens > 0 and g.completion_tokens >= len(g.tokens)
        assert g.text.replace(" ", "") in "".join(g.tokens).replace(" ", "") or not g.text
    assert any(v < 0 for g in rows for v in g.log_probs)
    assert backend.usage.requests == len(prompts)
    assert backend.usage.prompt_tokens == sum(g.prompt_tokens for g in rows)
    assert backend.usage.completion_tokens == sum(g.completion_tokens for g in rows)
    assert backend.last_usage.to_dict() == backend.usage.to_dict()
    assert backend.usage.total_retries == 0 and backend.usage.errors == 0


@pytest.mark.server
def test_chat_endpoint_log_probs(llama_server, key_env):
    backend = _backend(f"{llama_server}/v1", chat=True)
    rows = backend.generate(["Write one short search query about aspirin and fever."], max_new_tokens=12)
    assert len(rows) == 1 and rows[0].tokens and len(rows[0].tokens) == len(rows[0].log_probs)
    assert all(math.isfinite(v) and v <= 0 for v in rows[0].log_probs)


@pytest.mark.server
def test_server_tokenizer_truncates_and_counts(llama_server, key_env):
    backend = _backend(f"{llama_server}/v1")
    assert backend.tokenizer_kind == "server:llama-cpp-python"
    text = "Glioblastomas are deadly cancers that display a functional cellular hierarchy maintained by stem cells."
    n = backend.count_tokens(text)
    assert 10 < n < 40
    cut = backend.truncate(text, 8)
    assert text.startswith(cut.rstrip()) and len(cut) < len(text)
    assert backend.count_tokens(cut) <= 8
    assert backend.truncate(text, n) == text


# ---------------------------------------------------------------------------- faults


@pytest.mark.server
def test_faults_are_retried_and_counted(llama_server, prompts, reference, key_env):
    rates = {"429": 0.2, "500": 0.2, "drop": 0.2}
    with FaultProxy(llama_server, seed=1, rates=rates) as proxy:  # seed 1: 2x 429, 1x 500, 1x drop
        backend = _backend(f"{proxy.url}/v1", concurrency=4, max_retries=30)
        rows = backend.generate(prompts, max_new_tokens=NEW)
    assert _texts(rows) == _texts(reference)  # complete, in order, same queries
    injected = sum(proxy.faults.values())
    assert injected >= 3 and len(proxy.faults) == 3, proxy.faults  # every kind met at least once
    # each prompt reached the server successfully exactly once: nothing re-requested after success
    assert proxy.upstream_ok == Counter({p: 1 for p in prompts})
    assert proxy.requests == len(prompts) + injected
    assert backend.usage.retries == Counter(
        {"rate_limited": proxy.faults["429"], "server_error": proxy.faults["500"], "connection": proxy.faults["drop"]}
    )
    assert backend.usage.requests == len(prompts) and backend.usage.errors == 0


@pytest.mark.server
def test_timeouts_are_retried(llama_server, prompts, reference, key_env):
    # One request at a time, so a real answer never waits behind others and only stalls time out.
    with FaultProxy(llama_server, seed=2, rates={"stall": 0.3}, stall_s=8.0) as proxy:  # seed 2: one stall
        backend = _backend(f"{proxy.url}/v1", concurrency=1, max_retries=3, request_timeout=6.0)
        rows = backend.generate(prompts[:2], max_new_tokens=NEW)
    assert _texts(rows) == _texts(reference[:2])
    assert proxy.faults["stall"] >= 1
    assert backend.usage.retries == Counter({"timeout": proxy.faults["stall"]})


@pytest.mark.server
def test_retries_exhausted_is_transient(llama_server, prompts, key_env):
    with FaultProxy(llama_server, seed=0, rates={"500": 0.999}) as proxy:
        backend = _backend(f"{proxy.url}/v1", concurrency=1, max_retries=2)
        with pytest.raises(TransientError, match="HTTP 500.*after 2 retries"):
            backend.generate(prompts[:1], max_new_tokens=8)
    assert backend.usage.retries == Counter({"server_error": 2}) and backend.usage.errors == 1


# ---------------------------------------------------------------------------- clear stops


def _assert_no_key(text: str) -> None:
    assert WRONG_KEY not in text and SERVER_KEY not in text
    assert WRONG_KEY[6:20] not in text  # not even a fragment


@pytest.mark.server
@pytest.mark.parametrize("through_proxy", [False, True])
def test_rejected_key_stops_at_once_without_leaking_it(llama_server, prompts, monkeypatch, caplog, capsys, through_proxy):
    monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    caplog.set_level(logging.DEBUG)
    with FaultProxy(llama_server, mode="401" if through_proxy else None) as proxy:
        base = f"{proxy.url}/v1" if through_proxy else f"{llama_server}/v1"
        backend = _backend(base, max_retries=5)
        started = time.monotonic()
        with pytest.raises(ConfigError, match="API key rejected by") as info:
            backend.generate(prompts[:2], max_new_tokens=8)
        assert time.monotonic() - started < 5  # no retries on 401
    message = str(info.value)
    assert base in message and KEY_ENV in message
    out = capsys.readouterr()
    for text in (message, repr(info.value), repr(backend), str(vars(backend.usage)), caplog.text, out.out, out.err):
        _assert_no_key(text)
    assert backend.usage.total_retries == 0


@pytest.mark.server
def test_key_never_in_logs_or_rows_on_success(llama_server, prompts, key_env, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    backend = _backend(f"{llama_server}/v1")
    rows = backend.generate(prompts[:2], max_new_tokens=8)
    out = capsys.readouterr()
    for text in (caplog.text, out.out, out.err, repr(backend), repr(rows)):
        assert SERVER_KEY not in text


@pytest.mark.server
def test_not_found_names_model_and_url(llama_server, prompts, key_env):
    backend = _backend(f"{llama_server}/v2")  # the real server: no such endpoint
    with pytest.raises(ConfigError, match=r"model 'smollm2-135m' or endpoint .*/v2/completions not found \(HTTP 404\)"):
        backend.generate(prompts[:1], max_new_tokens=8)
    with FaultProxy(llama_server, mode="404") as proxy:  # an OpenAI-style "model does not exist"
        backend = _backend(f"{proxy.url}/v1")
        with pytest.raises(ConfigError, match="smollm2-135m.*does not exist"):
            backend.generate(prompts[:1], max_new_tokens=8)


def test_dead_endpoint_fails_clearly_and_quickly(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    backend = _backend(url, max_retries=3)
    started = time.monotonic()
    with pytest.raises(TransientError, match=f"cannot reach {url}.*after 3 retries"):
        backend.generate(["a", "b", "c"], max_new_tokens=8)
    assert time.monotonic() - started < 10
    assert backend.usage.retries["connection"] >= 3


def test_openai_without_key_is_a_config_error(monkeypatch):
    monkeypatch.delenv("INPARS_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="INPARS_NO_SUCH_KEY"):
        OpenAIBackend("gpt-4o-mini", api_key_env="INPARS_NO_SUCH_KEY")


# ---------------------------------------------------------------------------- budget


@pytest.mark.server
def test_budget_stops_cleanly_before_exceeding(llama_server, prompts, reference, key_env):
    prices = {"prompt": 1000.0, "completion": 2000.0}  # USD per 1M tokens: 1 token = $0.001 / $0.002
    backend = _backend(f"{llama_server}/v1", concurrency=4, prices=prices, budget_usd=0.0)
    table = PriceTable.for_model("smollm2-135m", prices)
    worst = [table.cost(backend.count_tokens(p), NEW) for p in prompts]
    budget = sum(worst[:2]) + 0.5 * worst[2]  # room for 2 worst cases; real answers are shorter
    backend = _backend(f"{llama_server}/v1", concurrency=4, prices=prices, budget_usd=budget)
    with pytest.raises(BudgetExceeded) as info:
        backend.generate(prompts, max_new_tokens=NEW)
    done = info.value.completed
    assert 2 <= len(done) < len(prompts)
    assert _texts(done) == _texts(reference[: len(done)])  # a clean prefix, in order
    spent = estimate_cost(backend.usage, table)
    assert spent == pytest.approx(backend.cost_usd) and spent <= budget
    assert spent + worst[len(done)] > budget  # it stopped because the next one might not fit
    assert backend.usage.requests == len(done) and info.value.usage.requests == len(done)
    assert backend.budget.reserved == pytest.approx(0.0)
    summary = backend.usage_summary()
    assert summary["requests"] == len(done) and summary["cost_usd"] == pytest.approx(spent, abs=1e-6)
    assert summary["budget_usd"] == budget and "smollm2-135m" == summary["model"]


def test_budget_guard_units():
    guard = BudgetGuard(0.01, PriceTable(prompt=1000.0, completion=1000.0))  # $0.001 per token
    r1 = guard.reserve(4, 4)  # worst $0.008
    with pytest.raises(BudgetExceeded):
        guard.reserve(1, 2)  # would book 0.011 > 0.01
    assert guard.settle(r1, 4, 1) == pytest.approx(0.005)
    guard.reserve(1, 2)  # now fits: 0.005 + 0.003
    with pytest.raises(ConfigError, match="prices"):
        BudgetGuard(1.0, None)
    assert BudgetGuard(None, None).reserve(10**6, 10**6).cost == 0.0


def test_prices_and_usage():
    assert PriceTable.for_model("gpt-4o-mini-2024-07-18") == PriceTable.for_model("gpt-4o-mini")
    assert PriceTable.for_model("my-local-model") is None
    assert PriceTable.for_model("gpt-4o", {"prompt": 1.0}) == PriceTable(1.0, 0.0)
    with pytest.raises(ConfigError):
        PriceTable.for_model("x", {"input": 1.0})
    u = Usage(1_000_000, 500_000, 3, Counter({"timeout": 2}), 0)
    assert estimate_cost(u, PriceTable(2.0, 4.0)) == pytest.approx(4.0)
    total = Usage()
    total.add(u)
    total.add(Usage.from_dict(u.to_dict()))
    assert total.to_dict() == {
        "prompt_tokens": 2_000_000,
        "completion_tokens": 1_000_000,
        "requests": 6,
        "retries": {"timeout": 4},
        "errors": 0,
    }
    assert (total - u).to_dict() == u.to_dict()


# ---------------------------------------------------------------------------- small units


def test_query_tokens_cut_at_newline():
    assert query_tokens([" what", " is", "\n", " x"], [-1.0, -0.5, -0.1, -2.0]) == ([" what", " is"], [-1.0, -0.5])
    assert query_tokens([" why", "?\n"], [-1.0, -0.2]) == ([" why", "?\n"], [-1.0, -0.2])
    assert query_tokens(["\n"], [-0.1]) == ([], [])
    tokens, values = query_tokens([" a", " b"], [None, float("-inf")])
    assert tokens == [" a", " b"] and all(math.isfinite(v) for v in values)


def test_repr_and_errors_hide_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, WRONG_KEY)
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    assert WRONG_KEY not in repr(backend) and WRONG_KEY not in str(backend)
    config = GenerateConfig(backend="openai", base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    assert WRONG_KEY not in repr(config)
    assert OpenAIBackend.from_config(config).model == "smollm2-135m"


# ---------------------------------------------------------------------------- agreement


@pytest.mark.server
@pytest.mark.slow
def test_agrees_with_transformers_backend(llama_server, prompts, reference, record_property):
    """Same GGUF, same prompts, greedy: llama.cpp (Q4_1 kernels) vs transformers (dequantized fp32)."""
    module = pytest.importorskip("inpars.backends.transformers_backend")
    local = module.TransformersBackend("smollm2-135m", dtype="float32", device="cpu", batch_size=len(prompts))
    try:
        rows = local.generate(prompts, max_new_tokens=NEW)
    finally:
        local.close()
    agreement = sum(a.text == b.text for a, b in zip(reference, rows)) / len(rows)
    deltas = []
    for a, b in zip(reference, rows):
        for ta, tb, va, vb in zip(a.tokens, b.tokens, a.log_probs, b.log_probs):
            if ta != tb.replace("\u0120", " "):  # byte-level BPE spells a leading space as "Ġ"
                break  # past the first differing token the contexts differ
            deltas.append(abs(va - vb))
    mean_delta = sum(deltas) / len(deltas)
    record_property("text_agreement", agreement)
    record_property("mean_abs_delta_logprob", mean_delta)
    print(f"llama.cpp vs transformers: {agreement:.0%} same queries, mean |Δ log-prob| {mean_delta:.4f} over {len(deltas)} tokens")
    assert agreement >= 0.5
    assert len(deltas) >= 10 and mean_delta < 0.15


# ---------------------------------------------------------------------------- vLLM


def test_vllm_unavailable_gives_clear_error():
    from inpars.backends import get_backend
    from inpars.backends.vllm_backend import VLLMBackend

    if VLLMBackend.is_available():
        pytest.skip("vLLM and CUDA are available here")
    with pytest.raises(ConfigError, match="vllm"):
        get_backend("vllm", GenerateConfig(backend="vllm"))
    with pytest.raises(ConfigError, match="CUDA image"):
        VLLMBackend.from_config(GenerateConfig(backend="vllm"))


@pytest.mark.server
def test_journal_means_answered_documents_are_never_requested_again(llama_server, prompts, reference, key_env, tmp_path):
    journal = tmp_path / "journal.jsonl"
    with FaultProxy(llama_server, seed=0) as proxy:
        first = _backend(f"{proxy.url}/v1")
        first.use_journal(journal)
        first.generate(prompts[:2], max_new_tokens=NEW)  # then the worker "crashes"
        with open(journal, "a", encoding="utf-8") as f:
            f.write('{"key": "torn')  # a write cut short by the crash is ignored
        again = _backend(f"{proxy.url}/v1")
        again.use_journal(journal)
        rows = again.generate(prompts, max_new_tokens=NEW)
    assert _texts(rows) == _texts(reference)
    assert again.replayed == 2 and again.usage.requests == len(prompts) - 2
    assert proxy.upstream_ok == Counter({p: 1 for p in prompts})  # each document answered exactly once


@pytest.mark.server
def test_generate_worker_through_the_api(llama_server, key_env, tmp_path):
    """The generate stage with backend=openai: rows committed, usage in the attempt record, journal cleaned up."""
    from inpars.config import PipelineConfig
    from inpars.workers import run_stage
    from inpars.workspace import Run

    config = PipelineConfig().override(
        {
            "generate.backend": "openai",
            "generate.base_url": f"{llama_server}/v1",
            "generate.model": "smollm2-135m",
            "generate.api_key_env": KEY_ENV,
            "generate.n_docs": 3,
            "generate.max_new_tokens": NEW,
            "generate.max_doc_tokens": 32,
            "generate.checkpoint_every": 2,
            "generate.concurrency": 2,
        }
    )
    run = Run.create(str(tmp_path / "ws"), config, "api-run")
    assert run_stage(run.uri, "prepare", 0) is True
    assert run_stage(run.uri, "generate", 0) is True
    rows = run.read_rows("generate", 1)
    assert len(rows) == 3 and all(r["log_probs"] and "\n" not in r["query"] for r in rows)
    # Request and retry counts differ between attempts: they are in the attempt's record, not committed.
    assert "api" not in run.shard_marker("generate", 0, 1)["stats"]
    api = next(a for a in run.attempts("generate", 0, 1) if a.get("outcome") == "committed")["api"]
    assert api["requests"] == 3 and api["prompt_tokens"] > 0
    assert api["completion_tokens"] >= sum(len(r["log_probs"]) for r in rows)  # the server also counts the stop token
    assert not any((tmp_path / "ws" / "runs" / "api-run" / "generate" / "_journal").glob("*.jsonl"))
    manifest = (tmp_path / "ws" / "runs" / "api-run" / "manifest.json").read_text()
    assert SERVER_KEY not in manifest and SERVER_KEY not in json.dumps(rows)


# ---------------------------------------------------------------------------- what the client sends (recording server)


def _stub_backend(url: str, **kw) -> OpenAIBackend:
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("request_timeout", 10.0)
    return OpenAIBackend(kw.pop("model", "smollm2-135m"), base_url=url, **kw)


@pytest.mark.parametrize("chat", [False, True])
def test_organization_and_project_pass_through(key_env, chat):
    with ApiServer() as server:
        backend = _stub_backend(f"{server.url}/v1", organization="org-inpars-1", project="proj_inpars_2", chat=chat, concurrency=2)
        rows = backend.generate(["first prompt", "second prompt"], max_new_tokens=8)
    assert [g.text for g in rows] == ["what does aspirin do"] * 2
    assert all(len(g.tokens) == len(g.log_probs) == 4 for g in rows)
    assert len(server.requests) == 2
    for request in server.requests:
        assert request.path == ("/v1/chat/completions" if chat else "/v1/completions")
        assert request.headers["authorization"] == f"Bearer {SERVER_KEY}"
        assert request.headers["openai-organization"] == "org-inpars-1"
        assert request.headers["openai-project"] == "proj_inpars_2"
        assert request.body["model"] == "smollm2-135m" and request.body["stop"] == ["\n"] and request.body["max_tokens"] == 8
        assert request.body["logprobs"] is True if chat else request.body["logprobs"] == 1
    prompts = sorted(r.body["messages"][-1]["content"] if chat else r.body["prompt"] for r in server.requests)
    assert prompts == ["first prompt", "second prompt"]  # one prompt per request


@pytest.mark.parametrize("chat", [False, True])
def test_azure_pass_through(key_env, chat):
    with ApiServer() as server:
        backend = _stub_backend(server.url, model="my-deployment", api_version="2024-10-21", chat=chat)
        assert backend.endpoint == f"{server.url}/openai/deployments/my-deployment/{'chat/completions' if chat else 'completions'}"
        rows = backend.generate(["a prompt"], max_new_tokens=8)
        assert backend.tokenizer_kind == "approx"  # Azure has no tokenize endpoint: none is probed
    assert rows[0].text == "what does aspirin do"
    (request,) = server.requests
    assert request.path == f"/openai/deployments/my-deployment/{'chat/completions' if chat else 'completions'}"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == SERVER_KEY and "authorization" not in request.headers


def test_azure_needs_endpoint_and_key(monkeypatch):
    monkeypatch.delenv("INPARS_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIBackend("dep", api_version="2024-10-21", api_key_env=KEY_ENV)
    with pytest.raises(ConfigError, match="INPARS_NO_SUCH_KEY"):
        OpenAIBackend("dep", base_url="https://x.openai.azure.com", api_version="2024-10-21", api_key_env="INPARS_NO_SUCH_KEY")


def test_settings_come_from_the_config(key_env):
    config = GenerateConfig(
        backend="openai",
        base_url="https://x.openai.azure.com",
        api_key_env=KEY_ENV,
        model="dep",
        organization="o",
        project="p",
        api_version="v1",
    )
    backend = OpenAIBackend.from_config(config)
    assert (backend.azure, backend.organization, backend.project, backend.api_version) == (True, "o", "p", "v1")
    assert SERVER_KEY not in repr(config) and SERVER_KEY not in repr(backend)


def test_no_key_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("INPARS_NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-this-server-0123456789")  # never picked up by the SDK
    with ApiServer() as server:
        backend = _stub_backend(f"{server.url}/v1", api_key_env="INPARS_NO_SUCH_KEY")
        backend.generate(["p"], max_new_tokens=4)
    assert "authorization" not in server.requests[0].headers


@pytest.mark.parametrize(
    "echo",
    [
        pytest.param(lambda key: key, id="whole"),
        pytest.param(lambda key: key[5:17], id="fragment"),
        pytest.param(lambda key: base64.b64encode(f"user:{key}".encode()).decode(), id="base64"),
    ],
)
def test_echoing_server_never_hands_back_the_key(key_env, tmp_path, caplog, echo):
    caplog.set_level(logging.DEBUG)
    journal = AnswerJournal(tmp_path / "journal.jsonl")
    with ApiServer(echo_authorization(echo)) as server:
        backend = _stub_backend(f"{server.url}/v1", concurrency=1)
        backend.use_journal(journal)
        with pytest.raises(ConfigError, match=f"{KEY_ENV}.*echoes credentials") as info:
            backend.generate(["p1", "p2"], max_new_tokens=8)
    for text in (str(info.value), repr(info.value), caplog.text):
        assert SERVER_KEY not in text and SERVER_KEY[5:17] not in text
    assert len(journal) == 0 and not (tmp_path / "journal.jsonl").exists()  # nothing kept
    assert backend.usage.requests == 0 and backend.usage.errors == 1
    assert len(server.requests) == 1  # permanent: not retried, the next prompt never sent


def test_error_bodies_are_redacted(key_env):
    leaked = f"bad request from {SERVER_KEY[8:20]}, full {SERVER_KEY}, b64 {base64.b64encode(SERVER_KEY.encode()).decode()}"
    with ApiServer(lambda request: (400, {}, {"error": {"message": leaked, "type": "invalid_request_error"}})) as server:
        backend = _stub_backend(f"{server.url}/v1")
        with pytest.raises(InParsError, match=r"refused the request .*HTTP 400.*bad request from") as info:
            backend.generate(["p"], max_new_tokens=4)
    message = str(info.value)
    assert SERVER_KEY not in message and SERVER_KEY[8:20] not in message and SERVER_KEY[10:18] not in message
    assert base64.b64encode(SERVER_KEY.encode()).decode()[:12] not in message
    assert not isinstance(info.value, TransientError) and len(server.requests) == 1


def _rate_limited_once(headers: dict[str, str]):
    """A server's answers: 429 with ``headers`` for the first request, then normal answers."""
    seen = Counter()

    def respond(request):
        seen["requests"] += 1
        return (429, headers, {"error": {"message": "slow down"}}) if seen["requests"] == 1 else answer_completions(request)

    return respond


@pytest.mark.parametrize(
    "headers, at_least, below",
    [
        ({"Retry-After": "1"}, 0.95, 30),
        ({"retry-after-ms": "1200", "Retry-After": "30"}, 1.15, 30),  # OpenAI's milliseconds win
        ({"Retry-After": "HTTP-DATE+3"}, 1.0, 30),  # an HTTP date (one-second resolution)
        ({"Retry-After": "soon"}, 0.0, 30),  # unreadable: the SDK's own backoff
    ],
)
def test_retry_after_forms_are_honoured(key_env, headers, at_least, below):
    """The SDK waits what 429's Retry-After / retry-after-ms ask; the retry is counted as rate_limited.
    (Lower bounds only: a wait can be late on a busy machine, never early.)"""
    headers = {k: (email.utils.formatdate(time.time() + 3, usegmt=True) if v == "HTTP-DATE+3" else v) for k, v in headers.items()}
    with ApiServer(_rate_limited_once(headers)) as server:
        backend = _stub_backend(f"{server.url}/v1", max_retries=2)
        rows = backend.generate(["p"], max_new_tokens=4)
    assert rows[0].text == "what does aspirin do"
    first, second = server.requests
    assert at_least <= second.at - first.at < below
    assert second.headers["x-stainless-retry-count"] == "1"
    assert backend.usage.retries == Counter({"rate_limited": 1}) and backend.usage.requests == 1


def test_retry_after_beyond_the_sdk_cap_is_transient_at_once(key_env):
    """The SDK does not wait longer than its cap (120 s): such a 429 is not retried; the worker exits
    transient (to be retried later by the launcher) saying what the server asked for."""
    with ApiServer(lambda request: (429, {"Retry-After": "600"}, {"error": {"message": "quota"}})) as server:
        backend = _stub_backend(f"{server.url}/v1", max_retries=5)
        started = time.monotonic()
        with pytest.raises(TransientError, match=r"HTTP 429 \(rate limited; the server asked for retry-after: 600\), after 0 retries"):
            backend.generate(["p"], max_new_tokens=4)
        assert time.monotonic() - started < 30
    assert len(server.requests) == 1 and backend.usage.total_retries == 0 and backend.usage.errors == 1


def test_server_errors_are_retried_by_the_sdk_and_counted(key_env):
    calls = Counter()

    def respond(request):
        calls["n"] += 1
        return (503, {}, {"error": {"message": "busy"}}) if calls["n"] <= 2 else (200, {}, completion(request.body))

    with ApiServer(respond) as server:
        backend = _stub_backend(f"{server.url}/v1", max_retries=3)
        rows = backend.generate(["p"], max_new_tokens=4)
    assert rows[0].text and len(server.requests) == 3
    assert backend.usage_summary()["retries"] == {"server_error": 2}


def test_optional_backend_hooks_are_declared(tmp_path):
    """Callers use the hooks declared on GenerationBackend, never hasattr: neutral defaults, overridden by the API."""
    from inpars.backends import backend_class

    assert {name: backend_class(name).supports_journal for name in ("transformers", "openai", "vllm")} == {
        "transformers": False,
        "openai": True,
        "vllm": False,
    }
    assert backend_class("transformers").usage_summary is GenerationBackend.usage_summary
    assert backend_class("openai").usage_summary is not GenerationBackend.usage_summary

    class Minimal(GenerationBackend):
        model_identity = "m"
        from_config = generate = truncate = count_tokens = None

    plain = Minimal()
    plain.use_journal(tmp_path / "journal.jsonl")  # a no-op
    assert plain.usage_summary() is None and plain.batch_size == 1 and not (tmp_path / "journal.jsonl").exists()
