"""The model side of `kdistill serve-teacher`: one no-grad forward over a right-padded batch of prompts, split
back into each prompt's `prompt_logprobs` and a short greedy continuation. Synchronous: the batcher runs it in
a worker thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kdistill.serve.logprobs import prompt_logprobs

__all__ = ["PromptJob", "TeacherEngine", "TokenText"]


class TokenText:
    """Text <-> ids through one tokenizer, safe to call from the event loop and the worker thread at once (a
    fast tokenizer must not be used by two threads together); the text of single tokens is cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._pieces: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text)["input_ids"])

    def piece(self, token_id: int) -> str:
        """`tokenizer.decode([token_id])`: one token decoded alone ('' for an id the tokenizer does not know)."""
        text = self._pieces.get(token_id)
        if text is None:
            with self._lock:
                try:
                    text = self.tokenizer.decode([token_id])
                except (IndexError, KeyError, OverflowError, TypeError, ValueError):
                    text = ""  # a padded embedding row without a token
            self._pieces[token_id] = text
        return text

    def text(self, ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass(frozen=True)
class PromptJob:
    """One prompt to answer: its ids, how many top ids per position (None: no prompt_logprobs), the temperature
    of the log-probs and how many tokens to generate greedily."""

    ids: tuple[int, ...]
    top_k: int | None
    temperature: float = 1.0
    max_tokens: int = 1


class TeacherEngine:
    """A causal LM and its tokenizer, answering batches of `PromptJob`s (see `run`)."""

    def __init__(self, model, tokenizer):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("TeacherEngine serves causal LMs only; this model is an encoder-decoder")
        self.model = model.eval()
        self.text = TokenText(tokenizer)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        # log-probs over the tokenizer's entries: rows of an output layer padded past the tokenizer are never tokens
        # (as kdistill's local teacher and cache compute them, `kdistill.models.kd_vocab_size`)
        self.scored_vocab = min(len(tokenizer), int(model.get_output_embeddings().weight.shape[0]))
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None and 0 <= pad < self.vocab_size else 0
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None}

    def run(self, jobs: list[PromptJob]) -> list[dict]:
        """Answer a batch with one forward: per job {"prompt_logprobs": list | None, "tokens": generated ids,
        "text": their text, "finish_reason": "stop" (an end-of-sequence id) | "length"}."""
        with torch.inference_mode():
            logits = self.forward([job.ids for job in jobs])[..., :self.scored_vocab]  # (B, T, V)
            return [self._answer(job, logits[b, :len(job.ids)]) for b, job in enumerate(jobs)]

    def forward(self, prompts: list[tuple[int, ...]]) -> torch.Tensor:
        """Logits (B, T, V) of right-padded prompts (rows past a prompt's length are padding)."""
        longest = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for b, ids in enumerate(prompts):
            input_ids[b, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[b, :len(ids)] = 1
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        return out.logits

    def _answer(self, job: PromptJob, logits: torch.Tensor) -> dict:
        """logits: (n, V) of this job's n prompt tokens."""
        entries = None
        if job.top_k is not None:
            entries = prompt_logprobs(logits, job.ids, job.top_k, self.text.piece, job.temperature)
        tokens = self._greedy(job, int(logits[-1].argmax())) if job.max_tokens > 0 else []
        stopped = bool(tokens) and tokens[-1] in self.eos_ids
        return {"prompt_logprobs": entries, "tokens": tokens, "text": self.text.text(tokens),
                "finish_reason": "stop" if stopped else "length"}

    def _greedy(self, job: PromptJob, first: int) -> list[int]:
        """Up to `job.max_tokens` greedy tokens after the prompt, the first one already known from the batch."""
        from transformers import GenerationConfig

        tokens = [first]
        if job.max_tokens == 1 or first in self.eos_ids:
            return tokens
        ids = torch.as_tensor([[*job.ids, first]], dtype=torch.long, device=self.device)
        config = GenerationConfig(do_sample=False, max_new_tokens=job.max_tokens - 1, pad_token_id=self.pad_id,
                                  eos_token_id=sorted(self.eos_ids) or None)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return tokens + out[0, ids.shape[1]:].tolist()
