"""The one place billa talks to an OpenAI-compatible chat API (OpenAI, Azure-style proxies, vLLM, ...).

Rationale generation (stage 2) and the GPT-4 pairwise judge share this client. It adds what a long paid job needs
on top of the ``openai`` package:

- a pre-flight check before any work: the key is in the environment, the endpoint answers, the key is accepted;
- bounded concurrency (``map_unordered`` runs at most ``max_concurrency`` calls at once in threads);
- a client-side rate limit (``requests_per_minute``) shared by all threads; a 429 pauses every thread;
- retries with exponential backoff and jitter on 429, 5xx, timeouts, connection errors and malformed response
  bodies (``Retry-After`` is honoured), up to ``max_retries`` extra requests; a malformed body is any 200 answer
  that cannot be decoded (a body cut inside a multi-byte character), parsed as JSON or read as a completion, and
  each is counted (``Usage.malformed``);
- content retries: a caller's ``parse`` that raises ``UnparsableResponse`` (a judge line without scores, a
  rationale with the wrong answer) asks again, up to ``attempts`` answers in all, then ``ContentRejected``;
- an append-only response cache keyed by the request, so a killed job never pays twice for an answer it received;
- token usage accounting.

The API key is read from the environment variable named by ``api_key_env`` and never stored in config, logs,
errors or the cache; credentials inside ``base_url`` (``http://user:key@host/v1``) are masked in every message.
This module imports neither torch nor lightning, so a CLI built on it starts fast.

    client = ChatClient("gpt-4", base_url="https://api.openai.com/v1", max_concurrency=4, requests_per_minute=200,
                        cache_path="reviews.responses.jsonl", params={"temperature": 0.2, "max_tokens": 512})
    client.preflight()                                   # OpenAIConfigError before any work
    def work(question):
        try:
            return client.chat(messages_for(question), parse=scores_or_raise, attempts=3)
        except (ContentRejected, ChatFailed) as err:     # flagged: err.reasons / str(err)
            return err
    for question, result in client.map_unordered(work, questions):
        ...                                              # main thread: write results here
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pydantic

from billa.utils.jsonl import JsonlAppender
from billa.utils.secrets import REDACTED, redact_url

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NO_KEY = "EMPTY"  # what vLLM-style servers without authentication accept


class OpenAIConfigError(RuntimeError):
    """The pre-flight check failed (no key, endpoint unreachable, key rejected): nothing was processed."""


class UnparsableResponse(ValueError):
    """Raised by a caller's ``parse``: the answer arrived but is not usable; the message says why."""


class MalformedResponse(ValueError):
    """A 200 answer without usable message text (retried like a transient failure)."""


# What a 200 body that is not a readable completion raises inside ``chat.completions.create``: undecodable bytes
# (UnicodeDecodeError: the body was cut inside a multi-byte character), not JSON, or JSON of the wrong shape.
MALFORMED_BODY = (
    UnicodeError,
    json.JSONDecodeError,
    pydantic.ValidationError,
    openai.APIResponseValidationError,
    MalformedResponse,
)


class ChatFailed(RuntimeError):
    """A request could not get an answer (retry budget spent, or a non-retryable HTTP error).

    Attributes:
        status: the last HTTP status (None for timeouts, connection errors, malformed bodies).
        fatal: True when retrying other requests is pointless too (401, 403, 404: key, permission, model).
    """

    def __init__(self, message: str, status: int | None = None, fatal: bool = False):
        super().__init__(message)
        self.status = status
        self.fatal = fatal


class ContentRejected(RuntimeError):
    """Every one of the ``attempts`` answers failed the caller's ``parse``.

    Attributes:
        reasons: one reason per answer, in order.
        last_text: the last answer's text.
    """

    def __init__(self, reasons: list[str], last_text: str):
        super().__init__("; ".join(reasons))
        self.reasons = reasons
        self.last_text = last_text


@dataclass
class ChatResult:
    """One accepted answer."""

    text: str
    value: Any  # parse(text), or text when no parse was given
    attempts: int  # answers looked at (1 = the first was accepted)
    cached: bool  # the accepted answer came from the response cache (no request paid now)
    key: str  # the request key of the accepted answer (in the cache)
    usage: dict[str, int] = field(default_factory=dict)  # prompt/completion tokens of the accepted answer


@dataclass
class Usage:
    """Running totals over a client's life (thread-safe through ``add``)."""

    requests: int = 0  # HTTP requests sent (including retried ones)
    retries: int = 0  # requests that failed and were retried
    malformed: int = 0  # 200 answers whose body could not be decoded, parsed or read (each retried or failed)
    cached: int = 0  # answers served from the response cache
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
        return out


class RateLimiter:
    """At most ``requests_per_minute`` request starts per minute over all threads, evenly spaced.

    ``pause(seconds)`` pushes the next start for everyone (a 429 means the whole account is over its limit).
    """

    def __init__(self, requests_per_minute: float | None):
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise ValueError(f"client.requests_per_minute={requests_per_minute}: expected a positive number or null")
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


class ResponseCache:
    """Answers already paid for: an append-only JSON Lines file ``{"key", "text", "usage"}``.

    A line is written as soon as the answer arrives, before the caller looks at it, so a job killed at any point
    re-reads every answer it received instead of asking again. Only the byte offset of each line is kept in memory
    (a few dozen bytes per answer), the text is read back on a hit; without a path the cache lives in memory.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._offsets: dict[str, int] = {}  # key -> byte offset of its line (file-backed)
        self._memory: dict[str, dict] = {}  # key -> entry (no path)
        self._writer: JsonlAppender | None = None
        self._reader = None
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._index()

    def _index(self) -> None:
        offset = 0
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.endswith(b"\n") and raw.strip():  # a partial last line (killed writer) is cut on first put
                    try:
                        entry = json.loads(raw)
                        if not isinstance(entry.get("text"), str):
                            raise ValueError("no text")
                        self._offsets[str(entry["key"])] = offset
                    except (ValueError, KeyError, TypeError, AttributeError) as err:
                        log.warning("response cache: skipped %s:%d (%s)", self.path, number, err)
                offset += len(raw)

    def __len__(self) -> int:
        return len(self._offsets) + len(self._memory)

    def get(self, key: str) -> dict | None:
        with self._lock:
            if self.path is None:
                return self._memory.get(key)
            offset = self._offsets.get(key)
            if offset is None:
                return None
            if self._reader is None:
                self._reader = open(self.path, "rb")  # closed in close()
            self._reader.seek(offset)
            return json.loads(self._reader.readline())

    def put(self, key: str, text: str, usage: dict[str, int]) -> None:
        entry = {"key": key, "text": text, "usage": usage}
        with self._lock:
            if self.path is None:
                self._memory[key] = entry
                return
            if self._writer is None:
                self._writer = JsonlAppender(self.path)  # cuts a partial last line first: offsets stay valid
            self._offsets[key] = self._writer.write(entry)

    def close(self) -> None:
        with self._lock:
            for handle in (self._writer, self._reader):
                if handle is not None:
                    handle.close()
            self._writer = self._reader = None


def _check_params(params: dict, what: str) -> None:
    """Unknown request parameters fail here, naming the key, instead of on every request."""
    from openai.resources.chat.completions import Completions

    known = set(inspect.signature(Completions.create).parameters) - {"self", "model", "messages", "stream"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"{what}: unknown chat.completions parameter(s) {unknown}; server-specific ones (vLLM's top_k, ...) go "
            f"in extra_body. Known: {', '.join(sorted(k for k in known if not k.startswith('extra_')))}"
        )


def _retry_after(err: openai.APIStatusError) -> float | None:
    headers = err.response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, TypeError, ValueError):
            continue
    return None


class ChatClient:
    """An OpenAI-compatible chat client with pre-flight check, concurrency, rate limit, retries and a cache.

    Args:
        model: the model name sent with every request (e.g. ``gpt-3.5-turbo``, or vLLM's served model name).
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
        api_key_env: the environment variable holding the key; null for servers without authentication.
        max_concurrency: calls in flight at once in ``map_unordered``.
        requests_per_minute: client-side rate limit over all threads (null: none).
        max_retries: extra requests after a retryable failure (429, 5xx, timeout, connection, malformed body).
        backoff_s: first retry delay; doubled each retry, with jitter (x0.5-1.0), capped at ``backoff_max_s``.
        backoff_max_s: longest delay between two tries of one request (also caps ``Retry-After``).
        timeout_s: per-request timeout.
        preflight_timeout_s: timeout of the pre-flight ``GET /models``.
        cache_path: the response cache file (null: no cache).
        params: request parameters sent with every call (``temperature``, ``max_tokens``, ...).
        seed: seeds the backoff jitter (tests).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        requests_per_minute: float | None = None,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        timeout_s: float = 60.0,
        preflight_timeout_s: float = 10.0,
        cache_path: str | os.PathLike | None = None,
        params: dict | None = None,
        seed: int | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"client.max_concurrency={max_concurrency}: expected an integer >= 1")
        if api_key_env is not None and not ENV_NAME.fullmatch(str(api_key_env)):  # a key pasted here: never echo it
            raise ValueError(
                "client.api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not a key; "
                "put the key in that variable"
            )
        if max_retries < 0:
            raise ValueError(f"client.max_retries={max_retries}: expected an integer >= 0")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.timeout_s = float(timeout_s)
        self.preflight_timeout_s = float(preflight_timeout_s)
        self.params = dict(params or {})
        _check_params(self.params, "client.params")
        self.limiter = RateLimiter(requests_per_minute)
        self.cache = ResponseCache(cache_path)
        self.usage = Usage()
        self._rng = random.Random(seed)
        self._client: openai.OpenAI | None = None
        self._client_lock = threading.Lock()
        self._stopping = threading.Event()  # set while map_unordered winds down: no new retries

    # -- key and endpoint ---------------------------------------------------------------------------------------

    def _key(self) -> str:
        if self.api_key_env is None:
            return NO_KEY
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise OpenAIConfigError(
                f"no API key: the environment variable {self.api_key_env} is unset or empty "
                f"(client.api_key_env names it). Export it, e.g. `export {self.api_key_env}=...`; for a server "
                "without authentication set client.api_key_env=null."
            )
        return key

    @property
    def where(self) -> str:
        """``base_url`` as messages show it: credentials in the URL masked."""
        return redact_url(str(self.base_url))

    def _scrub(self, text: str) -> str:
        """``text`` with the API key (should a server echo it) and any URL credentials replaced by ``***``."""
        key = os.environ.get(self.api_key_env or "", "").strip()
        text = text.replace(key, REDACTED) if len(key) >= 4 else text
        return redact_url(text)

    @property
    def openai(self) -> openai.OpenAI:
        """The underlying ``openai.OpenAI`` client (built on first use; its own retries are off: ours count)."""
        with self._client_lock:
            if self._client is None:
                self._client = openai.OpenAI(
                    api_key=self._key(), base_url=self.base_url, max_retries=0, timeout=self.timeout_s
                )
            return self._client

    def preflight(self) -> None:
        """Check the key and the endpoint before any work: ``GET /models`` must answer and accept the key.

        Raises:
            OpenAIConfigError: naming the environment variable or ``client.base_url`` and what went wrong.
        """
        client = self.openai  # raises when the key is missing
        where = f"{self.where} (client.base_url)"
        try:
            models = client.models.list(timeout=self.preflight_timeout_s)
        except openai.AuthenticationError:
            raise OpenAIConfigError(f"{where} rejected the API key in ${self.api_key_env} (HTTP 401)") from None
        except openai.PermissionDeniedError:
            raise OpenAIConfigError(f"{where}: the key in ${self.api_key_env} may not list models (HTTP 403)") from None
        except openai.NotFoundError:
            log.info("%s has no GET /models; reachable, model list not checked", self.where)
            return
        except openai.APIConnectionError as err:  # includes timeouts
            cause = self._scrub(str(err.__cause__ or err))
            raise OpenAIConfigError(f"cannot reach {where}: {cause}") from None
        except openai.APIStatusError as err:
            raise OpenAIConfigError(f"{where} answered HTTP {err.status_code} to GET /models") from None
        except (ValueError, httpx.HTTPError, openai.APIResponseValidationError) as err:  # not an OpenAI-style API
            raise OpenAIConfigError(
                f"{where} is not an OpenAI-compatible API: GET /models gave {self._scrub(repr(err))}"
            ) from None
        ids = [m.id for m in getattr(models, "data", None) or []]
        if ids and self.model not in ids:
            log.warning("model %r is not among the %d models %s lists (client.model)", self.model, len(ids), where)

    # -- one request --------------------------------------------------------------------------------------------

    def request_key(self, messages: list[dict], params: dict | None = None) -> str:
        """A stable key of what is asked: model, messages and parameters (not the endpoint or the key)."""
        payload = {"model": self.model, "messages": messages, "params": {**self.params, **(params or {})}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max_s, self.backoff_s * 2**retry) * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.backoff_max_s)

    def _read(self, response: Any) -> tuple[str, dict[str, int]]:
        """The answer text and token counts of a chat completion; ``MalformedResponse`` when it has no text."""
        try:
            text = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError, KeyError) as err:  # a body of the wrong shape
            raise MalformedResponse(f"no choices[0].message.content ({err})") from None
        if not isinstance(text, str):
            raise MalformedResponse("message content is not text")
        usage = getattr(response, "usage", None)
        counts = {
            "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        }
        self.usage.add(**counts)
        return text, counts

    def _send(self, messages: list[dict], params: dict) -> tuple[str, dict[str, int]]:
        """One answer's text and token usage, retrying transient failures with backoff.

        Raises:
            ChatFailed: after ``max_retries`` retries, or at once on a non-retryable HTTP status.
        """
        client = self.openai
        for retry in range(self.max_retries + 1):
            self.limiter.acquire()
            retry_after = None
            self.usage.add(requests=1)
            try:
                return self._read(client.chat.completions.create(model=self.model, messages=messages, **params))
            except openai.APIStatusError as err:
                status = err.status_code
                if status not in (408, 409, 429) and status < 500:
                    fatal = status in (401, 403, 404)
                    message = f"HTTP {status} from {self.where}: {self._scrub(err.message)}"
                    raise ChatFailed(message, status=status, fatal=fatal) from None
                reason, retry_after = f"HTTP {status}", _retry_after(err)
            except openai.APITimeoutError:
                reason, status = f"timeout after {params.get('timeout', self.timeout_s):g} s", None
            except openai.APIConnectionError as err:
                reason, status = f"connection error ({self._scrub(str(err.__cause__ or err))})", None
            except MALFORMED_BODY as err:  # never fatal: a proxy cut the body, the next answer is likely whole
                self.usage.add(malformed=1)
                reason, status = f"malformed response ({type(err).__name__}: {self._scrub(str(err))[:120]})", None
            if retry == self.max_retries or self._stopping.is_set():
                raise ChatFailed(f"{reason}; gave up after {retry + 1} requests", status=status)
            delay = self._backoff(retry, retry_after)
            if status == 429:
                self.limiter.pause(delay)  # the account is over its limit: every thread waits
            self.usage.add(retries=1)
            log.debug("%s; retry %d/%d in %.2f s", reason, retry + 1, self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def chat(
        self,
        messages: list[dict],
        parse: Callable[[str], Any] | None = None,
        attempts: int = 1,
        key: str | None = None,
        retry_params: dict | None = None,
        **params: Any,
    ) -> ChatResult:
        """Ask until ``parse`` accepts an answer, at most ``attempts`` answers; answers are cached by request key.

        Args:
            messages: chat messages (``[{"role": ..., "content": ...}]``).
            parse: ``text -> value``; raise ``UnparsableResponse`` to reject the answer and ask again.
            attempts: answers to look at before giving up (each after the first is a fresh request: use a
                temperature above 0 so it can differ).
            key: the request key (default: ``request_key(messages, params)``); answer ``i`` is cached as
                ``f"{key}#{i}"``, so a resumed job reuses answers already paid for and pays only for new tries.
            retry_params: parameters for answers after the first (e.g. ``{"temperature": 0.7}`` when the first
                asks at temperature 0, where asking again the same way would return the same answer).
            **params: request parameters on top of the client's ``params``.

        Raises:
            ChatFailed: a request failed for good (see ``_send``).
            ContentRejected: every answer failed ``parse``.
        """
        _check_params({**params, **(retry_params or {})}, "chat() keyword arguments")
        params = {**self.params, **params}
        params.setdefault("timeout", self.timeout_s)
        retry_params = {**params, **(retry_params or {})}
        key = key or self.request_key(messages, {k: v for k, v in params.items() if k != "timeout"})
        reasons: list[str] = []
        text = ""
        for attempt in range(max(1, attempts)):
            answer_key = f"{key}#{attempt}"
            hit = self.cache.get(answer_key)
            if hit is not None:
                text, usage = hit["text"], hit.get("usage", {})
                self.usage.add(cached=1)
            else:
                if attempt and self._stopping.is_set():  # winding down: no new paid attempts
                    raise ChatFailed(f"stopped before answer {attempt + 1}")
                text, usage = self._send(messages, retry_params if attempt else params)
                self.cache.put(answer_key, text, usage)
            try:
                value = parse(text) if parse is not None else text
            except UnparsableResponse as err:
                reasons.append(f"answer {attempt + 1}: {err}")
                continue
            return ChatResult(text, value, attempt + 1, hit is not None, answer_key, usage)
        raise ContentRejected(reasons, text)

    # -- many requests ------------------------------------------------------------------------------------------

    def map_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R | BaseException]]:
        """Run ``fn(item)`` in ``max_concurrency`` threads; yield ``(item, result or exception)`` as each finishes.

        Items are read lazily (at most twice ``max_concurrency`` wait in the queue), so a huge input file is never
        held in memory. Closing the iterator early (an exception in the caller, Ctrl-C) cancels what has not
        started and waits for the requests in flight (no further retries), so answers already paid for reach the
        response cache.
        """
        self._stopping.clear()
        pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="billa-openai")
        pending: dict[Future, T] = {}
        iterator = iter(items)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < 2 * self.max_concurrency:
                    try:
                        item = next(iterator)
                    except StopIteration:
                        exhausted = True
                        break
                    pending[pool.submit(fn, item)] = item
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    item = pending.pop(future)
                    error = future.exception()
                    yield item, (error if error is not None else future.result())
        finally:
            self._stopping.set()
            if running := sum(future.running() for future in pending):
                log.info("waiting for %d request(s) in flight (their answers go to the response cache)", running)
            pool.shutdown(wait=True, cancel_futures=True)
            self._stopping.clear()

    def close(self) -> None:
        self.cache.close()
        if self._client is not None:
            self._client.close()
