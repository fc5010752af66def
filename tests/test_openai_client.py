"""billa.openai_client against a real local HTTP server with the real ``openai`` client (no mocks)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from billa.openai_client import ChatClient, ChatFailed, ContentRejected, OpenAIConfigError, UnparsableResponse

from .openai_server import OpenAIServer, Reply  # the openai_server fixture comes from conftest's pytest_plugins

KEY = "sk-test-5ecret-ABCDEF123456"
MESSAGES = [{"role": "user", "content": "What is 6 x 7?"}]


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("BILLA_TEST_OPENAI_KEY", KEY)
    return "BILLA_TEST_OPENAI_KEY"


def _client(server: OpenAIServer, key_env: str, **kwargs) -> ChatClient:
    options = dict(max_retries=4, backoff_s=0.01, backoff_max_s=1.0, timeout_s=2.0, seed=0)
    return ChatClient("test-model", base_url=server.url, api_key_env=key_env, **{**options, **kwargs})


def test_answer_usage_and_cache_across_clients(openai_server, key_env, tmp_path):
    """A second client on the same cache file pays nothing (bug: cache keyed wrongly or not reloaded -> re-paid)."""
    openai_server.respond = lambda messages, body: f"answer to: {messages[-1]['content']}"
    cache = tmp_path / "responses.jsonl"
    first = _client(openai_server, key_env, cache_path=cache)
    result = first.chat(MESSAGES)
    assert result.text == "answer to: What is 6 x 7?" and not result.cached
    assert openai_server.chat_requests()[0].headers["authorization"] == f"Bearer {KEY}"
    assert first.usage.requests == 1 and first.usage.prompt_tokens == 5 and first.usage.completion_tokens == 7
    first.close()

    second = _client(openai_server, key_env, cache_path=cache)
    again = second.chat(MESSAGES)
    assert again.text == result.text and again.cached and second.usage.cached == 1
    assert len(openai_server.chat_requests()) == 1  # nothing new was sent
    different = second.chat(MESSAGES, temperature=0.5)  # other parameters: another request
    assert not different.cached and len(openai_server.chat_requests()) == 2
    assert KEY not in cache.read_text()


@pytest.mark.parametrize(
    "fault",
    [Reply.rate_limited(0.01), Reply.server_error(500), Reply.server_error(503), Reply.malformed(), Reply.slow(1.0)],
    ids=["429", "500", "503", "malformed-json", "timeout"],
)
def test_transient_failures_are_retried(openai_server, key_env, fault):
    """Two failures then an answer: the call succeeds (bug: one kind of failure not retried -> the record is lost)."""
    openai_server.respond = lambda messages, body: "42"
    openai_server.inject(fault, fault)
    client = _client(openai_server, key_env, timeout_s=0.3)
    assert client.chat(MESSAGES).text == "42"
    assert len(openai_server.chat_requests()) == 3 and client.usage.retries == 2


def test_retry_budget_is_bounded(openai_server, key_env):
    """max_retries=2 sends exactly 3 requests then fails naming the status (bug: endless retry loop)."""
    openai_server.respond = lambda messages, body: Reply.server_error(502)
    client = _client(openai_server, key_env, max_retries=2)
    with pytest.raises(ChatFailed, match="HTTP 502; gave up after 3 requests") as err:
        client.chat(MESSAGES)
    assert not err.value.fatal and len(openai_server.chat_requests()) == 3


def test_retry_after_is_honoured_and_backoff_grows(openai_server, key_env):
    """A 429 with Retry-After 0.3 s delays the retry at least that long (bug: hammering a rate-limited API)."""
    openai_server.inject(Reply.rate_limited(0.3), Reply.server_error(), Reply.server_error())
    client = _client(openai_server, key_env, backoff_s=0.05)
    client.chat(MESSAGES)
    times = [r.time for r in openai_server.chat_requests()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.29  # Retry-After
    assert 0.05 <= gaps[1] and 0.1 <= gaps[2]  # backoff 0.05 x 2^1 and x 2^2, jitter x0.5-1.0


def test_bad_key_is_not_retried_and_not_echoed(key_env):
    """401 fails at once and marks the failure fatal (bug: retrying a wrong key 6 times per record)."""
    with OpenAIServer(api_key="another-key") as server:
        client = _client(server, key_env)
        with pytest.raises(ChatFailed) as err:
            client.chat(MESSAGES)
    assert err.value.status == 401 and err.value.fatal and len(server.requests) == 1
    assert KEY not in str(err.value)


def test_parse_rejections_ask_again_then_give_up_and_resume_from_cache(openai_server, key_env, tmp_path):
    """Rejected answers are retried up to `attempts`; a resumed client re-reads them (bug: paying twice)."""
    answers = iter(["no number here", "still none", "41", "42"])
    openai_server.respond = lambda messages, body: next(answers)

    def parse(text: str) -> int:
        if not text.isdigit():
            raise UnparsableResponse(f"no number in {text!r}")
        return int(text)

    cache = tmp_path / "responses.jsonl"
    client = _client(openai_server, key_env, cache_path=cache)
    with pytest.raises(ContentRejected) as err:
        client.chat(MESSAGES, parse=parse, attempts=2)
    assert err.value.reasons == ["answer 1: no number in 'no number here'", "answer 2: no number in 'still none'"]
    assert len(openai_server.chat_requests()) == 2
    client.close()

    resumed = _client(openai_server, key_env, cache_path=cache)
    result = resumed.chat(MESSAGES, parse=parse, attempts=3)  # answers 1-2 from the cache, answer 3 is new
    assert result.value == 41 and result.attempts == 3 and not result.cached
    assert len(openai_server.chat_requests()) == 3 and resumed.usage.cached == 2


def test_concurrency_is_bounded(openai_server, key_env):
    """No more than max_concurrency requests are in flight (bug: unbounded threads flood the API)."""
    active, peak, lock = 0, 0, threading.Lock()

    def respond(messages, body):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.1)
        with lock:
            active -= 1
        return messages[-1]["content"].upper()

    openai_server.respond = respond
    client = _client(openai_server, key_env, max_concurrency=3)
    items = [f"item {i}" for i in range(9)]
    results = dict(client.map_unordered(lambda s: client.chat([{"role": "user", "content": s}]).text, items))
    assert results == {s: s.upper() for s in items}
    assert peak == 3


def test_rate_limit_spaces_requests(openai_server, key_env):
    """600 requests/minute = one start per 0.1 s across threads (bug: limiter per thread, not shared)."""
    client = _client(openai_server, key_env, max_concurrency=4, requests_per_minute=600)
    list(client.map_unordered(lambda i: client.chat([{"role": "user", "content": str(i)}]), range(6)))
    times = sorted(r.time for r in openai_server.chat_requests())
    assert len(times) == 6 and times[-1] - times[0] >= 0.45  # 5 intervals of 0.1 s (arrival jitter aside)


def test_map_unordered_returns_exceptions_per_item(openai_server, key_env):
    """A failing item does not stop the others (bug: one bad record aborts a paid run)."""
    client = _client(openai_server, key_env)

    def work(i: int) -> int:
        if i == 2:
            raise ValueError("bad item")
        return i * 10

    results = dict(client.map_unordered(work, range(5)))
    assert isinstance(results.pop(2), ValueError) and results == {0: 0, 1: 10, 3: 30, 4: 40}


def test_preflight_missing_key_names_the_variable(openai_server, monkeypatch):
    """No key: a clear error naming the variable, and no request sent (bug: a stack trace deep inside openai)."""
    monkeypatch.delenv("BILLA_TEST_OPENAI_KEY", raising=False)
    client = _client(openai_server, "BILLA_TEST_OPENAI_KEY")
    with pytest.raises(OpenAIConfigError, match="BILLA_TEST_OPENAI_KEY is unset or empty"):
        client.preflight()
    assert openai_server.requests == []


def test_preflight_unreachable_endpoint(key_env):
    """A closed port: 'cannot reach <url> (client.base_url)' within the pre-flight timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    client = ChatClient("m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=key_env, preflight_timeout_s=2)
    with pytest.raises(OpenAIConfigError, match=rf"cannot reach http://127.0.0.1:{port}/v1 \(client.base_url\)"):
        client.preflight()


def test_preflight_rejected_key_and_success(key_env):
    """A wrong key is reported as such without echoing it; the right key passes."""
    with OpenAIServer(api_key="another-key") as server:
        with pytest.raises(OpenAIConfigError, match="rejected the API key in \\$BILLA_TEST_OPENAI_KEY") as err:
            _client(server, key_env).preflight()
        assert KEY not in str(err.value)
    with OpenAIServer(api_key=KEY) as server:
        _client(server, key_env).preflight()
        assert [r.path for r in server.requests] == ["/v1/models"]


def test_no_key_mode_for_servers_without_auth(openai_server):
    """api_key_env=None works with a server that needs no key (vLLM)."""
    client = ChatClient("test-model", base_url=openai_server.url, api_key_env=None)
    client.preflight()
    assert client.chat(MESSAGES).text == "ok"
