"""One HTTP JSON endpoint (:class:`Endpoint`): pooled connections, retries, and an API key kept out of sight.

Built on httpx; low-level infrastructure shared by the clients of remote teachers (the chat-completions client
:class:`kdistill.generators.ChatClient`, the served teacher). It imports nothing from kdistill.

The API key is read from the named environment variable at request time only: it is never stored on the
object, written to files, logged, or put into an error message or a repr. Redirects are refused, never
followed (the key would go along).
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx

__all__ = ["Endpoint", "EndpointError", "parse_retry_after", "server_message", "truncate"]

logger = logging.getLogger(__name__)

RETRY_AFTER_CAP = 600.0  # never sleep longer than this on one Retry-After header
FATAL_STATUS = (401, 403, 404)  # wrong key / no access / wrong URL or model: every request will fail alike
MAX_ERROR_CHARS = 500


def _quiet_http_loggers() -> None:
    """httpx logs every request at INFO (and httpcore every socket step at DEBUG); kdistill's CLI logs at INFO,
    so an annotation run would print a line per row. Quieted to WARNING unless the user set their levels."""
    for name in ("httpx", "httpcore"):
        library = logging.getLogger(name)
        if library.level == logging.NOTSET:
            library.setLevel(logging.WARNING)


_quiet_http_loggers()


class EndpointError(RuntimeError):
    """A request that failed for good.

    ``status`` is the HTTP status (``None`` for connection errors, timeouts and malformed responses);
    ``fatal`` is true when every further request is bound to fail the same way (HTTP 401, 403, 404, a
    redirect, an API key no HTTP header can carry), so a runner should stop instead of trying the next row.
    """

    def __init__(self, message: str, status: int | None = None, fatal: bool = False):
        super().__init__(message)
        self.status = status
        self.fatal = fatal


@dataclass(frozen=True)
class _Retry:
    """A failed attempt that may succeed when tried again."""

    reason: str
    retry_after: float | None = None
    status: int | None = None


def truncate(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` on one line (runs of whitespace become one space), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), within [0, 600]; ``None`` when
    absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def server_message(raw: bytes) -> str:
    """The error message of an error response body (OpenAI shape ``{"error": {"message": ...}}`` or text)."""
    text = raw.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except ValueError:
        return text
    if isinstance(payload, Mapping):
        error = payload.get("error", payload.get("message", payload.get("detail")))
        if isinstance(error, Mapping):
            error = error.get("message", error)
        if error is not None:
            return error if isinstance(error, str) else json.dumps(error)
    return text


class Endpoint:
    """JSON over HTTP to one base URL (``http://HOST:PORT/v1``), with retries; thread-safe.

    ``post_json(path, payload)`` POSTs ``payload`` as JSON to ``base_url + path`` and returns the decoded
    JSON answer; ``get_json(path)`` GETs it. One ``httpx.Client`` per endpoint (opened at the first request)
    pools up to ``max_connections`` connections (``None``: no limit); several threads may call at once.
    ``close()`` (or leaving a ``with`` block) releases them; a later request opens new ones.

    * API key: read from the environment variable ``api_key_env`` at each request and sent as
      ``Authorization: Bearer <key>``; when the variable is unset or empty (or ``api_key_env`` is ``None``) no
      Authorization header is sent (fine for local servers). The key is never kept on the object and is
      scrubbed from error messages.
    * Retries: HTTP 429, any 5xx, connection errors, timeouts (``timeout`` seconds for each of connect, read,
      write and waiting for a pooled connection) and unreadable (non-JSON) 2xx answers are retried up to
      ``max_retries`` times (so at most ``max_retries + 1`` attempts), sleeping
      ``min(max_backoff, backoff * 2**i)`` scaled by a random factor in [0.5, 1] (jitter) before retry ``i``;
      a ``Retry-After`` header (seconds or HTTP date) on the response replaces that delay (capped at 600 s).
      The last failure raises :class:`EndpointError` "gave up after N attempt(s): reason".
    * Any other 4xx fails at once with an :class:`EndpointError` naming the status and the server's
      (truncated) message; 401/403/404 are ``fatal``. A redirect is never followed: it is a fatal error naming
      its target (following it would send the key, and the payload, wherever the server says).
    """

    def __init__(self, base_url: str, *, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30,
                 max_connections: int | None = 16):
        if not base_url:
            raise ValueError("base_url is required, e.g. http://127.0.0.1:8000/v1")
        try:
            parsed = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"base_url {base_url!r} is not a URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"base_url must be an http:// or https:// address, e.g. http://127.0.0.1:8000/v1; "
                             f"got {base_url!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be >= 1 (or None: no limit), got {max_connections}")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_connections = max_connections
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"Endpoint(base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def url(self, path: str) -> str:
        """The full address of ``path`` (``"/completions"`` or ``"completions"``) under the base URL."""
        return self.base_url + "/" + path.lstrip("/") if path else self.base_url

    # -- public requests ---------------------------------------------------------------------------
    def post_json(self, path: str, payload: Any) -> Any:
        """POST ``payload`` as JSON to ``base_url + path``; the decoded JSON answer."""
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return self._request("POST", self.url(path), body)

    def get_json(self, path: str) -> Any:
        """GET ``base_url + path``; the decoded JSON answer."""
        return self._request("GET", self.url(path), None)

    def close(self) -> None:
        """Close the pooled connections (a later request opens new ones)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scrub(self, text: str) -> str:
        """``text`` with the API key (the current value of ``api_key_env``) replaced by ``***``."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key and key in text:
            text = text.replace(key, "***")
        return text

    # -- the retry loop ----------------------------------------------------------------------------
    def _request(self, method: str, url: str, body: bytes | None) -> Any:
        for attempt in range(self.max_retries + 1):
            result, retry = self._attempt(method, url, body)
            if retry is None:
                return result
            if attempt >= self.max_retries:
                raise EndpointError(self.scrub(f"gave up after {attempt + 1} attempt(s): {retry.reason}"),
                                    status=retry.status)
            delay = self._delay(attempt, retry.retry_after)
            logger.debug("%s %s failed (%s); retry %d/%d in %.2f s", method, url, self.scrub(retry.reason),
                         attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        with self._lock:
            jitter = self._random.uniform(0.5, 1.0)
        return min(self.max_backoff, self.backoff * (2 ** retry)) * jitter

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                limits = httpx.Limits(max_connections=self.max_connections,
                                      max_keepalive_connections=self.max_connections or 32)
                # The system's certificate store (as urllib and requests-free tools use), not certifi's copy:
                # a private CA installed on the machine (or named by SSL_CERT_FILE) keeps working.
                self._client = httpx.Client(verify=ssl.create_default_context(), follow_redirects=False,
                                            limits=limits, timeout=self.timeout)
            return self._client

    def _headers(self, with_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if with_body:
            headers["Content-Type"] = "application/json"
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            if not (key.isascii() and key.isprintable()):
                raise EndpointError(f"the API key in ${self.api_key_env} holds a control or non-ASCII character "
                                    f"(a trailing newline?), which an HTTP header cannot carry", fatal=True)
            headers["Authorization"] = "Bearer " + key
        return headers

    def _attempt(self, method: str, url: str, body: bytes | None) -> tuple[Any, _Retry | None]:
        """``(answer, None)``, or ``(None, retry)`` for a failure worth another try; raises
        :class:`EndpointError` for one that is not. Exceptions are turned into text outside their ``except``
        blocks, so no raised error carries the request (and its Authorization header) in its context."""
        headers = self._headers(body is not None)
        failure = None
        try:
            response = self._http().request(method, url, content=body, headers=headers,
                                            timeout=httpx.Timeout(self.timeout))
        except httpx.TimeoutException as exc:
            waiting = {httpx.ConnectTimeout: "connecting to", httpx.PoolTimeout: "waiting for a free connection to"}
            failure = _Retry(f"timed out after {self.timeout:g} s {waiting.get(type(exc), 'waiting for')} {url}"
                             + (f" ({exc})" if str(exc) else ""))
        except httpx.ConnectError as exc:
            failure = _Retry(f"cannot reach {url}: {exc}")
        except httpx.TransportError as exc:
            failure = _Retry(f"connection to {url} failed: {type(exc).__name__}: {exc}")
        if failure is not None:
            return None, failure
        return self._answer(response, url)

    def _answer(self, response: httpx.Response, url: str) -> tuple[Any, _Retry | None]:
        status = response.status_code
        if response.has_redirect_location:
            target = response.url.join(response.headers["Location"])
            raise EndpointError(self.scrub(f"{url} answered HTTP {status}, a redirect to {target}; kdistill does "
                                           f"not follow redirects (the API key would go along): use the final "
                                           f"address as the base URL (--base-url)"), status=status, fatal=True)
        if not 200 <= status < 300:
            detail = server_message(response.content) or response.reason_phrase
            reason = f"HTTP {status} from {url}: {truncate(self.scrub(detail))}"
            if status == 429 or 500 <= status < 600:
                return None, _Retry(reason, parse_retry_after(response.headers.get("Retry-After")), status)
            raise EndpointError(reason, status=status, fatal=status in FATAL_STATUS)
        raw = response.content
        try:
            return json.loads(raw.decode("utf-8")), None
        except (UnicodeDecodeError, ValueError):
            text = truncate(self.scrub(raw.decode("utf-8", errors="replace")), 200)
            return None, _Retry(f"invalid JSON in the response from {url}: {text!r}")
