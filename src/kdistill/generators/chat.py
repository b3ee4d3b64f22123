"""An OpenAI-compatible chat-completions endpoint as a teacher (:class:`ChatClient`), with retries.

HTTP goes through :class:`kdistill.endpoint.Endpoint` (httpx). The API key is read from the named environment
variable at request time only: it is never stored on the object, written to files, logged, or put into an error
message or a repr. Redirects are refused, never followed (the key would go along).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kdistill.endpoint import Endpoint, EndpointError, truncate

from .protocol import lm_prompt_messages

__all__ = ["ChatClient", "ChatError"]


class ChatError(EndpointError):
    """A chat-completions request that failed for good (an :class:`~kdistill.endpoint.EndpointError`).

    ``status`` is the HTTP status (``None`` for connection errors, timeouts and malformed responses);
    ``fatal`` is true when every further request is bound to fail the same way (HTTP 401, 403, 404), so a
    runner should stop instead of trying the next row.
    """


class _ToEndpoint:
    """A ChatClient setting that lives on its Endpoint (read there at each request)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj._endpoint, self.name)

    def __set__(self, obj, value) -> None:
        setattr(obj._endpoint, self.name, value)


class ChatClient:
    """A client of an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, SGLang, TGI, Ollama...).

    ``complete(messages, **params)`` POSTs ``{base_url}/chat/completions`` with
    ``{"model": model, "messages": messages, **self.params, **params}`` and returns
    ``choices[0].message.content``.

    * API key: read from the environment variable ``api_key_env`` at each request and sent as
      ``Authorization: Bearer <key>``; when the variable is unset or empty no Authorization header is sent
      (fine for local servers). The key is never kept on the object and is scrubbed from error messages.
    * HTTP: one :class:`~kdistill.endpoint.Endpoint` (httpx, pooled keep-alive connections, no connection
      limit: the caller's concurrency bounds it); thread-safe; ``close()`` or a ``with`` block releases it.
    * Retries: HTTP 429, any 5xx, connection errors, timeouts (``timeout`` seconds for each of connect, read
      and write) and unreadable (non-JSON) 200 responses are retried up to ``max_retries`` times (so at most
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

    base_url = _ToEndpoint()
    api_key_env = _ToEndpoint()
    timeout = _ToEndpoint()
    max_retries = _ToEndpoint()
    backoff = _ToEndpoint()
    max_backoff = _ToEndpoint()

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30, *,
                 params: Mapping[str, Any] | None = None):
        if not base_url:
            raise ValueError("base_url is required, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ValueError("model (the served model name) is required")
        # No connection limit: the caller's concurrency (annotate/judge --concurrency) is the bound, as it was.
        self._endpoint = Endpoint(base_url, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                                  backoff=backoff, max_backoff=max_backoff, max_connections=None)
        self.model = model
        self._params = dict(params or {})

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
        return self._endpoint.url("/chat/completions")

    def close(self) -> None:
        """Close the pooled connections (a later request opens new ones); also ``with ChatClient(...)``."""
        self._endpoint.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def render(self, prompt) -> list[dict]:
        """A messages list: a string becomes one user turn; an LM Example its prompt turns."""
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        kind = getattr(prompt, "kind", None)
        if kind is not None:
            return lm_prompt_messages(kind, prompt.fields)
        return [dict(m) for m in prompt]

    def _content(self, payload: Any) -> str:
        try:
            choice = payload["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ChatError(f"unexpected response from {self.url} (no choices[0].message.content): "
                            f"{truncate(self._endpoint.scrub(json.dumps(payload)), 200)}") from None
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
        request = {"model": self.model, "messages": list(messages), **self._params, **params}
        try:
            payload = self._endpoint.post_json("/chat/completions", request)
        except EndpointError as exc:
            raise ChatError(str(exc), status=exc.status, fatal=exc.fatal) from None
        return self._content(payload)
