"""A local OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, behaviour scripted by the test.

The real ``openai`` client talks to it exactly as it talks to api.openai.com or vLLM, so retries, timeouts, rate
limits and malformed bodies go through the client's own code paths (no mock of the client).

    with OpenAIServer(respond=lambda messages, body: "42") as server:
        server.inject(Reply.rate_limited(retry_after=0.1), Reply.server_error())  # the next two requests fail
        server.fault = lambda request: Reply.cut("答案为42") if ... else None    # a body cut inside a character
        ...  # point a client at server.url; server.requests records what arrived

The ``openai_server`` fixture (a server that stops at the end of the test) is registered for every test by
``pytest_plugins`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

MAX_LIFETIME_S = 600.0  # a server a test forgot to stop shuts itself down after this long


@dataclass
class Reply:
    """What the server answers to one request."""

    content: str | None = None  # assistant message text (status 200)
    status: int = 200
    body: bytes | None = None  # raw body, sent as is (wins over content)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (longer than the client's timeout: a timeout)
    cut_inside_char: bool = False  # send the completion cut inside a multi-byte UTF-8 character (see ``cut``)

    @staticmethod
    def rate_limited(retry_after: float = 0.05) -> Reply:
        body = {"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit"}}
        return Reply(status=429, body=json.dumps(body).encode(), headers={"Retry-After": f"{retry_after}"})

    @staticmethod
    def server_error(status: int = 500) -> Reply:
        body = {"error": {"message": "The server had an error while processing your request.", "type": "server_error"}}
        return Reply(status=status, body=json.dumps(body).encode())

    @staticmethod
    def malformed() -> Reply:
        """HTTP 200 with a truncated JSON body (a proxy cut the response)."""
        return Reply(status=200, body=b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind')

    @staticmethod
    def cut(content: str) -> Reply:
        """HTTP 200, a complete HTTP message whose body is the completion of ``content`` cut inside a multi-byte
        UTF-8 character (a proxy that cut the body and set Content-Length to what it kept); ``content`` must hold a
        non-ASCII character (Chinese text)."""
        return Reply(content=content, cut_inside_char=True)

    @staticmethod
    def slow(delay_s: float, content: str = "too late") -> Reply:
        return Reply(content=content, delay_s=delay_s)


@dataclass
class Request:
    """One request as it arrived."""

    path: str
    body: dict
    headers: dict[str, str]  # names lower-cased
    time: float

    @property
    def messages(self) -> list[dict]:
        return self.body.get("messages", [])

    @property
    def user_text(self) -> str:
        return "\n".join(m.get("content", "") for m in self.messages if m.get("role") == "user")


Responder = Callable[[list[dict], dict], "str | Reply"]


def cut_inside_multibyte(body: bytes) -> bytes:
    """``body`` cut after the first byte of its middle multi-byte UTF-8 character: undecodable, and not JSON."""
    starts = [i for i, byte in enumerate(body) if byte >= 0xC0]  # lead bytes of 2-4 byte characters
    if not starts:
        raise ValueError("cut_inside_char needs a body with a non-ASCII character (ensure_ascii=False completion)")
    return body[: starts[len(starts) // 2] + 1]


def _count_tokens(text: str) -> int:
    return max(1, len(text.split()))


class OpenAIServer:
    """``POST /v1/chat/completions`` and ``GET /v1/models`` on a random free port of 127.0.0.1.

    Args:
        respond: ``(messages, body) -> str | Reply`` for requests with no injected fault; default answers "ok".
        fault: ``(request) -> Reply | None`` consulted before ``respond`` (e.g. fail the first request of a record).
        api_key: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
        model: the model id ``/v1/models`` lists.
    """

    def __init__(
        self,
        respond: Responder | None = None,
        fault: Callable[[Request], Reply | None] | None = None,
        api_key: str | None = None,
        model: str = "test-model",
    ):
        self.respond = respond or (lambda messages, body: "ok")
        self.fault = fault
        self.api_key = api_key
        self.model = model
        self.requests: list[Request] = []
        self.errors: list[Exception] = []  # exceptions raised by ``respond``
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._watchdog = threading.Timer(MAX_LIFETIME_S, self.stop)
        self._watchdog.daemon = True

    @property
    def url(self) -> str:
        """The base URL a client takes (``.../v1``)."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def inject(self, *replies: Reply) -> None:
        """The next ``len(replies)`` chat requests get these replies, in arrival order."""
        with self._lock:
            self._queue.extend(replies)

    def chat_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def start(self) -> OpenAIServer:
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self) -> None:
        """Stop serving; requests still sleeping in a delay are cut short."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._watchdog.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling -------------------------------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _reply_for(self, request: Request) -> Reply:
        with self._lock:
            injected = self._queue.popleft() if self._queue else None
        if injected is not None:
            return injected
        if self.fault is not None and (reply := self.fault(request)) is not None:
            return reply
        try:
            answer = self.respond(request.messages, request.body)
        except Exception as err:  # a bug in the test's responder: a 500 the test can see in .errors
            with self._lock:
                self.errors.append(err)
            return Reply.server_error(500)
        return answer if isinstance(answer, Reply) else Reply(content=answer)

    def _completion(self, reply: Reply, body: dict) -> bytes:
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
        usage = {"prompt_tokens": _count_tokens(prompt), "completion_tokens": _count_tokens(reply.content or "")}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        message = {"role": "assistant", "content": reply.content}
        return json.dumps(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            },
            ensure_ascii=False,
        ).encode()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def _authorised(self) -> bool:
                if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                body = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error"}}
                self._send(401, json.dumps(body).encode())
                return False

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                server._record(Request(self.path, {}, headers, time.monotonic()))
                if not self._authorised():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    data = {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "test"}]}
                    self._send(200, json.dumps(data).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Request(self.path, body, headers, time.monotonic())
                server._record(request)
                if not self._authorised():
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                reply = server._reply_for(request)
                if reply.delay_s and server._stopping.wait(reply.delay_s):
                    return
                payload = reply.body if reply.body is not None else server._completion(reply, body)
                if reply.cut_inside_char:
                    payload = cut_inside_multibyte(payload)  # _send's Content-Length is the cut length
                self._send(reply.status, payload, reply.headers)

        return Handler


@pytest.fixture
def openai_server():
    """A started ``OpenAIServer`` answering "ok"; set ``.respond`` / ``.fault`` / ``.inject`` in the test."""
    with OpenAIServer() as server:
        yield server
