"""Cross-tokenizer logit distillation: a teacher and a student with different tokenizers (`kdistill.data.cross_rows`
gives each row in both tokenisations with the chunks that align them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdistill.data.alignment import matched_vocabulary
from kdistill.data.cross_rows import CHUNK_KEYS, TEACHER_VIEW
from kdistill.fields import FieldError, option
from kdistill.losses import DIVERGENCES
from kdistill.losses.cross_tokenizer import ALM_DIVERGENCES, alm_loss, gold_loss, uld_loss
from kdistill.losses.policy import target_logprobs
from kdistill.models.heads import shifted_targets
from kdistill.objectives.base import Objective, ObjectiveConfig, as_float
from kdistill.teachers.base import DenseLogits, HiddenAndHead, TopKRows

__all__ = ["CrossTokenizerConfig", "CrossTokenizerKD"]


@dataclass
class CrossTokenizerConfig(ObjectiveConfig):
    """crosstok: logit KD between different tokenizers (alm, gold or uld)."""

    method: str = option("alm", "alm: chunk-level likelihood matching (ALM, Minixhofer et al. 2025; needs only the "
                         "teacher's log-probs of its own tokens); gold: a divergence over the exactly matched part of "
                         "the vocabularies plus sorted-probability L1 over the rest, at one-to-one aligned tokens "
                         "(TRL's GOLD); uld: sorted-probability L1 only (Boizard et al. 2024).",
                         ("alm", "gold", "uld"))
    divergence: str = option("forward_kl", "gold: the divergence on the matched vocabulary; alm: the binary KL's "
                             "direction (forward_kl or reverse_kl).", tuple(DIVERGENCES))
    temperature: float = option(1.0, "gold / uld: loss temperature (both softened, loss x T^2).", gt=0)
    binarization_temperature: float = option(100.0, "alm: chunk probabilities are exp(log p / tau) before the "
                                             "binary divergence (tokenkit's default 100).", gt=0)
    matched_weight: float | None = option(None, "gold: weight of the matched part (default: the matched share of the "
                                          "teacher's vocabulary).", ge=0)
    unmatched_weight: float | None = option(None, "gold: weight of the unmatched part (default 1 - matched_weight).",
                                            ge=0)
    beta: float = option(0.5, "gold with jsd: mixture weight.", ge=0, le=1)
    alpha: float = option(0.1, "gold with skew_*: skew weight.", ge=0, le=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "alm" and self.divergence not in ALM_DIVERGENCES:
            raise FieldError("divergence", f"{self.divergence} is not a binary KL direction: method alm takes "
                             f"{' or '.join(ALM_DIVERGENCES)}")


def _shift(chunks: torch.Tensor) -> torch.Tensor:
    """Chunk ids per token -> per position, as the labels are shifted (position i predicts token i + 1)."""
    return shifted_targets(chunks, False)


def _slots(chunks: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position in a chunk (row-major): its chunk's slot, row * width + chunk, and its flat position."""
    inside = chunks >= 0
    rows = torch.arange(chunks.shape[0], device=chunks.device)[:, None]
    positions = torch.arange(chunks.numel(), device=chunks.device).reshape(chunks.shape)
    return (rows * width + chunks)[inside], positions[inside]


class CrossTokenizerKD(Objective):
    """Logit KD across tokenizers. The student reads its tokens (view ""), the teacher its own (view "xt"); chunks
    spell the same characters on both sides. alm compares chunk log-probs (sums of the chunks' token log-probs);
    gold and uld compare next-token distributions at chunks of one token on each side. Normalised by the global
    count of the student's trained tokens."""

    type = "crosstok"
    Config = CrossTokenizerConfig
    teacher_needs = frozenset({"tokens"})
    reads_logits = True
    cross_tokenizer = True
    scores_samples = True  # on-policy answers are re-tokenised for the teacher (kdistill.data.cross_samples)

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.vocab: tuple[int, int] | None = None
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup_tokenizers(self, student_tokenizer, teacher_tokenizer) -> None:
        """The two vocabularies' sizes and, for gold, their exactly matched tokens."""
        self.vocab = (len(student_tokenizer), len(teacher_tokenizer))
        if self.cfg.method == "gold":
            self.pairs = matched_vocabulary(student_tokenizer, teacher_tokenizer)

    def forward(self, batch):
        if self.vocab is None:
            raise RuntimeError(f"objectives.{self.name}: setup_tokenizers was not called (the LM recipe does it)")
        student, teacher = batch.view(""), batch.view(TEACHER_VIEW)
        signal = teacher.teacher_tokens()
        t_logits, t_lp = None, None
        if isinstance(signal, HiddenAndHead):
            t_logits = F.linear(signal.hidden, signal.head.weight, signal.head.bias)
        elif isinstance(signal, DenseLogits):
            t_logits = signal.logits
        elif isinstance(signal, TopKRows) and signal.target_logprobs is not None and self.cfg.method == "alm":
            # a served teacher: the log-prob of each of its own tokens is all alm reads
            t_lp = torch.zeros(teacher.targets.shape, dtype=torch.float32, device=teacher.targets.device)
            t_lp[teacher.mask] = signal.target_logprobs.float().to(t_lp.device)
        else:
            raise TypeError(f"objectives.{self.name}: method {self.cfg.method} needs the teacher's logits on its own "
                            f"tokens (a loaded teacher), got {type(signal).__name__}")
        v_s, v_t = self.vocab
        s_logits = student.student_logits[..., :v_s]
        if t_logits is not None:
            t_logits = t_logits[..., :v_t]
        extra = batch.batch.extra
        s_chunks, t_chunks = _shift(extra[CHUNK_KEYS[0]]), _shift(extra[CHUNK_KEYS[1]])
        rows = s_chunks.shape[0]
        width = int(max(s_chunks.max(), t_chunks.max()).item()) + 1 if s_chunks.numel() else 0
        (s_slots, s_at), (t_slots, t_at) = _slots(s_chunks, width), _slots(t_chunks, width)
        s_count = torch.bincount(s_slots, minlength=rows * width)
        t_count = torch.bincount(t_slots, minlength=rows * width)
        both = (s_count > 0) & (t_count > 0)
        norm = student.num_items
        if self.cfg.method == "alm":
            s_lp = target_logprobs(s_logits, student.targets)
            if t_lp is None:
                t_lp = target_logprobs(t_logits.detach(), teacher.targets)
            s_sum = s_lp.new_zeros(rows * width).index_add(0, s_slots, s_lp.reshape(-1)[s_at])
            t_sum = s_lp.new_zeros(rows * width).index_add(0, t_slots, t_lp.reshape(-1)[t_at].to(s_lp.dtype))
            loss = alm_loss(s_sum[both], t_sum[both], binarization_temperature=self.cfg.binarization_temperature,
                            divergence=self.cfg.divergence, reduction="sum")
            chunks = both.sum()
            return loss / as_float(norm, loss), {"aligned_chunks": chunks.float() / as_float(norm, loss)}
        single = both & (s_count == 1) & (t_count == 1)
        s_pos = torch.full((rows * width,), -1, dtype=torch.long, device=s_chunks.device).scatter_(0, s_slots, s_at)
        t_pos = torch.full_like(s_pos, -1).scatter_(0, t_slots, t_at)
        s_rows = s_logits.reshape(-1, v_s)[s_pos[single]]
        t_rows = t_logits.reshape(-1, v_t).to(s_rows.device)[t_pos[single]].detach()
        if self.cfg.method == "uld":
            loss = uld_loss(s_rows, t_rows, temperature=self.cfg.temperature, reduction="sum")
        else:
            s_ids, t_ids = self.pairs
            loss = gold_loss(s_rows, t_rows, s_ids, t_ids, divergence=self.cfg.divergence,
                             temperature=self.cfg.temperature, matched_weight=self.cfg.matched_weight,
                             unmatched_weight=self.cfg.unmatched_weight, reduction="sum", beta=self.cfg.beta,
                             alpha=self.cfg.alpha)
        return loss / as_float(norm, loss), {"aligned_positions": single.sum().float() / as_float(norm, loss)}
