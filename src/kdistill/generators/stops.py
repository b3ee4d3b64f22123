"""Where a local teacher's answer ends: the end-of-turn token of its chat template, and stop tokens by name.

A chat model ends its answer with the token its chat template closes an assistant turn with (``<|im_end|>``
for ChatML/Qwen, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma, ``</s>`` for Mistral). That token is
often not the model's EOS (Qwen's EOS is ``<|endoftext|>``), so generation that stops at EOS alone runs on to
``max_new_tokens`` and the decoded text hides the boundary. :func:`turn_end_tokens` finds the token by rendering
a two-turn conversation with the template and reading the first added/special token that follows the
assistant's text; :func:`stop_token_ids` turns token strings given by a user into ids, refusing a string
that is not exactly one token; :func:`cut_at_stop` keeps what precedes the first stop id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from .protocol import GenerationOptionError

__all__ = ["cut_at_stop", "stop_token_ids", "turn_end_tokens"]

logger = logging.getLogger(__name__)

# The assistant text of the probe conversation: one word with no spaces, so templates that trim or
# capitalise nothing of it leave it as it is, and unlikely to occur in a template.
_MARKER = "kdistillTurnEndProbe7"


def _added_tokens(tokenizer) -> list[str]:
    """Every added or special token string of a tokenizer (whitespace-only ones left out)."""
    names = set()
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token in decoder.values():
        names.add(str(getattr(token, "content", token)))
    names.update(str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or []))
    return [n for n in names if n.strip()]


def turn_end_tokens(tokenizer) -> list[str]:
    """The token(s) the tokenizer's chat template closes an assistant turn with: ``[]`` when the tokenizer has
    no chat template, the template fails on a plain user/assistant exchange, or no added/special token follows
    the assistant's text (a template that ends turns with plain text such as ``"\\n\\n"``).

    The probe conversation is one user turn and one assistant turn whose text is a marker word; the first
    added/special token in what the template writes after the marker is the answer (the longest one when two
    start at the same place), so ``"<|im_end|>\\n"`` gives ``["<|im_end|>"]``.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    from jinja2.exceptions import TemplateError

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        logger.debug("chat template could not render a user/assistant exchange (%s); no end-of-turn stop", exc)
        return []
    if not isinstance(text, str) or _MARKER not in text:
        return []
    tail = text[text.rindex(_MARKER) + len(_MARKER):]
    found = [(tail.find(name), -len(name), name) for name in _added_tokens(tokenizer) if name in tail]
    return [min(found)[2]] if found else []


def stop_token_ids(tokenizer, tokens: Iterable[str], owner: str = "the model") -> list[int]:
    """The id of each token string, in order; a :class:`GenerationOptionError` names a string that is not exactly
    one token of the vocabulary (``owner`` names the model in that message).

    A string counts as one token when the tokenizer encodes it (without special tokens) to a single id, or when
    it is a vocabulary entry as written (a byte-level form such as ``"Ġthe"``)."""
    ids = []
    vocab = None
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise GenerationOptionError(f"stop token {token!r}: must be a non-empty string")
        encoded = list(tokenizer(token, add_special_tokens=False)["input_ids"])
        if len(encoded) == 1:
            ids.append(int(encoded[0]))
            continue
        if vocab is None:
            vocab = tokenizer.get_vocab()
        if token in vocab:
            ids.append(int(vocab[token]))
            continue
        raise GenerationOptionError(
            f"stop token {token!r} (--stop-token): not one token of the vocabulary of {owner} (it encodes to "
            f"{len(encoded)} tokens: {tokenizer.convert_ids_to_tokens(encoded)!r}); give a single token such as "
            f"the chat template's end of turn")
    return ids


def cut_at_stop(ids: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    """``ids`` up to (not including) the first id in ``stop_ids``; all of them when none occurs."""
    stops = set(stop_ids)
    for i, token in enumerate(ids):
        if int(token) in stops:
            return [int(t) for t in ids[:i]]
    return [int(t) for t in ids]
