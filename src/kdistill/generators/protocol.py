"""The protocol a text teacher follows, and the helpers both teachers share.

Two teachers share one small protocol, which :func:`kdistill.annotate.annotate` relies on:

* ``id`` (str): what identifies the teacher in annotation records and cache keys;
* ``params`` (dict): the generation parameters every request uses (recorded and keyed, so changing
  e.g. the temperature re-annotates instead of silently reusing older answers);
* ``render(prompt)``: turns a prompt (a ``str``, a list of chat messages, or an LM
  :class:`~kdistill.data.records.Example` whose final response is to be generated) into what the teacher
  is actually sent (a messages list for :class:`~kdistill.generators.ChatClient`, a string for
  :class:`~kdistill.generators.LocalTeacher`);
* :class:`~kdistill.generators.ChatClient` answers one rendered prompt at a time with ``complete(messages)``
  (the runner calls it from a thread pool); :class:`~kdistill.generators.LocalTeacher` answers a list with
  ``generate(prompts)`` (it batches itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdistill.errors import UserError

__all__ = ["GenerationOptionError", "generation_params", "lm_prompt_messages"]


class GenerationOptionError(UserError, ValueError):
    """A generation option that cannot be used as given (a value out of range, a stop token that is not one
    token of the vocabulary, an option the chosen teacher has no equivalent for); the message names it."""


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


def generation_params(max_new_tokens: int = 256, temperature: float | None = 0.0, top_p: float | None = None,
                      seed: int | None = None, do_sample: bool | None = None, *, top_k: int | None = None,
                      repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                      **extra) -> dict:
    """Canonical generation parameters of a :class:`LocalTeacher` (what is recorded and keyed).

    Greedy decoding (``do_sample=False``, or ``do_sample=None`` with ``temperature`` 0/None) gives
    ``{"max_new_tokens", "do_sample": False}`` (temperature, top_p, top_k and seed do not matter and are left
    out); sampling gives ``{"max_new_tokens", "do_sample": True, "temperature", "top_p", "seed"}`` (temperature
    defaults to 1.0 and top_p to 1.0) plus ``top_k`` when given (else the model's generation config decides,
    50 in transformers). ``repetition_penalty`` (> 0) and ``no_repeat_ngram_size`` (>= 0) apply to greedy
    decoding too and are recorded unless they are None or their neutral value (1.0, 0). Other keyword
    arguments (``min_new_tokens``, ``stop_tokens``...) are recorded as given. A value out of range raises
    :class:`GenerationOptionError` naming the parameter and its command-line flag.
    """
    if max_new_tokens is None or isinstance(max_new_tokens, bool) or int(max_new_tokens) < 1:
        raise GenerationOptionError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {max_new_tokens}")
    if temperature is not None and temperature < 0:
        raise GenerationOptionError(f"temperature (--temperature) must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationOptionError(f"top_p (--top-p) must be in (0, 1], got {top_p}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0):
        raise GenerationOptionError(f"top_k (--top-k) must be an integer >= 0 (0: no top-k filter), got {top_k}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise GenerationOptionError(f"repetition_penalty (--repetition-penalty) must be > 0 (1: none), got "
                                    f"{repetition_penalty}")
    if no_repeat_ngram_size is not None and (isinstance(no_repeat_ngram_size, bool)
                                             or int(no_repeat_ngram_size) != no_repeat_ngram_size
                                             or no_repeat_ngram_size < 0):
        raise GenerationOptionError(f"no_repeat_ngram_size (--no-repeat-ngram-size) must be an integer >= 0 "
                                    f"(0: off), got {no_repeat_ngram_size}")
    sample = bool(temperature) if do_sample is None else bool(do_sample)
    params: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": sample}
    if sample:
        params.update(temperature=float(temperature) if temperature else 1.0,
                      top_p=float(top_p) if top_p is not None else 1.0,
                      seed=None if seed is None else int(seed))
        if top_k is not None:
            params["top_k"] = int(top_k)
    if repetition_penalty is not None and float(repetition_penalty) != 1.0:
        params["repetition_penalty"] = float(repetition_penalty)
    if no_repeat_ngram_size:
        params["no_repeat_ngram_size"] = int(no_repeat_ngram_size)
    params.update(extra)
    return params
