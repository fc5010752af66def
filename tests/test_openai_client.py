"""billa.openai_client against a real local HTTP server with the real ``openai`` client (no mocks)."""

from __future__ import annotations

import json
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
    return ChatClient("test-model", api_key_env=key_env, **{"base_url": server.url, **options, **kwargs})


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
    [Reply.rate_limited(0.01), Reply.server_error(500), Reply.server_error(503), Reply.malformed(), Reply.slow(3.0)],
    ids=["429", "500", "503", "malformed-json", "timeout"],
)
def test_transient_failures_are_retried(openai_server, key_env, fault):
    """Two failures then an answer: the call succeeds (bug: one kind of failure not retried -> the record is lost)."""
    openai_server.respond = lambda messages, body: "42"
    openai_server.inject(fault, fault)
    client = _client(openai_server, key_env, timeout_s=1.0)  # generous: a loaded CI machine must not time out
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
        client.chat(MESSAGES, parse=parse, attempts=2, temperature=0.0, retry_params={"temperature": 0.9})
    assert err.value.reasons == ["answer 1: no number in 'no number here'", "answer 2: no number in 'still none'"]
    assert len(openai_server.chat_requests()) == 2
    client.close()

    temperatures = [r.body["temperature"] for r in openai_server.chat_requests()]
    assert temperatures == [0.0, 0.9]  # retry_params apply from the second answer on
    resumed = _client(openai_server, key_env, cache_path=cache)
    result = resumed.chat(MESSAGES, parse=parse, attempts=3, temperature=0.0, retry_params={"temperature": 0.9})
    # answers 1-2 came from the cache, answer 3 is new
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
        time.sleep(0.2)
        with lock:
            active -= 1
        return messages[-1]["content"].upper()

    openai_server.respond = respond
    client = _client(openai_server, key_env, max_concurrency=3)
    items = [f"item {i}" for i in range(9)]
    results = dict(client.map_unordered(lambda s: client.chat([{"role": "user", "content": s}]).text, items))
    assert results == {s: s.upper() for s in items}
    assert 2 <= peak <= 3  # concurrent, and never above the bound (== 3 unless the machine is very loaded)


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


def test_unknown_request_parameter_is_named_at_construction(openai_server, key_env):
    """A typo in client.params fails before any request, naming the key (bug: 7 requests per record, then 'failed')."""
    with pytest.raises(ValueError, match=r"client.params: unknown chat.completions parameter\(s\) \['temprature'\]"):
        _client(openai_server, key_env, params={"temprature": 0.7})
    client = _client(openai_server, key_env, params={"temperature": 0.7, "extra_body": {"top_k": 20}})
    assert client.chat(MESSAGES).text == "ok"
    assert (
        openai_server.chat_requests()[0].body["top_k"] == 20
        and openai_server.chat_requests()[0].body["temperature"] == 0.7
    )


def test_cache_survives_a_corrupt_line_and_a_partial_tail(openai_server, key_env, tmp_path, caplog):
    """A killed writer's partial last line and a corrupt line: other answers are still served, new ones appended on
    a fresh line (bugs: the cache unreadable after a kill; a new line glued to the partial one; offsets off by the
    cut bytes)."""
    openai_server.respond = lambda messages, body: "好的：" + messages[-1]["content"]  # multi-byte characters
    cache = tmp_path / "responses.jsonl"
    first = _client(openai_server, key_env, cache_path=cache)
    first.chat(MESSAGES)
    first.close()
    with open(cache, "a", encoding="utf-8") as f:
        f.write("not json\n")
        f.write('{"key": "abc#0", "text": "cut sh')
    other = [{"role": "user", "content": "答案是什么？"}]
    second = _client(openai_server, key_env, cache_path=cache)
    assert second.chat(MESSAGES).cached and "skipped" in caplog.text
    assert not second.chat(other).cached
    assert second.chat(other).cached  # read back through its offset in the same process
    second.close()
    third = _client(openai_server, key_env, cache_path=cache)
    assert third.chat(other).text == "好的：答案是什么？" and third.chat(MESSAGES).cached
    assert len(openai_server.chat_requests()) == 2
    assert "cut sh" not in cache.read_text(encoding="utf-8")


def test_a_key_pasted_as_the_variable_name_is_refused_without_echo(openai_server):
    """client.api_key_env=sk-... (the key instead of its variable's name): refused, and the error hides it."""
    with pytest.raises(ValueError, match="must be the NAME of an environment variable") as err:
        ChatClient("test-model", base_url=openai_server.url, api_key_env=KEY)
    assert KEY not in str(err.value)


def test_body_cut_inside_a_multibyte_character_is_retried_counted_and_not_fatal(openai_server, key_env):
    """A complete HTTP 200 whose JSON body was cut inside a UTF-8 character (Chinese text behind a proxy): the
    ``openai`` client raises UnicodeDecodeError, not a JSON error. Bug caught: that error escaping the retry loop
    (it killed rationale.py after 46 of 60 records) instead of counting as a malformed body."""
    from .openai_server import cut_inside_multibyte

    body = json.dumps({"choices": [{"message": {"content": "答案为42"}}]}, ensure_ascii=False).encode()
    with pytest.raises(UnicodeDecodeError, match="unexpected end of data"):
        cut_inside_multibyte(body).decode("utf-8")  # the server's cut really falls inside a character

    openai_server.respond = lambda messages, body: "解：六乘以七等于四十二。答案为42"
    openai_server.inject(Reply.cut("解：六乘以七。答案为42"), Reply.cut("答案为42，因为六乘以七等于四十二"))
    client = _client(openai_server, key_env)
    assert client.chat(MESSAGES).text == "解：六乘以七等于四十二。答案为42"
    assert (client.usage.requests, client.usage.retries, client.usage.malformed) == (3, 2, 2)

    openai_server.respond = lambda messages, body: Reply.cut("每一个回答都被截断了")
    client = _client(openai_server, key_env, max_retries=1)
    with pytest.raises(ChatFailed, match=r"malformed response \(UnicodeDecodeError.*gave up after 2 requests") as err:
        client.chat([{"role": "user", "content": "another question"}])
    assert not err.value.fatal and client.usage.malformed == 2


def test_credentials_in_base_url_never_reach_an_error_message(key_env):
    """``client.base_url=http://user:sk-...@host/v1``: bug caught: the URL (key included) echoed verbatim in the
    pre-flight and per-request error messages that land in rationale.log / evaluate.log."""
    secret = "sk-in-the-url-0123456789"
    with OpenAIServer(api_key=KEY) as server:
        url = server.url.replace("http://", f"http://billa:{secret}@")
        with socket.socket() as probe:  # a port nothing listens on: the pre-flight cannot connect
            probe.bind(("127.0.0.1", 0))
            closed = url.replace(str(server._httpd.server_address[1]), str(probe.getsockname()[1]))
        client = _client(server, key_env, base_url=closed)
        with pytest.raises(OpenAIConfigError) as unreachable:
            client.preflight()
        server.respond = lambda messages, body: Reply(status=400, body=b'{"error": {"message": "bad request"}}')
        with pytest.raises(ChatFailed) as rejected:
            _client(server, key_env, base_url=url).chat(MESSAGES)
    for message in (str(unreachable.value), str(rejected.value)):
        assert secret not in message and "http://***@127.0.0.1:" in message, message


def test_setup_logging_keeps_httpx_request_lines_out_of_the_log(openai_server, key_env, caplog):
    """Bug caught: openai's HTTP client logging "HTTP Request: POST ... 200 OK" at INFO for every request, thousands
    of lines in rationale.log and evaluate.log (quieting "httpx" missed it: openai now sends through httpx2); its
    warnings must still show."""
    import logging

    from billa.utils.logging import CHATTY_LOGGERS, setup_logging

    for name in CHATTY_LOGGERS:
        caplog.set_level(logging.NOTSET, logger=name)  # as a fresh process has them (restored after the test)
    with caplog.at_level(logging.INFO):
        _client(openai_server, key_env).chat(MESSAGES)
        assert any(r.name.startswith("httpx") for r in caplog.records)  # openai's http client (httpx or httpx2)
        caplog.clear()
        setup_logging()
        _client(openai_server, key_env).chat([{"role": "user", "content": "again"}])
    assert [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "httpcore"))] == []
    assert all(logging.getLogger(name).isEnabledFor(logging.WARNING) for name in CHATTY_LOGGERS)
