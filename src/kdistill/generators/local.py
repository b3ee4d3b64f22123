"""A local transformers model as a text teacher (:class:`LocalTeacher`): batched generation."""

from __future__ import annotations

import os
from collections.abc import Sequence

from kdistill.data.formatting import prompt_text
from kdistill.data.records import Example
from kdistill.models.loader import DTYPES, load_pretrained

from .protocol import generation_params, lm_prompt_messages
from .stops import cut_at_stop, stop_token_ids, turn_end_tokens

__all__ = ["LocalTeacher"]


class LocalTeacher:
    """A local transformers model (causal or seq2seq) that generates text in batches.

    ``model_or_path``: a local folder / hub id (loaded with ``AutoModelForCausalLM`` or, when the config
    says ``is_encoder_decoder``, ``AutoModelForSeq2SeqLM``) or an already loaded model (then pass
    ``tokenizer`` unless ``model.name_or_path`` names a folder with one). ``dtype``: a torch dtype or one of
    ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"auto"`` (loading only). ``device``: defaults to CUDA
    when available, else CPU (a loaded model stays where it is).

    Generation defaults (recorded in ``params``, see :func:`generation_params`): ``max_new_tokens=256``,
    greedy unless ``temperature > 0`` (or ``do_sample=True``); sampling uses ``temperature``, ``top_p``,
    ``top_k`` and ``seed`` (the torch RNG is seeded with ``seed + i`` for the i-th batch of a ``generate``
    call, inside a forked RNG, so the global RNG is untouched); ``repetition_penalty`` and
    ``no_repeat_ngram_size`` apply to greedy decoding too. Other keyword arguments go to ``model.generate``.

    Stop tokens: generation always stops at the tokenizer's EOS and the model's
    ``generation_config.eos_token_id``; it also stops at the end-of-turn token of the tokenizer's chat
    template (:func:`~kdistill.generators.stops.turn_end_tokens`: ``<|im_end|>``, ``<|eot_id|>``...) unless
    ``template_stop=False``, and at each of ``stop_tokens`` (strings, each exactly one token of the vocabulary,
    else a :class:`~kdistill.generators.GenerationOptionError`). The end-of-turn stop applies whatever the
    prompt looks like (raw text included): such a token is special, never part of an answer's visible text,
    so stopping there only drops what a model writes after closing its turn. The stops beyond EOS are recorded
    in ``params["stop_tokens"]`` (absent when there are none), so answers generated with and without them get
    different keys and are never mixed in one file. ``stop_ids`` holds every stop id (EOS included).

    ``generate(prompts)``: prompts are sorted by length and cut into batches of ``batch_size``; causal
    models get LEFT padding (pad = the tokenizer's pad token, else EOS) and the tokenizer's BOS is
    prepended when it has one and the prompt does not already start with it; seq2seq encoders are fed the
    prompt with the tokenizer's special tokens (T5 appends ``</s>``), right-padded. Only the new text
    before the first stop token is returned, decoded with special tokens skipped, in the order of ``prompts``.

    ``chat``: how :meth:`render` turns a plain-string prompt into model text. ``"auto"`` wraps it as one
    user turn in the tokenizer's chat template (with the generation prompt) when the tokenizer has one,
    else leaves it raw; ``True`` requires a chat template; ``False`` always sends the raw string.
    LM rows (Examples) are rendered with :func:`kdistill.data.formatting.prompt_text` (template "auto").
    """

    def __init__(self, model_or_path, tokenizer=None, batch_size: int = 8, dtype=None, *, device=None,
                 max_new_tokens: int = 256, temperature: float | None = 0.0, top_p: float | None = None,
                 seed: int | None = None, do_sample: bool | None = None, chat: bool | str = "auto",
                 teacher_id: str | None = None, stop_tokens: Sequence[str] | None = None,
                 template_stop: bool = True, **generate_kwargs):
        import torch
        from transformers import AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if chat not in ("auto", True, False):
            raise ValueError(f"chat must be 'auto', True or False, got {chat!r}")
        if isinstance(stop_tokens, str):
            raise TypeError("stop_tokens is a list of token strings, not one string")
        if "stop_tokens" in generate_kwargs:
            raise TypeError("pass stop tokens as stop_tokens=[...]")
        self._params = generation_params(max_new_tokens, temperature, top_p, seed, do_sample, **generate_kwargs)
        self.batch_size = int(batch_size)
        self.chat = chat
        if isinstance(dtype, str):
            if dtype != "auto" and dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join((*DTYPES, 'auto'))} or a torch dtype, got "
                                 f"{dtype!r}")
            dtype = dtype if dtype == "auto" else DTYPES[dtype]
        if isinstance(model_or_path, (str, os.PathLike)):
            name = os.fspath(model_or_path)
            self._id = teacher_id or name.rstrip("/\\")
        else:
            name = getattr(model_or_path, "name_or_path", "") or ""
            self._id = teacher_id or name or type(model_or_path).__name__
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer or name
            if not source:
                raise ValueError("tokenizer is required when the model was not loaded from a path")
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(source))
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        # stop tokens are checked against the tokenizer before a (possibly large) model is loaded
        extra = (turn_end_tokens(tokenizer) if template_stop else []) + list(stop_tokens or [])
        self._stop_cache: dict[str, int] = {}
        extra_ids = self._stop_ids(extra)
        if isinstance(model_or_path, (str, os.PathLike)):
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = load_pretrained(name, "model", **kwargs)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model.to(device)
        else:
            model = model_or_path
            if dtype is not None and dtype != "auto":
                model.to(dtype)
            if device is not None:
                model.to(device)
        self.model = model.eval()
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        eos = set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif value:
                eos.update(int(v) for v in value)
        self.eos_ids = sorted(eos)
        stops = list(dict.fromkeys(t for t, i in zip(extra, extra_ids) if i not in eos))
        if stops:
            self._params["stop_tokens"] = stops
        self.stop_ids = sorted(eos.union(extra_ids))

    def __repr__(self) -> str:
        return f"LocalTeacher({self._id!r}, batch_size={self.batch_size}, params={self._params!r})"

    @property
    def id(self) -> str:
        return self._id

    @property
    def params(self) -> dict:
        return dict(self._params)

    def _stop_ids(self, tokens) -> list[int]:
        missing = [t for t in tokens if t not in self._stop_cache]
        self._stop_cache.update(zip(missing, stop_token_ids(self.tokenizer, missing, repr(self._id))))
        return [self._stop_cache[t] for t in tokens]

    def _has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt) -> str:
        """The model text of a prompt (see the class docstring for ``chat``)."""
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
        """Generate a continuation of each (already rendered) prompt; returns only the new text, cut at the first
        stop token. ``params`` override the teacher's generation parameters for this call (``stop_tokens``, the
        list of stops beyond EOS, included)."""
        import torch

        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts")
        merged = {**self._params, **params}
        if "do_sample" not in params and ("temperature" in params or "top_p" in params):
            merged.pop("do_sample")  # re-derived from the new temperature
        gen = generation_params(**merged)
        seed = gen.pop("seed", None)
        stop_ids = sorted(set(self.eos_ids).union(self._stop_ids(gen.pop("stop_tokens", None) or [])))
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
                                          pad_token_id=self.pad_id, eos_token_id=stop_ids or None, **kwargs)
            # new tokens only: after the prompt (causal) or after the decoder start token (seq2seq)
            new = out[:, 1:] if self.is_encoder_decoder else out[:, width:]  # (B, new tokens)
            texts = self.tokenizer.batch_decode([cut_at_stop(row, stop_ids) for row in new.tolist()],
                                                skip_special_tokens=True)
            for i, text in zip(idx, texts):
                results[i] = text
        return results  # type: ignore[return-value]
