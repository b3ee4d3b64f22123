"""Where a teacher's *text* comes from: an OpenAI-compatible HTTP endpoint or a local transformers model.

Two teachers share one small protocol, which :func:`kdistill.annotate.annotate` relies on:

* ``id`` (str): what identifies the teacher in annotation records and cache keys;
* ``params`` (dict): the generation parameters every request uses (recorded and keyed, so changing
  e.g. the temperature re-annotates instead of silently reusing older answers);
* ``render(prompt)``: turns a prompt (a ``str``, a list of chat messages, or an LM
  :class:`~kdistill.data.records.Example` whose final response is to be generated) into what the teacher
  is actually sent (a messages list for :class:`ChatClient`, a string for :class:`LocalTeacher`);
* :class:`ChatClient` answers one rendered prompt at a time with ``complete(messages)`` (the runner
  calls it from a thread pool); :class:`LocalTeacher` answers a list with ``generate(prompts)`` (it
  batches itself).

The API key of :class:`ChatClient` is read from the named environment variable at request time only: it
is never stored on the object, written to files, logged, or put into an error message or a repr.
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

__all__ = ["ChatClient", "ChatError", "LocalTeacher", "lm_prompt_messages", "generation_params"]

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


def lm_prompt_messages(kind: str, fields: Mapping) -> list[dict]:
    """The chat messages that ask for the final response of an LM row (its last assistant turn removed).

    ``kind``/``fields`` as in :class:`~kdistill.data.records.Example`: alpaca rows become one user turn
    (instruction, then a blank line and the input when there is one), prompt_completion rows one user turn
    with the prompt, messages rows their turns up to (not including) a final assistant turn.
    """
    if kind == "alpaca":
        inp = fields.get("input") or ""
        return [{"role": "user", "content": fields["instruction"] + ("\n\n" + inp if inp else "")}]
    if kind == "prompt_completion":
        return [{"role": "user", "content": fields["prompt"]}]
    if kind == "messages":
        messages = [dict(m) for m in fields["messages"]]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return messages
    raise ValueError(f"not a language-model row kind: {kind!r}")


# ----------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


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


# ----------------------------------------------------------------------------------------------------
# Local transformers model


def generation_params(max_new_tokens: int = 256, temperature: float | None = 0.0, top_p: float | None = None,
                      seed: int | None = None, do_sample: bool | None = None, **extra) -> dict:
    """Canonical generation parameters of a :class:`LocalTeacher` (what is recorded and keyed).

    Greedy decoding (``do_sample=False``, or ``do_sample=None`` with ``temperature`` 0/None) gives
    ``{"max_new_tokens", "do_sample": False}`` (temperature, top_p and seed do not matter and are left out);
    sampling gives ``{"max_new_tokens", "do_sample": True, "temperature", "top_p", "seed"}`` (temperature
    defaults to 1.0 and top_p to 1.0). Other keyword arguments (``top_k``, ``repetition_penalty``...) are
    passed to ``model.generate`` and recorded as given.
    """
    if max_new_tokens is None or int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sample = bool(temperature) if do_sample is None else bool(do_sample)
    params: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": sample}
    if sample:
        params.update(temperature=float(temperature) if temperature else 1.0,
                      top_p=float(top_p) if top_p is not None else 1.0,
                      seed=None if seed is None else int(seed))
    params.update(extra)
    return params


_DTYPES = ("float32", "float16", "bfloat16", "auto")


class LocalTeacher:
    """A local transformers model (causal or seq2seq) that generates text in batches.

    ``model_or_path``: a local folder / hub id (loaded with ``AutoModelForCausalLM`` or, when the config
    says ``is_encoder_decoder``, ``AutoModelForSeq2SeqLM``) or an already loaded model (then pass
    ``tokenizer`` unless ``model.name_or_path`` names a folder with one). ``dtype``: a torch dtype or one of
    ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"auto"`` (loading only). ``device``: defaults to CUDA
    when available, else CPU (a loaded model stays where it is).

    Generation defaults (recorded in ``params``, see :func:`generation_params`): ``max_new_tokens=256``,
    greedy unless ``temperature > 0`` (or ``do_sample=True``); sampling uses ``temperature``, ``top_p``
    and ``seed`` (the torch RNG is seeded with ``seed + i`` for the i-th batch of a ``generate`` call,
    inside a forked RNG, so the global RNG is untouched).

    ``generate(prompts)``: prompts are sorted by length and cut into batches of ``batch_size``; causal
    models get LEFT padding (pad = the tokenizer's pad token, else EOS) and the tokenizer's BOS is
    prepended when it has one and the prompt does not already start with it; seq2seq encoders are fed the
    prompt with the tokenizer's special tokens (T5 appends ``</s>``), right-padded. Generation stops at
    the tokenizer's EOS or any of the model's ``generation_config.eos_token_id``. Only the new text is
    returned, decoded with special tokens skipped, in the order of ``prompts``.

    ``chat``: how :meth:`render` turns a plain-string prompt into model text. ``"auto"`` wraps it as one
    user turn in the tokenizer's chat template (with the generation prompt) when the tokenizer has one,
    else leaves it raw; ``True`` requires a chat template; ``False`` always sends the raw string.
    LM rows (Examples) are rendered with :func:`kdistill.data.formatting.prompt_text` (template "auto").
    """

    def __init__(self, model_or_path, tokenizer=None, batch_size: int = 8, dtype=None, *, device=None,
                 max_new_tokens: int = 256, temperature: float | None = 0.0, top_p: float | None = None,
                 seed: int | None = None, do_sample: bool | None = None, chat: bool | str = "auto",
                 teacher_id: str | None = None, **generate_kwargs):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if chat not in ("auto", True, False):
            raise ValueError(f"chat must be 'auto', True or False, got {chat!r}")
        self._params = generation_params(max_new_tokens, temperature, top_p, seed, do_sample, **generate_kwargs)
        self.batch_size = int(batch_size)
        self.chat = chat
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} or a torch dtype, got {dtype!r}")
            dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        if isinstance(model_or_path, (str, os.PathLike)):
            name = os.fspath(model_or_path)
            config = AutoConfig.from_pretrained(name)
            cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = cls.from_pretrained(name, **kwargs)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model.to(device)
            self._id = teacher_id or name.rstrip("/\\")
        else:
            model = model_or_path
            if dtype is not None and dtype != "auto":
                model.to(dtype)
            if device is not None:
                model.to(device)
            name = getattr(model, "name_or_path", "") or ""
            self._id = teacher_id or name or type(model).__name__
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer or name
            if not source:
                raise ValueError("tokenizer is required when the model was not loaded from a path")
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(source))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        eos = set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif value:
                eos.update(int(v) for v in value)
        self.eos_ids = sorted(eos)

    def __repr__(self) -> str:
        return f"LocalTeacher({self._id!r}, batch_size={self.batch_size}, params={self._params!r})"

    @property
    def id(self) -> str:
        return self._id

    @property
    def params(self) -> dict:
        return dict(self._params)

    def _has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt) -> str:
        """The model text of a prompt (see the class docstring for ``chat``)."""
        from kdistill.data.formatting import prompt_text
        from kdistill.data.records import Example

        kind = getattr(prompt, "kind", None)
        if kind is not None:  # an LM Example: render its prompt as training does
            messages = lm_prompt_messages(kind, prompt.fields)
            if kind == "alpaca":
                example = Example("alpaca", {**prompt.fields, "output": "x"}, prompt.source)
            elif kind == "prompt_completion":
                example = Example("prompt_completion", {**prompt.fields, "completion": "x"}, prompt.source)
            else:
                example = Example("messages", {"messages": messages + [{"role": "assistant", "content": "x"}]},
                                  prompt.source)
            return prompt_text(example, self.tokenizer, "auto")
        if isinstance(prompt, str):
            if self.chat is False or (self.chat == "auto" and not self._has_chat_template()):
                return prompt
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = [dict(m) for m in prompt]
        if not self._has_chat_template():
            if self.chat is True:
                raise ValueError(f"chat=True but the tokenizer of {self._id!r} has no chat template")
            example = Example("messages", {"messages": messages + [{"role": "assistant", "content": "x"}]}, "prompt")
            return prompt_text(example, self.tokenizer, "auto")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if self.is_encoder_decoder:
            return list(tok(text, add_special_tokens=True)["input_ids"])
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        bos_id, bos = getattr(tok, "bos_token_id", None), getattr(tok, "bos_token", None)
        if bos_id is not None and not (bos and text.startswith(bos)):
            ids = [bos_id] + ids
        return ids

    def generate(self, prompts: Sequence[str], **params) -> list[str]:
        """Generate a continuation of each (already rendered) prompt; returns only the new text."""
        import torch

        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts")
        merged = {**self._params, **params}
        if "do_sample" not in params and ("temperature" in params or "top_p" in params):
            merged.pop("do_sample")  # re-derived from the new temperature
        gen = generation_params(**merged)
        seed = gen.pop("seed", None)
        encoded = [self._encode(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("an empty prompt cannot be generated from (no tokens)")
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        results: list[str | None] = [None] * len(prompts)
        device = next(self.model.parameters()).device
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = torch.tensor(encoded[i], dtype=torch.long)
                if self.is_encoder_decoder:  # encoder input: right padding
                    input_ids[row, :len(ids)], mask[row, :len(ids)] = ids, 1
                else:  # causal: LEFT padding, so every prompt ends where generation starts
                    input_ids[row, width - len(ids):], mask[row, width - len(ids):] = ids, 1
            kwargs = dict(gen)
            if not kwargs["do_sample"]:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            rng_devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed + b)
                out = self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                          pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None, **kwargs)
            new = out if self.is_encoder_decoder else out[:, width:]  # (B, new tokens)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(idx, texts):
                results[i] = text
        return results  # type: ignore[return-value]
