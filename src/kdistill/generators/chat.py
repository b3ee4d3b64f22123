"""An OpenAI-compatible chat-completions endpoint as a teacher (:class:`ChatClient`), with retries.

The API key is read from the named environment variable at request time only: it is never stored on the
object, written to files, logged, or put into an error message or a repr. Redirects are refused, never
followed (the key would go along).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from .protocol import lm_prompt_messages

__all__ = ["ChatClient", "ChatError"]

logger = logging.getLogger(__name__)

_RETRY_AFTER_CAP = 600.0  # never sleep longer than this on one Retry-After header
_FATAL_STATUS = (401, 403, 404)  # wrong key / no access / wrong URL or model: every request will fail alike
_MAX_ERROR_CHARS = 500


class ChatError(RuntimeError):
    """A chat-completions request that failed for good.

    ``status`` is the HTTP status (``None`` for connection errors, timeouts and malformed responses);
    ``fatal`` is true when every further request is bound to fail the same way (HTTP 401, 403, 404), so a
    runner should stop instead of trying the next row.
    """

    def __init__(self, message: str, status: int | None = None, fatal: bool = False):
        super().__init__(message)
        self.status = status
        self.fatal = fatal


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error, never followed: following it would send the API key (and the prompt) to whatever
    host the server names, and turn the POST into a GET whose reply is no completion."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ChatError(f"{req.full_url} answered HTTP {code}, a redirect to {newurl}; kdistill does not follow "
                        f"redirects (the API key would go along): use the final address as --base-url",
                        status=code, fatal=True)


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


def _truncate(text: str, limit: int = _MAX_ERROR_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` when absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP)


def _server_message(raw: bytes) -> str:
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


class ChatClient:
    """A client of an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, SGLang, TGI, Ollama...).

    ``complete(messages, **params)`` POSTs ``{base_url}/chat/completions`` with
    ``{"model": model, "messages": messages, **self.params, **params}`` and returns
    ``choices[0].message.content``.

    * API key: read from the environment variable ``api_key_env`` at each request and sent as
      ``Authorization: Bearer <key>``; when the variable is unset or empty no Authorization header is sent
      (fine for local servers). The key is never kept on the object and is scrubbed from error messages.
    * Retries: HTTP 429, any 5xx, connection errors, timeouts (``timeout`` seconds per socket operation)
      and unreadable (non-JSON) 200 responses are retried up to ``max_retries`` times (so at most
      ``max_retries + 1`` attempts), sleeping ``min(max_backoff, backoff * 2**i)`` scaled by a random
      factor in [0.5, 1] (jitter) before retry ``i``; a ``Retry-After`` header (seconds or HTTP date) on
      the response replaces that delay (capped at 600 s). Any other 4xx fails at once with a
      :class:`ChatError` naming the status and the server's (truncated) message; 401/403/404 are
      ``fatal``.
    * ``params``: generation parameters sent with every request (``max_tokens``, ``temperature``,
      ``top_p``, ``seed``...); exposed as ``self.params`` for recording and cache keys.
    * ``id`` is the model name: the key of an annotation does not change when the same model is served
      from another URL.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30, *,
                 params: Mapping[str, Any] | None = None):
        if not base_url:
            raise ValueError("base_url is required, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ValueError("model (the served model name) is required")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._params = dict(params or {})
        self._random = random.Random()
        self._random_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"params={self._params!r})")

    @property
    def id(self) -> str:
        return self.model

    @property
    def params(self) -> dict:
        return dict(self._params)

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    def render(self, prompt) -> list[dict]:
        """A messages list: a string becomes one user turn; an LM Example its prompt turns."""
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        kind = getattr(prompt, "kind", None)
        if kind is not None:
            return lm_prompt_messages(kind, prompt.fields)
        return [dict(m) for m in prompt]

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key and key in text:
            text = text.replace(key, "***")
        return text

    def _delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        with self._random_lock:
            jitter = self._random.uniform(0.5, 1.0)
        return min(self.max_backoff, self.backoff * (2 ** retry)) * jitter

    def _attempt(self, body: bytes) -> str:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        if self.api_key_env and os.environ.get(self.api_key_env):
            request.add_header("Authorization", "Bearer " + os.environ[self.api_key_env])
        try:
            with _NO_REDIRECTS.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                detail = _server_message(exc.read())
            except Exception:  # noqa: BLE001 - the body of an error response is best effort
                detail = exc.reason or ""
            finally:
                exc.close()
            reason = f"HTTP {status} from {self.url}: {_truncate(self._scrub(str(detail)))}"
            if status == 429 or 500 <= status < 600:
                raise _Retryable(reason, _parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None),
                                 status) from None
            raise ChatError(reason, status=status, fatal=status in _FATAL_STATUS) from None
        except (TimeoutError, socket.timeout) as exc:
            raise _Retryable(f"timed out after {self.timeout:g} s waiting for {self.url} ({exc})") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.timeout:g} s connecting to {self.url}") from None
            raise _Retryable(f"cannot reach {self.url}: {exc.reason}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retryable(f"connection to {self.url} failed: {type(exc).__name__}: {exc}") from None
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _Retryable(f"invalid JSON in the response from {self.url}: "
                             f"{_truncate(self._scrub(raw.decode('utf-8', errors='replace')), 200)!r}") from None
        return self._content(payload)

    def _content(self, payload: Any) -> str:
        try:
            choice = payload["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ChatError(f"unexpected response from {self.url} (no choices[0].message.content): "
                            f"{_truncate(self._scrub(json.dumps(payload)), 200)}") from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        if content is None:
            raise ChatError(f"response from {self.url} has no message content "
                            f"(finish_reason={choice.get('finish_reason')!r})")
        if not isinstance(content, str):
            raise ChatError(f"response from {self.url} has non-text content of type {type(content).__name__}")
        return content

    def complete(self, messages: Sequence[Mapping] | str, **params) -> str:
        """The assistant's reply to ``messages`` (a string is sent as one user turn)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = json.dumps({"model": self.model, "messages": list(messages), **self._params, **params},
                          ensure_ascii=False).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            try:
                return self._attempt(body)
            except _Retryable as exc:
                if attempt >= self.max_retries:
                    raise ChatError(f"gave up after {attempt + 1} attempt(s): {exc.reason}",
                                    status=exc.status) from None
                delay = self._delay(attempt, exc.retry_after)
                logger.debug("chat request failed (%s); retry %d/%d in %.2f s", exc.reason, attempt + 1,
                             self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")
