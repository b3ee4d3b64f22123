"""`kdistill serve-teacher MODEL`: load a causal LM and serve it over HTTP with vLLM's completions API."""

from __future__ import annotations

import argparse
import logging
import socket

from kdistill.errors import UserError
from kdistill.models.loader import DTYPES, load_pretrained, pretrained_config, require_generative
from kdistill.serve.app import context_length, create_app, require_serve_dependencies
from kdistill.serve.protocol import LOGPROBS_MODES

__all__ = ["add_parser", "run_cli"]

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve-teacher`; run it with :func:`run_cli`."""
    p = subparsers.add_parser(
        "serve-teacher", help="Serve a causal LM's prompt log-probs over HTTP (vLLM's /v1/completions).",
        description="A reference teacher server: POST /v1/completions with token-id prompts and prompt_logprobs "
                    "answers, for every prompt token, the teacher's top-K log-probs (plus the actual token when "
                    "it is outside them), as vLLM does; GET /v1/models, GET /health. Concurrent requests are "
                    "batched into one forward. Needs pip install 'kdistill[serve]'. For large teachers run vLLM "
                    "instead: vllm serve MODEL --max-logprobs K.")
    p.add_argument("model", metavar="MODEL", help="Local model folder or hub id of a causal LM")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="Port (default: 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="The name requests give as `model` (default: MODEL as given)")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="Largest prompt_logprobs a request may ask; -1: no cap (default: 20, as vLLM)")
    p.add_argument("--logprobs-mode", choices=LOGPROBS_MODES, default="raw_logprobs",
                   help="raw_logprobs: log_softmax of the logits; processed_logprobs: of the logits divided by the "
                        "request's temperature (default: raw_logprobs)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="Weights dtype (default: auto, the checkpoint's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="Longest prompt + max_tokens served (default: the config's max_position_embeddings)")
    p.add_argument("--max-batch-size", type=int, default=32, help="Most prompts in one forward (default: 32)")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="Most tokens in one forward, counted as prompts x the longest (default: 16384)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="How long a batch waits for more prompts after its first (default: 5)")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the hub repository")
    return p


def _check_options(args) -> None:
    for flag, value, low in (("--port", args.port, 0), ("--max-batch-size", args.max_batch_size, 1),
                             ("--max-batch-tokens", args.max_batch_tokens, 1),
                             ("--batch-wait-ms", args.batch_wait_ms, 0), ("--max-logprobs", args.max_logprobs, -1)):
        if value < low:
            raise UserError(f"{flag}: must be >= {low}, got {value}")
    if args.port > 65535:
        raise UserError(f"--port: must be <= 65535, got {args.port}")


def _check_address(host: str, port: int) -> None:
    """Refuse an address the server cannot listen on before a model is loaded (a port in use, an unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UserError(f"--device: {requested!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {requested}: CUDA is not available on this machine")
    return requested


def load_teacher(name: str, *, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
                 max_model_len: int | None = None):
    """(model on `device` in eval mode, tokenizer, max_model_len) of a causal LM; an encoder-decoder, a model
    without an LM head or a bad length is a UserError before any weight is read."""
    from transformers import AutoTokenizer

    config = pretrained_config(name, "MODEL", trust_remote_code=trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"MODEL: {name} is an encoder-decoder ({config.model_type}); serve-teacher serves causal "
                        f"LMs only (a decoder-only model such as Qwen or Llama)")
    require_generative(name, trust_remote_code, option="MODEL")
    max_model_len = context_length(config, max_model_len)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    # "auto" said explicitly: the checkpoint's dtype under every transformers version (4.x defaulted to float32)
    model = load_pretrained(name, "MODEL", trust_remote_code=trust_remote_code,
                            dtype="auto" if dtype == "auto" else DTYPES[dtype])
    return model.to(device).eval(), tokenizer, max_model_len


def run_cli(args) -> int:
    """Run `serve-teacher` until interrupted."""
    require_serve_dependencies()  # before loading a large model
    _check_options(args)
    _check_address(args.host, args.port)
    import uvicorn

    device = _device(args.device)
    model, tokenizer, max_model_len = load_teacher(args.model, dtype=args.dtype, device=device,
                                                   trust_remote_code=args.trust_remote_code,
                                                   max_model_len=args.max_model_len)
    name = args.served_model_name or args.model
    app = create_app(model, tokenizer, served_model_name=name, max_logprobs=args.max_logprobs,
                     logprobs_mode=args.logprobs_mode, max_model_len=max_model_len,
                     max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                     batch_wait_ms=args.batch_wait_ms, root=args.model)
    logger.info("serving %s as %r on http://%s:%d/v1 (%s, %s, max_model_len %d, max_logprobs %d, %s)", args.model,
                name, args.host, args.port, device, next(model.parameters()).dtype, max_model_len,
                args.max_logprobs, args.logprobs_mode)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
