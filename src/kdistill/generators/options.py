"""The generation options of ``kdistill generate`` and ``kdistill annotate``: one set of flags, read into the
keyword arguments of a :class:`~kdistill.generators.LocalTeacher` or the request parameters of a
:class:`~kdistill.generators.ChatClient`."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from .protocol import GenerationOptionError

__all__ = ["LOCAL_ONLY_FLAGS", "add_generation_arguments", "api_params", "local_options"]

logger = logging.getLogger(__name__)

# flag -> argparse dest, for the options the OpenAI chat API has no parameter for
LOCAL_ONLY_FLAGS = {"--do-sample": "do_sample", "--top-k": "top_k", "--repetition-penalty": "repetition_penalty",
                    "--no-repeat-ngram-size": "no_repeat_ngram_size", "--no-template-stop": "no_template_stop"}


def add_generation_arguments(p: argparse.ArgumentParser, api: bool = False) -> None:
    """Add the generation flags to a parser (``api``: the command can also talk to an OpenAI-compatible API,
    which the help texts then mention)."""
    local = " (local model only)" if api else ""
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="Answer length limit (default: 256)" + ("; API: max_tokens" if api else ""))
    p.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="Nucleus sampling top_p (when sampling)")
    p.add_argument("--seed", type=int, default=None, help="Sampling seed")
    p.add_argument("--do-sample", action="store_true",
                   help="Sample even at --temperature 0 (then at temperature 1)" + local)
    p.add_argument("--top-k", type=int, default=None,
                   help="Sample among the k most likely tokens; 0 = no top-k filter (when sampling)" + local)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="Penalise tokens already generated (> 0; 1 = none)" + local)
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="Never repeat an n-gram of this size (0 = off)" + local)
    p.add_argument("--stop-token", dest="stop_tokens", action="append", default=None, metavar="TOKEN",
                   help="Also stop at this token (one token of the vocabulary; repeatable)"
                        + ("; API: sent as 'stop'" if api else ""))
    p.add_argument("--no-template-stop", action="store_true",
                   help="Do not stop at the chat template's end-of-turn token (e.g. <|im_end|>); EOS and "
                        "--stop-token still stop" + local)


def local_options(args) -> dict[str, Any]:
    """Keyword arguments of :class:`~kdistill.generators.LocalTeacher` from parsed flags."""
    sampling = args.do_sample or bool(args.temperature)
    ignored = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
               if value is not None]
    if ignored and not sampling:
        logger.warning("%s only apply when sampling (--do-sample or --temperature > 0); greedy decoding ignores "
                       "them", ", ".join(ignored))
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed, "do_sample": True if args.do_sample else None, "top_k": args.top_k,
            "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
            "stop_tokens": list(args.stop_tokens or []), "template_stop": not args.no_template_stop}


def api_params(args) -> dict[str, Any]:
    """Request parameters of a :class:`~kdistill.generators.ChatClient` from parsed flags: ``max_tokens``,
    ``temperature``, ``top_p``, ``seed`` and ``stop`` (the ``--stop-token`` strings). A flag the OpenAI chat API
    has no parameter for is refused with a :class:`~kdistill.generators.GenerationOptionError`."""
    given = [flag for flag, dest in LOCAL_ONLY_FLAGS.items() if getattr(args, dest) not in (None, False)]
    if given:
        raise GenerationOptionError(f"{', '.join(given)}: local --model option(s); the OpenAI chat API has no such "
                                    f"parameter (it samples when --temperature > 0 and ends turns itself)")
    if args.max_new_tokens is None or args.max_new_tokens < 1:
        raise GenerationOptionError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise GenerationOptionError(f"temperature (--temperature) must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise GenerationOptionError(f"top_p (--top-p) must be in (0, 1], got {args.top_p}")
    params: dict[str, Any] = {"max_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.top_p is not None:
        params["top_p"] = args.top_p
    if args.seed is not None:
        params["seed"] = args.seed
    if args.stop_tokens:
        empty = [t for t in args.stop_tokens if not t]
        if empty:
            raise GenerationOptionError("stop token '' (--stop-token): must be a non-empty string")
        params["stop"] = list(dict.fromkeys(args.stop_tokens))
    return params
