"""The FastAPI app of `kdistill serve-teacher`: vLLM's `/v1/completions` with `prompt_logprobs`, `/v1/models` and
`/health`, over a transformers causal LM, with concurrent requests batched into one forward.

    app = create_app(model, tokenizer, served_model_name="teacher", max_logprobs=20)
    uvicorn.run(app, host="127.0.0.1", port=8000)

FastAPI and uvicorn are the optional extra `kdistill[serve]`; they are imported when an app is made.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter types (Request) from their
# annotations, which must be real objects, not strings naming locals of create_app.

import logging
import time
from contextlib import asynccontextmanager

from kdistill.errors import UserError
from kdistill.serve.batcher import Batcher
from kdistill.serve.engine import PromptJob, TeacherEngine
from kdistill.serve.protocol import (
    LOGPROBS_MODES,
    Limits,
    RequestError,
    completion_response,
    error_body,
    models_response,
    parse_completion_request,
)

__all__ = ["MissingServeDependency", "context_length", "create_app", "require_serve_dependencies"]

logger = logging.getLogger(__name__)

LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class MissingServeDependency(UserError, ImportError):
    """FastAPI or uvicorn is not installed."""


def require_serve_dependencies() -> None:
    """Raise MissingServeDependency (one line with the pip command) unless fastapi and uvicorn import."""
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingServeDependency(f"kdistill serve-teacher needs {' and '.join(missing)}: "
                                     f"pip install 'kdistill[serve]'")


def context_length(config, requested: int | None = None, option: str = "--max-model-len") -> int:
    """The longest prompt + completion served: `requested`, else the model config's maximum length; a request
    above the config's maximum, or no length at all, is a UserError naming `option`."""
    config = getattr(config, "text_config", None) or config
    known = next((int(v) for f in LENGTH_FIELDS if isinstance(v := getattr(config, f, None), int) and v > 0), None)
    if requested is None:
        if known is None:
            raise UserError(f"{option}: the model config names no maximum length ({', '.join(LENGTH_FIELDS)}); "
                            f"give {option}")
        return known
    if requested < 1:
        raise UserError(f"{option}: must be >= 1, got {requested}")
    if known is not None and requested > known:
        raise UserError(f"{option}: {requested} is more than the model's maximum length of {known} "
                        f"(max_position_embeddings)")
    return requested


def create_app(model, tokenizer, *, served_model_name: str, max_logprobs: int = 20,
               logprobs_mode: str = "raw_logprobs", max_model_len: int | None = None, max_batch_size: int = 32,
               max_batch_tokens: int = 16384, batch_wait_ms: float = 5.0, root: str | None = None):
    """A FastAPI app serving `model` (a transformers causal LM, already on its device) as `served_model_name`.

    max_logprobs: the largest prompt_logprobs a request may ask (-1: no cap); logprobs_mode: "raw_logprobs"
    (log_softmax of the logits) or "processed_logprobs" (of the logits / the request's temperature);
    max_model_len: the longest prompt + max_tokens (default: the config's max_position_embeddings);
    max_batch_size, max_batch_tokens, batch_wait_ms: how concurrent prompts are batched (see Batcher).
    `app.state.engine` and `app.state.batcher` are the model side and the batcher (its `batches` counts forwards).
    """
    require_serve_dependencies()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    if logprobs_mode not in LOGPROBS_MODES:
        raise UserError(f"--logprobs-mode: {logprobs_mode!r} is not one of {', '.join(LOGPROBS_MODES)}")
    if max_logprobs < -1:
        raise UserError(f"--max-logprobs: must be >= 0, or -1 for no cap; got {max_logprobs}")
    engine = TeacherEngine(model, tokenizer)
    limits = Limits(served_model_name=served_model_name, vocab_size=engine.vocab_size,
                    max_model_len=context_length(model.config, max_model_len), max_logprobs=max_logprobs,
                    logprobs_mode=logprobs_mode)
    batcher = Batcher(engine.run, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                      wait_s=batch_wait_ms / 1000)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = FastAPI(title="kdistill serve-teacher", lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.limits = engine, batcher, limits

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.status, exc.param), status_code=exc.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return models_response(served_model_name, root or served_model_name, limits.max_model_len, created)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(RequestError("the request body is not valid JSON"))
        try:
            req = parse_completion_request(body, limits, engine.text.encode)
        except RequestError as exc:
            return error(exc)
        jobs = [PromptJob(tuple(ids), req.prompt_logprobs, req.temperature, n)
                for ids, n in zip(req.prompts, req.max_tokens)]
        try:
            answers = await batcher.submit(jobs, [len(ids) for ids in req.prompts])
        except Exception as exc:  # the model failed (e.g. out of memory): answer, keep serving
            logger.exception("completion failed")
            return error(RequestError(f"the model failed on this request: {type(exc).__name__}: {exc}", 500))
        # a JSONResponse skips FastAPI's slow recursive encoder: the body is plain JSON types already
        return JSONResponse(completion_response(served_model_name, req.prompts, answers))

    return app
