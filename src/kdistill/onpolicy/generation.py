"""Sampling answers during training: a generation backend interface, and Hugging Face `generate` behind it.

A :class:`GenerationBackend` turns a batch of prompts into sampled continuations with a model's *current*
weights. :class:`HFGenerate` is the one implementation: `model.generate` under `no_grad` in eval mode, batched,
with

* the model's own `generation_config` set aside for the call (its start-token ids kept) (a hub model's defaults, e.g. Qwen's
  `repetition_penalty` or `top_k`, would otherwise change the distribution the samples come from), so the only
  processing is kdistill's: temperature, top-k, top-p and the vocabulary limit, then the sample;
* one random stream per answer (:class:`SeededSampling`): each answer's tokens are drawn with the Gumbel-max trick
  from a generator seeded by the answer's own seed, so an answer does not depend on which other prompts share its
  batch or process, and two processes sample what one process would (with the same seeds);
* `synced_gpus` when several processes train: every process runs the same number of decoding steps, so sharded
  models (FSDP, ZeRO-3) whose forward passes are collective do not hang when answers end at different lengths.

A vLLM backend would implement the same interface (prompts in, token ids out, with the student's current weights
loaded into the engine after every optimizer step); it is not built here (no GPU to test it on), see the README.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

__all__ = ["GenerationBackend", "HFGenerate", "SamplingParams", "SeededSampling", "row_seed"]


@dataclass(frozen=True)
class SamplingParams:
    """How answers are sampled: temperature, nucleus (top_p), top_k, answer length and the stop ids."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    vocab_limit: int | None = None  # ids >= this are never sampled (a padded embedding matrix's extra rows)


def row_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (run seed, step, role, prompt ids, ...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class SeededSampling(LogitsProcessor):
    """Turns greedy decoding into sampling from softmax(logits / T) (top-k / top-p filtered), one random stream
    per row: argmax(log p + Gumbel noise) is a sample of p (the Gumbel-max trick)."""

    def __init__(self, seeds: Sequence[int], params: SamplingParams):
        self.seeds = list(seeds)
        self.params = params
        self.generators: list[torch.Generator] | None = None

    def _noise(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        u = torch.stack([torch.rand(shape[1], generator=g, device=device) for g in self.generators])
        tiny = torch.finfo(u.dtype).tiny
        return -torch.log(-torch.log(u.clamp(min=tiny, max=1 - 1e-7)))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        p = self.params
        logp = torch.log_softmax(scores.float() / p.temperature, dim=-1)
        if p.vocab_limit is not None and p.vocab_limit < logp.shape[-1]:
            logp[:, p.vocab_limit:] = -float("inf")
        if p.top_k is not None and p.top_k < logp.shape[-1]:
            kth = logp.topk(p.top_k, dim=-1).values[:, -1:]
            logp = logp.masked_fill(logp < kth, -float("inf"))
        if p.top_p < 1.0:
            ordered, order = logp.sort(dim=-1, descending=True)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass strictly ahead of each token
            drop = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, before >= p.top_p)
            logp = logp.masked_fill(drop, -float("inf"))
        return logp + self._noise(tuple(logp.shape), logp.device)


class GenerationBackend(Protocol):
    """Samples continuations of left-padded prompts with a model's current weights."""

    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds: Sequence[int],
                 params: SamplingParams, synced: bool = False) -> torch.Tensor:
        """(B, P) prompts -> (B, N) new token ids (N <= max_new_tokens; after a row's stop token: pad ids)."""
        ...


_KEPT = ("decoder_start_token_id", "bos_token_id")


def _generating_model(model):
    """The transformers model whose `generation_config` `generate` reads (inside a peft wrapper, too)."""
    inner = model
    while hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


@contextmanager
def _plain_generation(model) -> Iterator[None]:
    """Eval mode, and the model's generation defaults set aside, for the duration of one generate call."""
    inner = _generating_model(model)
    saved_config, was_training = inner.generation_config, model.training
    # only the ids that say where a sequence starts are kept (T5's decoder start token)
    inner.generation_config = GenerationConfig(**{k: getattr(saved_config, k, None) for k in _KEPT
                                                  if getattr(saved_config, k, None) is not None})
    model.eval()
    try:
        yield
    finally:
        inner.generation_config = saved_config
        model.train(was_training)


class HFGenerate:
    """:class:`GenerationBackend` on `model.generate` (see the module docstring)."""

    name = "hf"

    @torch.no_grad()
    def generate(self, model, input_ids, attention_mask, seeds, params: SamplingParams, synced: bool = False):
        encoder_decoder = bool(getattr(_generating_model(model).config, "is_encoder_decoder", False))
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=list(params.stop_ids) or None, pad_token_id=params.pad_id,
                                  use_cache=True)
        with _plain_generation(model):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=LogitsProcessorList([SeededSampling(seeds, params)]),
                                 synced_gpus=synced)
        # causal LMs return prompt + answer; encoder-decoders the decoder's start token + answer
        return out[:, 1:] if encoder_decoder else out[:, input_ids.shape[1]:]
