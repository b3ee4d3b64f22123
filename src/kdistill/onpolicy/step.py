"""One optimizer step of on-policy distillation: the coin flip, then answers sampled for every micro-batch.

`DistillTrainer` fetches an optimizer step's micro-batches, hands them to :meth:`OnPolicy.prepare` and only then
counts the step's trained tokens, so the loss is divided by the global number of *generated* trained tokens of the
step (all micro-batches, all processes), as off-policy steps are by the dataset's tokens.

* The coin flip (probability `lmbda`) is a function of the run's seed and the optimizer step only: every process
  draws the same, and a resumed run draws what the first run would have.
* An on-policy step replaces each micro-batch by the student's answers to its prompts (`kdistill.onpolicy.samples`),
  sampled with the student's current weights (no grad, eval mode, the unwrapped model: DDP, peft). With `seq_kd`,
  the other steps train on the teacher's answers instead of the dataset's responses.
* Each answer's random stream is seeded by (run seed, step, who samples, the prompt's ids, its occurrence in the
  micro-batch), so samples do not depend on how the global batch is split over processes.
* `rebatch` (optional) rewrites each sampled micro-batch before it is trained and returns counts that are logged as
  shares of the answers: a cross-tokenizer run gives the answers to the teacher in its own tokens
  (`kdistill.data.cross_samples`).
"""

from __future__ import annotations

import random
import time
from collections import Counter

import torch

from kdistill.generators.stops import stop_token_ids, turn_end_tokens
from kdistill.onpolicy.generation import HFGenerate, SamplingParams, row_seed
from kdistill.onpolicy.samples import SampleStats, left_padded_prompts, sampled_batch

__all__ = ["OnPolicy", "stop_ids_for"]

BACKENDS = {"hf": HFGenerate}


def stop_ids_for(tokenizer, model=None, turn_end: bool = True) -> tuple[int, ...]:
    """Ids that end an answer: the tokenizer's EOS, the model's generation EOS ids, and (with `turn_end`) the chat
    template's end-of-turn token."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    if turn_end:
        ids.extend(stop_token_ids(tokenizer, turn_end_tokens(tokenizer), "the student"))
    return tuple(dict.fromkeys(int(i) for i in ids))


class OnPolicy:
    """Samples the answers an optimizer step trains on (see the module docstring).

    cfg: `kdistill.config.OnPolicyConfig`; stop_ids / pad_id: what ends and pads an answer; vocab_limit: ids at or
    above it are never sampled (None: the whole output layer)."""

    def __init__(self, cfg, *, seed: int, stop_ids: tuple[int, ...], pad_id: int, encoder_decoder: bool = False,
                 vocab_limit: int | None = None, rebatch=None):
        if not stop_ids:
            raise ValueError("on-policy sampling needs at least one stop token id (the tokenizer has no EOS)")
        self.cfg = cfg
        self.seed = seed
        self.encoder_decoder = encoder_decoder
        self.params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                     top_k=cfg.top_k, stop_ids=tuple(stop_ids), pad_id=pad_id,
                                     vocab_limit=vocab_limit)
        self.backend = BACKENDS[cfg.backend]()
        self.rebatch = rebatch
        self._flips = (0, 0)  # (steps counted, on-policy among them): fraction() extends it

    def is_on_policy(self, step: int) -> bool:
        """The coin flip of optimizer step `step` (0-based): the same on every process and after a resume."""
        return random.Random(row_seed("lmbda", self.seed, step)).random() < self.cfg.lmbda

    def fraction(self, steps: int) -> float:
        """Share of the first `steps` optimizer steps that are on-policy."""
        counted, on = self._flips
        if steps < counted:
            counted, on = 0, 0
        on += sum(self.is_on_policy(s) for s in range(counted, steps))
        self._flips = (steps, on)
        return on / max(steps, 1)

    def prepare(self, batches: list[dict], step: int, student, teacher=None, synced: bool = False
                ) -> tuple[list[dict], dict[str, float]]:
        """The step's micro-batches as they are trained, and what to log: {} for a dataset step, else the
        answers' mean length, the truncated share and the seconds spent generating."""
        if self.is_on_policy(step):
            who, model = "student", student
        elif self.cfg.seq_kd:
            if teacher is None:
                raise RuntimeError("on_policy.seq_kd needs a live teacher model to generate with")
            who, model = "teacher", teacher
        else:
            return batches, {}
        start = time.perf_counter()
        out, stats, counts = [], SampleStats(), Counter()
        for batch in batches:
            sampled, one = self._sample(batch, step, who, model, synced)
            if self.rebatch is not None:
                sampled, more = self.rebatch(batch, sampled)
                counts.update(more)
            out.append(sampled)
            stats.add(one)
        seconds = time.perf_counter() - start
        answers = max(stats.answers, 1)
        return out, {f"on_policy/{who}_answer_length": stats.tokens / answers,
                     f"on_policy/{who}_truncated": stats.truncated / answers,
                     "on_policy/generation_seconds": seconds,
                     **{f"on_policy/{who}_{key}": n / answers for key, n in sorted(counts.items())}}

    def _sample(self, batch: dict, step: int, who: str, model, synced: bool) -> tuple[dict, SampleStats]:
        ids, mask, prompts = left_padded_prompts(batch, self.params.pad_id, self.encoder_decoder)
        seen: Counter = Counter()
        seeds = []
        for p in prompts:
            key = tuple(p.tolist())
            seeds.append(row_seed("sample", self.seed, step, who, key, seen[key]))
            seen[key] += 1
        device = next(model.parameters()).device
        new = self.backend.generate(model, ids.to(device), mask.to(device), seeds, self.params, synced=synced)
        return sampled_batch(batch, prompts, new.to(ids.device), self.params.stop_ids, self.params.max_new_tokens,
                             self.params.pad_id, who, self.encoder_decoder)
