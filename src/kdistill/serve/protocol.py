"""The wire format of `kdistill serve-teacher`: vLLM's OpenAI-compatible `/v1/completions` request with
`prompt_logprobs`, checked field by field, and the JSON bodies the server answers (completion, model list,
OpenAI-style error). Plain Python: no web framework, no model.

Request (the fields that matter; others OpenAI sends are accepted and ignored):
    {"model": NAME, "prompt": [[ids], ...] | [ids] | "text" | ["text", ...], "max_tokens": 16,
     "prompt_logprobs": K | null, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
     "logprobs": null}
A mistake answers HTTP 400 (404 for an unknown model) with
    {"error": {"message": ..., "type": "BadRequestError", "param": FIELD, "code": 400}, "object": "error"}.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_TOKENS", "LOGPROBS_MODES", "CompletionRequest", "Limits", "RequestError",
           "completion_response", "error_body", "models_response", "parse_completion_request"]

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default when a request leaves max_tokens out
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
# Sampling fields that would change vLLM's processed log-probs; this server applies the temperature only.
NEUTRAL_SAMPLING = {"top_p": (1.0,), "top_k": (-1, 0), "min_p": (0.0,), "repetition_penalty": (1.0,),
                    "presence_penalty": (0.0,), "frequency_penalty": (0.0,)}


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body naming `param`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def error_body(message: str, status: int = 400, param: str | None = None) -> dict:
    """The JSON body of an error answer, as vLLM's OpenAI server writes it."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"), "param": param,
                      "code": status}, "object": "error"}


@dataclass(frozen=True)
class Limits:
    """What the server accepts: its model name, the token-id range, the context length and the log-prob cap."""

    served_model_name: str
    vocab_size: int
    max_model_len: int
    max_logprobs: int = 20  # -1: no cap
    logprobs_mode: str = "raw_logprobs"


@dataclass(frozen=True)
class CompletionRequest:
    """A checked completion request: token ids per prompt, and how to answer them."""

    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt: the request's, or the default cut to the context left
    prompt_logprobs: int | None
    temperature: float  # what the log-probs are computed at: 1 in raw_logprobs mode


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _prompts(value, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """The prompt field as lists of ids: token ids (one list or a list of lists) or text (one or a list)."""
    if isinstance(value, str):
        return [encode(value)]
    if not isinstance(value, list) or not value:
        raise RequestError("prompt must be a non-empty list of token-id lists, one token-id list or text",
                           param="prompt")
    if all(_is_int(x) for x in value):
        return [list(value)]
    if all(isinstance(x, str) for x in value):
        return [encode(x) for x in value]
    for i, prompt in enumerate(value):
        if not isinstance(prompt, list):
            raise RequestError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}",
                               param="prompt")
        bad = next((x for x in prompt if not _is_int(x)), None)
        if bad is not None:
            raise RequestError(f"prompt {i}: token ids must be integers, got {bad!r}", param="prompt")
    return [list(p) for p in value]


def _check_ids(prompts: list[list[int]], max_tokens: int, limits: Limits) -> None:
    for i, ids in enumerate(prompts):
        if not ids:
            raise RequestError(f"prompt {i} is empty", param="prompt")
        bad = next((x for x in ids if not 0 <= x < limits.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt {i}: token id {bad} is out of vocabulary (ids run from 0 to "
                               f"{limits.vocab_size - 1})", param="prompt")
        if len(ids) + max_tokens > limits.max_model_len:
            asked = f" plus max_tokens {max_tokens}" if max_tokens else ""
            raise RequestError(f"prompt {i} has {len(ids)} tokens{asked}, more than this model's maximum context "
                               f"length of {limits.max_model_len} tokens (--max-model-len)", param="prompt")


def _check_unsupported(body: dict, limits: Limits) -> None:
    if body.get("stream"):
        raise RequestError("stream is not supported by kdistill serve-teacher", param="stream")
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        raise RequestError("n and best_of must be 1 (kdistill serve-teacher answers one greedy completion)",
                           param="n")
    if body.get("echo"):
        raise RequestError("echo is not supported by kdistill serve-teacher; ask for prompt_logprobs",
                           param="echo")
    if body.get("logprobs") is not None:
        raise RequestError("logprobs of generated tokens are not supported by kdistill serve-teacher; ask for "
                           "prompt_logprobs", param="logprobs")
    if limits.logprobs_mode == "processed_logprobs":
        for name, neutral in NEUTRAL_SAMPLING.items():
            if body.get(name) is not None and body[name] not in neutral:
                raise RequestError(f"{name}={body[name]!r}: with --logprobs-mode processed_logprobs this server "
                                   f"applies the temperature only; leave {name} at {neutral[0]}", param=name)


def parse_completion_request(body, limits: Limits, encode: Callable[[str], list[int]]) -> CompletionRequest:
    """Check a decoded `/v1/completions` JSON body; raise RequestError (404 for an unknown model, else 400)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != limits.served_model_name:
        raise RequestError(f"The model `{model}` does not exist.", status=404, param="model")
    _check_unsupported(body, limits)
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 0):
        raise RequestError(f"max_tokens must be an integer >= 0, got {max_tokens!r}", param="max_tokens")
    k = body.get("prompt_logprobs")
    if k is not None and (not _is_int(k) or k < 0):
        raise RequestError(f"prompt_logprobs must be an integer >= 0 or null, got {k!r}", param="prompt_logprobs")
    if k is not None and 0 <= limits.max_logprobs < k:
        raise RequestError(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                           f"{limits.max_logprobs}", param="prompt_logprobs")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or temperature < 0:
        raise RequestError(f"temperature must be a number >= 0, got {temperature!r}", param="temperature")
    if "prompt" not in body:
        raise RequestError("prompt is missing", param="prompt")
    prompts = _prompts(body["prompt"], encode)
    _check_ids(prompts, max_tokens or 0, limits)
    if max_tokens is None:  # vLLM's rule: the default never runs past the context
        lengths = [min(DEFAULT_MAX_TOKENS, limits.max_model_len - len(ids)) for ids in prompts]
    else:
        lengths = [max_tokens] * len(prompts)
    # processed_logprobs: the log-probs after the temperature; temperature 0 (greedy) leaves the logits as they are
    processed = limits.logprobs_mode == "processed_logprobs" and temperature > 1e-5
    return CompletionRequest(prompts=prompts, max_tokens=lengths, prompt_logprobs=k,
                             temperature=float(temperature) if processed else 1.0)


def completion_response(model_name: str, prompts: list[list[int]], choices: list[dict]) -> dict:
    """The `/v1/completions` answer: `choices[i]` = {"text", "finish_reason", "prompt_logprobs", "tokens"} of
    prompt i (`tokens`: the generated ids, counted in usage and left out of the body)."""
    completion = sum(len(c["tokens"]) for c in choices)
    prompt = sum(len(p) for p in prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": i, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"],
                     "stop_reason": None, "prompt_logprobs": c["prompt_logprobs"]} for i, c in enumerate(choices)],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def models_response(model_name: str, root: str, max_model_len: int, created: int) -> dict:
    """The `/v1/models` answer: the one served model."""
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "kdistill", "root": root, "parent": None,
                                        "max_model_len": max_model_len, "permission": []}]}
