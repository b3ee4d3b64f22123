"""Rendering examples to text and tokenising them with an exact prompt / response boundary.

An :class:`~kdistill.data.records.Example` is first rendered to *segments*: ``(text, trainable)`` pairs
whose concatenation is the full training text. Each segment is tokenised on its own and the ids are
concatenated, so a token never straddles the prompt / response boundary and the loss mask is exact.

Templates (``template=``):

``"auto"``
    Alpaca rows and ``messages`` rows use the tokenizer's chat template when ``tokenizer.chat_template``
    is set; otherwise alpaca rows use the Alpaca prompt below and ``messages`` rows use the role-header
    fallback below. ``prompt_completion`` rows are always raw text: the prompt, then the completion,
    with nothing added between them.
``"chat"``
    Every row goes through the chat template (a ``prompt_completion`` row becomes one user turn and one
    assistant turn). A tokenizer without a chat template is an error.
``"alpaca"``
    Alpaca rows use the Alpaca prompt and ``messages`` rows the role-header fallback;
    ``prompt_completion`` rows stay raw.
``"plain"``
    No prompt template: alpaca rows are the instruction (plus ``"\\n\\n"`` and the input when there is
    one) followed by ``"\\n\\n"`` and the output; ``prompt_completion`` rows are raw; ``messages`` rows
    use the role-header fallback.

The Alpaca prompt is the one released with Stanford Alpaca (Taori et al. 2023, "Stanford Alpaca: An
Instruction-following LLaMA model", https://github.com/tatsu-lab/stanford_alpaca); see
:data:`ALPACA_PROMPT_WITH_INPUT` and :data:`ALPACA_PROMPT_NO_INPUT`. The response follows the prompt
directly.

Role-header fallback for conversations when there is no chat template: each turn is rendered as
``"### {Role}:\\n{content}\\n\\n"`` (``Role`` capitalised: System, User, Assistant); an assistant turn is
preceded by the generation header ``"### Assistant:\\n"`` and its content is the trainable part; the
final assistant turn ends at its content (the end-of-sequence token follows it).

Chat-template rendering marks every assistant turn trainable: for the assistant message ``i`` the text
of ``apply_chat_template(messages[:i], add_generation_prompt=True)`` is the prompt so far, and the
extra text of ``apply_chat_template(messages[:i + 1])`` is the trainable turn, including the template's
own end-of-turn marker (``"<|im_end|>\\n"`` for ChatML). A template whose shorter render is not a prefix
of the longer one cannot be split this way and raises ``ValueError``.

Causal LMs: ``input_ids`` is the concatenation of all segments and ``labels`` copies the ids of
trainable segments (``-100`` elsewhere). Without a chat template the tokenizer's BOS token (if it has
one) is prepended and its EOS token appended as a trainable token. Sequences are cut on the right to
``max_length``; a row with no trainable token left is dropped (``None``).

Encoder-decoder models: the encoder reads all text before the last trainable segment and the labels
are the last trainable segment, both tokenised with the tokenizer's special tokens (T5 appends
``</s>``); cutting keeps a final EOS in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .records import Example

__all__ = [
    "ALPACA_PROMPT_WITH_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "TEMPLATES",
    "IGNORE_INDEX",
    "EncodeStats",
    "render_segments",
    "prompt_text",
    "encode_example",
    "encode_examples",
    "encode_with_segments",
]

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "alpaca", "plain")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Segments = list[tuple[str, bool]]


# ----------------------------------------------------------------------------------------------------
# Rendering


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _alpaca_user_text(fields: dict) -> str:
    inp = fields.get("input") or ""
    return fields["instruction"] + ("\n\n" + inp if inp else "")


def _as_messages(example: Example) -> list[dict]:
    f = example.fields
    if example.kind == "messages":
        return list(f["messages"])
    if example.kind == "alpaca":
        return [{"role": "user", "content": _alpaca_user_text(f)}, {"role": "assistant", "content": f["output"]}]
    if example.kind == "prompt_completion":
        return [{"role": "user", "content": f["prompt"]}, {"role": "assistant", "content": f["completion"]}]
    raise ValueError(f"{example.source}: unknown example kind {example.kind!r}")


def _render_chat(messages: list[dict], tokenizer, source: str) -> Segments:
    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def not_prefix(short_desc: str, long_desc: str) -> ValueError:
        return ValueError(
            f"{source}: the chat template is not prefix-consistent: the render of {short_desc} is not a "
            f"prefix of the render of {long_desc}, so the prompt/response boundary cannot be found; "
            f"use a template that renders earlier turns identically (or template='alpaca'/'plain')")

    segments: Segments = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        full = render(messages[: i + 1], False)
        if i == 0:
            # No earlier turn to render with a generation prompt: locate the content in the render.
            at = full.find(message["content"])
            if at < 0:
                raise ValueError(f"{source}: cannot find the first assistant message in its chat-template "
                                 f"render, so its prompt/response boundary is unknown")
            prefix = full[:at]
        else:
            prefix = render(messages[:i], True)
            if not prefix.startswith(rendered):
                raise not_prefix("the conversation up to the previous assistant turn",
                                 f"messages[:{i}] with the generation prompt")
            if not full.startswith(prefix):
                raise not_prefix(f"messages[:{i}] with the generation prompt", f"messages[:{i + 1}]")
        segments.append((prefix[len(rendered):], False))
        segments.append((full[len(prefix):], True))
        rendered = full
    if messages and messages[-1]["role"] != "assistant":
        full = render(messages, False)
        if not full.startswith(rendered):
            raise not_prefix("the conversation up to its last assistant turn", "the whole conversation")
        segments.append((full[len(rendered):], False))
    return [(text, trainable) for text, trainable in segments if text]


def _render_role_headers(messages: list[dict]) -> Segments:
    segments: Segments = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "assistant":
            segments.append(("### Assistant:\n", False))
            segments.append((content, True))
            if i != len(messages) - 1:  # the final turn ends at its content (EOS follows)
                segments.append(("\n\n", False))
        else:
            segments.append((f"### {role.capitalize()}:\n{content}\n\n", False))
    merged: Segments = []
    for text, trainable in segments:  # join neighbouring prompt pieces
        if merged and not trainable and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, trainable))
    return [(text, trainable) for text, trainable in merged if text]


def _render(example: Example, tokenizer, template: str) -> tuple[Segments, bool]:
    """Segments and whether the chat template produced them."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    kind, f = example.kind, example.fields
    if template == "chat" and not _has_chat_template(tokenizer):
        raise ValueError(f"template='chat' was requested but the tokenizer has no chat template "
                         f"(tokenizer.chat_template is not set); use template='auto', 'alpaca' or 'plain'")
    use_chat = template == "chat" or (template == "auto" and kind != "prompt_completion"
                                      and _has_chat_template(tokenizer))
    if use_chat:
        return _render_chat(_as_messages(example), tokenizer, example.source), True
    if kind == "prompt_completion":
        segments = [(f["prompt"], False), (f["completion"], True)]
    elif kind == "alpaca":
        if template == "plain":
            prompt = _alpaca_user_text(f) + "\n\n"
        elif f.get("input"):
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=f["instruction"], input=f["input"])
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=f["instruction"])
        segments = [(prompt, False), (f["output"], True)]
    elif kind == "messages":
        segments = _render_role_headers(f["messages"])
    else:
        raise ValueError(f"{example.source}: unknown example kind {kind!r}")
    return [(text, trainable) for text, trainable in segments if text], False


def render_segments(example: Example, tokenizer, template: str = "auto") -> list[tuple[str, bool]]:
    """Render ``example`` to ``(text, trainable)`` segments (see the module docstring for templates)."""
    return _render(example, tokenizer, template)[0]


def prompt_text(example: Example, tokenizer, template: str = "auto") -> str:
    """The text before the last trainable segment: the prompt to generate the final response from."""
    segments = render_segments(example, tokenizer, template)
    last = max((i for i, (_, trainable) in enumerate(segments) if trainable), default=len(segments))
    return "".join(text for text, _ in segments[:last])


# ----------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class EncodeStats:
    """Counts from :func:`encode_examples`. ``truncated`` counts every row that was cut (including rows
    then dropped); ``dropped_no_target`` counts rows left without any trainable token."""

    total: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    sources: list[str] = field(default_factory=list, compare=False)  # where each kept feature came from

    @property
    def kept(self) -> int:
        return self.total - self.dropped_no_target


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _cut_keep_eos(ids: list[int], limit: int, eos_id: int | None) -> list[int]:
    if len(ids) <= limit:
        return ids
    if eos_id is not None and ids and ids[-1] == eos_id and limit >= 1:
        return ids[: limit - 1] + [eos_id]
    return ids[:limit]


def _encode(example: Example, tokenizer, template: str, max_length: int, is_encoder_decoder: bool,
            max_target_length: int | None, segments_out: list | None = None) -> tuple[dict | None, bool]:
    """Encode one example; returns ``(features or None, was_truncated)``. Causal LMs: `segments_out`, when given,
    receives ``(text, trainable, start)`` per segment, ``start`` its first token's index in ``input_ids`` (before
    the cut to ``max_length``)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if max_target_length is not None and max_target_length < 1:
        raise ValueError(f"max_target_length must be >= 1 or None, got {max_target_length}")
    segments, chat = _render(example, tokenizer, template)
    eos_id = tokenizer.eos_token_id

    if is_encoder_decoder:
        trainable_at = [i for i, (_, trainable) in enumerate(segments) if trainable]
        if not trainable_at:
            return None, False
        last = trainable_at[-1]
        source_text = "".join(text for text, _ in segments[:last])
        input_ids = _ids(tokenizer, source_text, True)
        labels = _ids(tokenizer, segments[last][0], True)
        target_limit = max_target_length or max_length
        truncated = len(input_ids) > max_length or len(labels) > target_limit
        input_ids = _cut_keep_eos(input_ids, max_length, eos_id)
        labels = _cut_keep_eos(labels, target_limit, eos_id)
        if not labels:
            return None, truncated
        return {"input_ids": input_ids, "labels": labels}, truncated

    input_ids: list[int] = []
    labels: list[int] = []
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not chat and bos_id is not None:
        bos = tokenizer.bos_token
        if not (segments and bos and segments[0][0].startswith(bos)):
            input_ids.append(bos_id)
            labels.append(IGNORE_INDEX)
    for text, trainable in segments:
        ids = _ids(tokenizer, text, False)
        if segments_out is not None:
            segments_out.append((text, trainable, len(input_ids)))
        input_ids.extend(ids)
        labels.extend(ids if trainable else [IGNORE_INDEX] * len(ids))
    if not chat and eos_id is not None:
        input_ids.append(eos_id)
        labels.append(eos_id)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    return {"input_ids": input_ids, "labels": labels}, truncated


def encode_example(example: Example, tokenizer, *, template: str = "auto", max_length: int = 512,
                   is_encoder_decoder: bool = False, max_target_length: int | None = None) -> dict | None:
    """Tokenise one example to ``{"input_ids", "labels"}`` (lists of ints); ``None`` when no target
    token survives truncation. See the module docstring for the causal / encoder-decoder layouts."""
    return _encode(example, tokenizer, template, max_length, is_encoder_decoder, max_target_length)[0]


def encode_with_segments(example: Example, tokenizer, *, template: str = "auto", max_length: int = 512
                         ) -> tuple[dict | None, bool, list[tuple[str, bool, int]]]:
    """A causal LM row as :func:`encode_example` gives it, whether it was cut, and its segments as
    ``(text, trainable, start)`` (``start``: the segment's first token in ``input_ids``, before the cut)."""
    segments: list[tuple[str, bool, int]] = []
    feature, truncated = _encode(example, tokenizer, template, max_length, False, None, segments)
    return feature, truncated, segments


def encode_examples(examples: Iterable[Example], tokenizer, *, template: str = "auto", max_length: int = 512,
                    is_encoder_decoder: bool = False, max_target_length: int | None = None
                    ) -> tuple[list[dict], EncodeStats]:
    """Encode many examples, dropping those without a target; returns the features and the counts."""
    features: list[dict] = []
    stats = EncodeStats()
    for example in examples:
        stats.total += 1
        encoded, truncated = _encode(example, tokenizer, template, max_length, is_encoder_decoder,
                                     max_target_length)
        stats.truncated += int(truncated)
        if encoded is None:
            stats.dropped_no_target += 1
        else:
            features.append(encoded)
            stats.sources.append(example.source)
    return features, stats
