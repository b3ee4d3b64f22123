"""Objectives: each turns one micro-batch into (loss, metrics).

Objectives read what they need from a `DistillBatch`, a lazy view of the micro-batch: the student's (and
teacher's) forward passes run once, the first time some objective asks for them, and positions are aligned in
one place (`kdistill.trainer.DistillTrainer._align`: the causal shift happens there and nowhere else).

Normalisation. An objective returns a loss already divided by a *global* count over the whole optimizer step
(all gradient-accumulation micro-batches, all processes): token-level objectives by `batch.num_items` (trained
tokens), example-level objectives by `batch.num_examples`, so accumulation and data parallelism leave the
objective unchanged. Metrics are normalised the same way, so they add up to weighted means over the step.
Adding a method = one class here + an example config.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from kdistill.losses import DIVERGENCE_PARAMS, get_divergence


class LMView:
    """One token view of a batch (the main one, or e.g. the rationale view of distilling step-by-step).

    `student_logits`, `teacher_logits` and `targets` are (B, T, ...) tensors in which position i predicts
    `targets[:, i]`; forward passes run on first access. `num_items` is the view's global trained-token count.

    Chunked mode (`chunked` is True: the trainer runs the models with their output layer bypassed, see
    `kdistill.trainer`): the forward passes return `student_hidden` / `teacher_hidden` (B, T, H) and the output
    layers `student_head` / `teacher_head`, and token objectives use the chunked losses, which never hold a
    (tokens x V) tensor; `student_logits` / `teacher_logits` still work but materialise the full logits.

    Cached teacher (`has_topk`): the batch carries the teacher's top-k per trained token (`teacher_topk`, rows in
    the row-major order of `mask`) instead of a live teacher.
    """

    def __init__(self, inputs: dict[str, Any], num_items, forward: Callable, num_positions: dict | None = None,
                 chunk_size: int | None = None, topk_temperature: float | None = None):
        self.inputs = inputs
        self.num_items = num_items
        # stack ("encoder" / "decoder") -> global count of the positions hidden-state objectives compare, when
        # the trainer computed it for the optimizer step (None: objectives fall back to local counts)
        self.num_positions = num_positions
        self.chunk_size = chunk_size
        self.topk_temperature = topk_temperature
        self._forward = forward

    @cached_property
    def _student(self) -> dict[str, Any]:
        return self._forward(self.inputs, need_teacher=False)

    @cached_property
    def _teacher(self) -> dict[str, Any]:
        return self._forward(self.inputs, need_teacher=True, student=self._student)

    @property
    def chunked(self) -> bool:
        return self.chunk_size is not None

    @property
    def student_hidden(self) -> torch.Tensor:
        """(B, T, H) final hidden states (chunked mode): what the output layer would project."""
        return self._student["student_hidden"]

    @property
    def student_head(self):
        """The student's output layer (chunked mode): `kdistill.trainer.OutputHead(weight, bias)`."""
        return self._student["student_head"]

    @property
    def teacher_hidden(self) -> torch.Tensor:
        return self._teacher["teacher_hidden"]

    @property
    def teacher_head(self):
        return self._teacher["teacher_head"]

    @property
    def has_topk(self) -> bool:
        return "teacher_topk_indices" in self.inputs

    @property
    def teacher_topk(self):
        """The cached teacher: a `TopKTeacher` whose (N, k) rows are the trained positions of this view in the
        row-major order of `mask`."""
        from kdistill.losses import TopKTeacher

        if not self.has_topk:
            raise RuntimeError("this batch carries no cached teacher signal (teacher_topk_indices)")
        indices, logprobs = self.inputs["teacher_topk_indices"], self.inputs["teacher_topk_logprobs"]
        rows = int(self.mask.sum())
        if indices.shape[0] != rows:
            raise RuntimeError(f"the cached teacher has {indices.shape[0]} rows for a batch with {rows} trained "
                               "tokens: the cache does not match the data")
        return TopKTeacher(indices=indices, logprobs=logprobs, capture_temperature=float(self.topk_temperature))

    @property
    def teacher_logits(self) -> torch.Tensor:
        if self.chunked:
            return self._project("teacher")
        return self._teacher["teacher_logits"]

    def _project(self, role: str) -> torch.Tensor:
        """Dense logits from hidden states and the output layer (chunked mode; an objective that needs them)."""
        key = f"_{role}_logits"
        if key not in self.__dict__:
            hidden = self.student_hidden if role == "student" else self.teacher_hidden
            head = self.student_head if role == "student" else self.teacher_head
            self.__dict__[key] = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias)
        return self.__dict__[key]

    @property
    def teacher_outputs(self):
        """The teacher's ModelOutput (no grad; hidden states on the teacher's device)."""
        return self._teacher["teacher_outputs"]

    @property
    def student_logits(self) -> torch.Tensor:
        if self.chunked:
            return self._project("student")
        return self._student["student_logits"]

    @property
    def targets(self) -> torch.Tensor:
        return self._student["targets"]

    @property
    def student_outputs(self):
        return self._student["student_outputs"]

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool: positions that are trained."""
        return self.targets.ne(-100)


def view_prefix(view: str) -> str:
    """Key prefix of a token view in a collated batch: '' -> input_ids/labels, 'rationale' -> rationale_input_ids."""
    return f"{view}_" if view else ""


class DistillBatch:
    """One micro-batch as objectives see it.

    LM batches: `view(name)` gives an `LMView` over the keys `{name}_input_ids`, `{name}_labels`, ... (the main
    view, name '', reads `input_ids` and `labels`); `student_logits`, `teacher_logits`, `targets`, `mask` and
    `num_items` are the main view's. Embedding batches: `embeddings(field)` gives the pooled (B, H) student
    embedding of a text field (`anchor`, `positive`, `negative`, `text`, ...) and `teacher_embeddings(field)`
    the teacher's, precomputed (`teacher_<field>` tensors).
    """

    def __init__(self, inputs: dict[str, Any], num_tokens: dict[str, Any], num_examples, *,
                 lm_forward: Callable | None = None, embed: Callable | None = None, kd_vocab: int | None = None,
                 num_positions: dict[str, dict[str, Any]] | None = None, chunk_size: int | None = None,
                 topk_temperature: float | None = None):
        self.inputs = inputs
        self.chunk_size = chunk_size              # not None: token objectives use the chunked losses
        self.topk_temperature = topk_temperature  # capture temperature of a cached top-k teacher
        self.num_tokens = num_tokens        # view -> global trained tokens in the optimizer step
        self.num_positions = num_positions or {}  # view -> stack -> global hidden-state positions in the step
        self.num_examples = num_examples    # global examples in the optimizer step (example-level objectives)
        self.kd_vocab = kd_vocab            # leading vocabulary entries shared by teacher and student
        self._lm_forward = lm_forward
        self._embed = embed
        self._views: dict[str, LMView] = {}
        self._embeddings: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------------- LM views
    def view(self, name: str = "") -> LMView:
        if name not in self._views:
            prefix = view_prefix(name)
            if self._lm_forward is None or f"{prefix}labels" not in self.inputs:
                raise RuntimeError(f"this batch has no token view {name!r} (no {prefix}labels)")
            keys = {k[len(prefix):]: v for k, v in self.inputs.items() if k.startswith(prefix)} if prefix else \
                self.inputs
            self._views[name] = LMView(keys, self.num_tokens[name], self._lm_forward, self.num_positions.get(name),
                                       chunk_size=self.chunk_size, topk_temperature=self.topk_temperature)
        return self._views[name]

    @property
    def num_items(self):
        return self.view().num_items

    @property
    def student_logits(self) -> torch.Tensor:
        return self.view().student_logits

    @property
    def teacher_logits(self) -> torch.Tensor:
        return self.view().teacher_logits

    @property
    def targets(self) -> torch.Tensor:
        return self.view().targets

    @property
    def mask(self) -> torch.Tensor:
        return self.view().mask

    @property
    def student_outputs(self):
        return self.view().student_outputs

    # ------------------------------------------------------------------------------------- embedding view
    def has_field(self, field: str) -> bool:
        return f"{field}_input_ids" in self.inputs

    def embeddings(self, field: str) -> torch.Tensor:
        """(N, H) student embeddings of a text field (negatives: (B*K, H), row b*K + k)."""
        if field not in self._embeddings:
            if self._embed is None or not self.has_field(field):
                raise RuntimeError(f"this batch has no text field {field!r} to embed")
            self._embeddings[field] = self._embed(field)
        return self._embeddings[field]

    def teacher_embeddings(self, field: str) -> torch.Tensor:
        cached = self.inputs.get(f"teacher_{field}")
        if cached is None:
            raise RuntimeError(f"no precomputed teacher embeddings for field {field!r} in this batch "
                               f"(expected key teacher_{field})")
        return cached


class Objective(torch.nn.Module):
    """Base class. Subclasses set `type`, `needs_teacher`, and implement `forward(batch) -> (loss, metrics)`.

    An objective is a Module so that objectives with trainable parts (a projection between student and teacher
    widths) are trained, synchronised across processes and checkpointed with the student. `setup(student,
    teacher)` runs once before training, when both models are known.
    """

    type: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False  # the trainer asks student and teacher for output_hidden_states
    task: ClassVar[str] = "lm"      # "lm" (batches with labels) or "embedding" (batches with text fields)
    default_temperature: ClassVar[float] = 1.0

    def __init__(self, name: str, cfg) -> None:
        super().__init__()
        self.name = name
        self.cfg = cfg

    def setup(self, student, teacher) -> None:
        """Create trainable parts that depend on the models (default: none)."""

    def forward(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError


def _as_float(count, like: torch.Tensor):
    if torch.is_tensor(count):
        return count.to(like.dtype).clamp(min=1)
    return max(float(count), 1.0)


class CrossEntropy(Objective):
    """Token cross-entropy on the labels (the SFT loss): sum over trained tokens of -log P_s(y) / num_items.

    With `view: rationale` it is the rationale loss of distilling step-by-step (Hsieh et al., 2023):
    objectives {ce: {weight: alpha}, rationale: {type: ce, view: rationale, weight: 1 - alpha}} give
    alpha * L_label + (1 - alpha) * L_rationale, each a mean over its own view's tokens.
    """

    type = "ce"

    def forward(self, batch):
        view = batch.view(self.cfg.view)
        mask = view.mask
        if view.chunked:  # never an (N, V) tensor: see kdistill.losses.chunked
            from kdistill.losses import chunked_cross_entropy

            head = view.student_head
            loss = chunked_cross_entropy(view.student_hidden, head.weight, view.targets, mask=mask,
                                         chunk_size=view.chunk_size, reduction="sum", student_lm_head_bias=head.bias)
            return loss / _as_float(view.num_items, loss), {}
        logits = view.student_logits[mask].float()             # (N, V)
        loss = F.cross_entropy(logits, view.targets[mask], reduction="sum")
        return loss / _as_float(view.num_items, loss), {}


class LogitKD(Objective):
    """Token-level logit distillation with one of `kdistill.losses.DIVERGENCES` (default forward KL).

    Both logit tensors are cut to the shared vocabulary (`batch.kd_vocab`): a padded embedding matrix (Qwen2.5-7B
    has 152,064 rows, Qwen2.5-0.5B 151,936, the tokenizer 151,665) never enters the loss.

    The teacher is a live model (dense logits, or in chunked mode its hidden states and output layer) or a cached
    top-k teacher (`kdistill cache`), compared with `kdistill.losses.topk_divergence` and the objective's
    `missing` rule for the mass outside the stored k ids.
    """

    type = "kd"
    needs_teacher = True

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.divergence = get_divergence(cfg.divergence)
        self.params = {p: getattr(cfg, p) for p in DIVERGENCE_PARAMS[cfg.divergence]}

    def forward(self, batch):
        view = batch.view(self.cfg.view)
        if view.has_topk:
            return self._from_topk(batch, view)
        if view.chunked:
            return self._chunked(batch, view)
        student, teacher = view.student_logits, view.teacher_logits
        vocab = batch.kd_vocab or min(student.shape[-1], teacher.shape[-1])
        student, teacher = student[..., :vocab], teacher[..., :vocab]
        mask = view.mask
        loss = self.divergence(student, teacher, mask=mask, temperature=self.cfg.temperature,
                               num_items=view.num_items, **self.params)
        with torch.no_grad():
            agree = (student[mask].argmax(-1) == teacher[mask].argmax(-1)).sum().float()
        return loss, {"top1_agreement": agree / _as_float(view.num_items, agree)}

    def _chunked(self, batch, view):
        from kdistill.losses import chunked_distillation_loss

        s_head, t_head = view.student_head, view.teacher_head
        vocab = batch.kd_vocab or min(s_head.weight.shape[0], t_head.weight.shape[0])
        counts: dict[str, torch.Tensor] = {}
        loss = chunked_distillation_loss(
            view.student_hidden, s_head.weight, view.teacher_hidden, t_head.weight, mask=view.mask,
            divergence=self.cfg.divergence, temperature=self.cfg.temperature, chunk_size=view.chunk_size,
            num_items=view.num_items, student_lm_head_bias=s_head.bias, teacher_lm_head_bias=t_head.bias,
            vocab_size=vocab, metrics=counts, **self.params)
        agree = counts["top1_agreement"]
        return loss, {"top1_agreement": agree / _as_float(view.num_items, agree)}

    def _from_topk(self, batch, view):
        from kdistill.losses import chunked_topk_distillation_loss, topk_divergence

        teacher, mask = view.teacher_topk, view.mask
        kwargs = dict(divergence=self.cfg.divergence, temperature=self.cfg.temperature, missing=self.cfg.missing,
                      num_items=view.num_items, **self.params)
        if view.chunked:
            head = view.student_head
            vocab = batch.kd_vocab or head.weight.shape[0]
            counts: dict[str, torch.Tensor] = {}
            loss = chunked_topk_distillation_loss(view.student_hidden, head.weight, teacher, mask=mask,
                                                  chunk_size=view.chunk_size, student_lm_head_bias=head.bias,
                                                  vocab_size=vocab, metrics=counts, **kwargs)
            agree = counts["top1_agreement"]
        else:
            student = view.student_logits
            student = student[..., :batch.kd_vocab or student.shape[-1]][mask]           # (N, V)
            loss = topk_divergence(student, teacher, **kwargs)
            with torch.no_grad():
                best = teacher.indices.gather(-1, teacher.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
                agree = (student.argmax(-1) == best).sum().float()
        return loss, {"top1_agreement": agree / _as_float(view.num_items, agree)}


class Contrastive(Objective):
    """InfoNCE on (anchor, positive[, negatives]) text fields: in-batch negatives plus hard negatives.

    Cosine similarities / `temperature` (0.05 is the usual choice, scale 20 in sentence-transformers terms).
    Under several processes, candidates are gathered from every process (exact gradients), so each anchor is
    contrasted against the global batch. Needs no teacher. Metric: fraction of anchors whose positive scores
    highest among their candidates.
    """

    type = "contrastive"
    task = "embedding"
    default_temperature = 0.05

    def forward(self, batch):
        from kdistill.losses import info_nce

        anchor = batch.embeddings("anchor")
        positive = batch.embeddings("positive")
        negatives = None
        if batch.has_field("negative"):
            negatives = batch.embeddings("negative").reshape(anchor.shape[0], -1, anchor.shape[-1])
        loss = info_nce(anchor, positive, negatives, temperature=self.cfg.temperature,
                        num_items=batch.num_examples, gather=True)  # all processes; no-op in one
        with torch.no_grad():
            a, p = F.normalize(anchor.float(), dim=-1), F.normalize(positive.float(), dim=-1)
            correct = (a @ p.T).argmax(-1).eq(torch.arange(a.shape[0], device=a.device))
            if negatives is not None:
                n = F.normalize(negatives.float(), dim=-1)
                correct &= (a * p).sum(-1) > torch.einsum("bd,bkd->bk", a, n).max(-1).values
        return loss, {"accuracy": correct.sum().float() / _as_float(batch.num_examples, loss)}


class EmbeddingKD(Objective):
    """Match the teacher's sentence embeddings: `loss` = mse | cosine | similarity (in-batch similarity
    distributions, which needs no projection), on every text field of the batch.

    When student and teacher widths differ, mse/cosine go through a learned linear projection (student -> teacher
    width), trained with the student and left out of the exported student.
    """

    type = "embedding_kd"
    needs_teacher = True
    task = "embedding"
    default_temperature = 0.05

    def setup(self, student, teacher):
        s_dim, t_dim = int(student.config.hidden_size), int(teacher.config.hidden_size)
        self.projection = None
        if s_dim != t_dim and self.cfg.loss in ("mse", "cosine"):
            self.projection = torch.nn.Linear(s_dim, t_dim, bias=False)

    def forward(self, batch):
        from kdistill.losses import embedding_cosine, embedding_mse, similarity_kd

        total = None
        fields = [f for f in ("text", "anchor", "positive", "negative", "sentence1", "sentence2")
                  if batch.has_field(f)]
        for field in fields:
            student = batch.embeddings(field)
            teacher = batch.teacher_embeddings(field).to(student.dtype)
            if self.cfg.loss == "similarity":
                loss = similarity_kd(student, teacher, temperature=self.cfg.temperature, reduction="sum")
            else:
                if self.projection is not None:
                    student = self.projection(student)
                fn = embedding_mse if self.cfg.loss == "mse" else embedding_cosine
                loss = fn(student, teacher, reduction="sum")
            total = loss if total is None else total + loss
        # sum over rows of every field / global example count: one mean per field, added
        total = total / _as_float(batch.num_examples, total)
        return total, {}


def _num_layers(model, stack: str) -> int:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        if stack == "encoder":
            return int(config.num_layers)
        return int(getattr(config, "num_decoder_layers", None) or config.num_layers)
    return int(config.num_hidden_layers)


def hidden_stacks(model) -> tuple[str, ...]:
    """The layer stacks a hidden-state objective aligns: ('encoder', 'decoder') for T5, ('decoder',) otherwise."""
    return ("encoder", "decoder") if getattr(model.config, "is_encoder_decoder", False) else ("decoder",)


def hidden_position_mask(inputs: dict[str, Any], stack: str, encoder_decoder: bool) -> torch.Tensor:
    """(B, T) bool: positions whose hidden states are compared. Causal LMs and T5 encoders: real tokens (the
    attention mask; prompt tokens included, padding excluded). T5 decoders: positions with a label != -100."""
    if encoder_decoder and stack == "decoder":
        return inputs["labels"].ne(-100)
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    return mask.bool()


class HiddenAlignment(Objective):
    """Align intermediate hidden states of mapped student/teacher layers (TinyBERT, Jiao et al., 2020; PKD, Sun
    et al., 2019): for each stack and each mapped pair (i, j),

        L_stack = (1 / |pairs|) * sum_(i, j) sum_(masked b, t) d(W_ij h^s_i[b, t], h^t_j[b, t]) / N_stack
        loss    = sum over stacks (decoder only for causal LMs; encoder + decoder for T5)

    with d = `hidden_loss` (mse: mean over the width; cosine: 1 - cos), h_i the output of 0-based layer i, i.e.
    `hidden_states[i + 1]` (index 0 is the embedding output; the last entry is the final-norm output), and
    W_ij a learned `Linear(student_width, teacher_width, bias=False)` when widths differ (identity otherwise),
    trained with the student and left out of the exported student.

    Masks: causal LMs and T5 encoders compare every real token (attention mask: prompt tokens too, padding
    never); T5 decoders compare the positions with a label. N_stack is the number of masked positions of the
    stack over the whole optimizer step (all accumulation micro-batches, all processes) when the trainer supplies
    it (`LMView.num_positions`, as `DistillTrainer` does); otherwise the micro-batch's own count is used, which
    makes the term a per-micro-batch mean (under gradient accumulation, micro-batches then count equally rather
    than by their number of positions, and the term's scale grows with the number of accumulation steps).
    """

    type = "hidden"
    needs_teacher = True
    needs_hidden_states = True

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        from kdistill.losses import HIDDEN_LOSSES

        self.distance = HIDDEN_LOSSES[cfg.hidden_loss]
        self.layer_maps: dict[str, list[tuple[int, int]]] = {}
        self.encoder_decoder = False

    def _spec(self, stack: str):
        override = self.cfg.encoder_layer_map if stack == "encoder" else self.cfg.decoder_layer_map
        return self.cfg.layer_map if override is None else override

    def setup(self, student, teacher):
        from kdistill.losses import resolve_layer_map

        self.encoder_decoder = bool(getattr(student.config, "is_encoder_decoder", False))
        s_dim, t_dim = int(student.config.hidden_size), int(teacher.config.hidden_size)
        self.projections = torch.nn.ModuleDict()
        for stack in hidden_stacks(student):
            n_s, n_t = _num_layers(student, stack), _num_layers(teacher, stack)
            try:
                pairs = resolve_layer_map(self._spec(stack), n_s, n_t)
            except ValueError as exc:
                raise ValueError(f"objectives.{self.name} ({stack}): {exc}") from None
            self.layer_maps[stack] = pairs
            if s_dim != t_dim:
                for i, j in pairs:
                    key = self._key(stack, i, j)
                    if key not in self.projections:
                        self.projections[key] = torch.nn.Linear(s_dim, t_dim, bias=False)

    @staticmethod
    def _key(stack: str, i: int, j: int) -> str:
        return f"{stack}_{i}_{j}"

    @staticmethod
    def _states(outputs, stack: str, encoder_decoder: bool):
        states = (outputs.encoder_hidden_states if stack == "encoder" else outputs.decoder_hidden_states) \
            if encoder_decoder else outputs.hidden_states
        if states is None:
            raise RuntimeError("the model returned no hidden states: the forward pass must run with "
                               "output_hidden_states=True (DistillTrainer does so for objectives with "
                               "needs_hidden_states)")
        return states

    def forward(self, batch):
        from kdistill.losses import layer_output_index

        if not self.layer_maps:
            raise RuntimeError(f"objectives.{self.name}: setup(student, teacher) was not called")
        view = batch.view(self.cfg.view)
        student_out, teacher_out = view.student_outputs, view.teacher_outputs
        total, metrics = None, {}
        for stack, pairs in self.layer_maps.items():
            s_states = self._states(student_out, stack, self.encoder_decoder)
            t_states = self._states(teacher_out, stack, self.encoder_decoder)
            mask = hidden_position_mask(view.inputs, stack, self.encoder_decoder).to(s_states[0].device)
            count = (view.num_positions or {}).get(stack)
            if count is None:
                count = mask.sum()
            stack_loss = None
            for i, j in pairs:
                student = s_states[layer_output_index(i)]                     # (B, T, H_s)
                teacher = t_states[layer_output_index(j)].to(student.device)  # (B, T, H_t)
                key = self._key(stack, i, j)
                if key in self.projections:
                    proj = self.projections[key]
                    student = proj(student.to(proj.weight.dtype))             # (B, T, H_t)
                loss = self.distance(student, teacher, mask=mask, reduction="sum")
                stack_loss = loss if stack_loss is None else stack_loss + loss
            stack_loss = stack_loss / len(pairs) / _as_float(count, stack_loss)
            metrics[stack] = stack_loss.detach()
            total = stack_loss if total is None else total + stack_loss
        return total, metrics if len(metrics) > 1 else {}


class AttentionAlignment(HiddenAlignment):
    """Align the attention maps of mapped student/teacher layers (MiniLM, Wang et al., 2020; TinyBERT):
    for each stack, mapped pair (i, j) and counted query position q,

        d = sum_k A^t_j[q, k] (log A^t_j[q, k] - log A^s_i[q, k])      KL(A_teacher || A_student) over keys,

    averaged over heads; when head counts differ, each model's heads are averaged first and one KL is taken.
    Layer maps, masks (queries: real tokens; T5 decoder: trained positions) and the global normalisation are those
    of `hidden`. Self-attention only (T5: encoder and decoder self-attention; cross-attention is not aligned).
    Attention weights exist only with eager attention: kdistill loads both models with
    `attn_implementation: eager` when this objective is configured.
    """

    type = "attention"
    needs_hidden_states = False
    needs_attentions = True

    def setup(self, student, teacher):
        for role, model in (("student", student), ("teacher", teacher)):
            impl = getattr(model.config, "_attn_implementation", None)
            if impl not in (None, "eager"):
                raise ValueError(f"objectives.{self.name}: the {role} uses {impl} attention, which returns no "
                                 f"attention weights; load it with attn_implementation: eager")
        super().setup(student, teacher)
        self.projections = torch.nn.ModuleDict()  # attention maps have no width to project

    @staticmethod
    def _maps(outputs, stack: str, encoder_decoder: bool):
        maps = (outputs.encoder_attentions if stack == "encoder" else outputs.decoder_attentions) \
            if encoder_decoder else outputs.attentions
        if not maps:
            raise RuntimeError("the model returned no attention weights: it must run with eager attention and "
                               "output_attentions=True (DistillTrainer does so for the attention objective)")
        return maps

    def forward(self, batch):
        from kdistill.losses import attention_kl

        if not self.layer_maps:
            raise RuntimeError(f"objectives.{self.name}: setup(student, teacher) was not called")
        view = batch.view(self.cfg.view)
        total, metrics = None, {}
        for stack, pairs in self.layer_maps.items():
            s_maps = self._maps(view.student_outputs, stack, self.encoder_decoder)
            t_maps = self._maps(view.teacher_outputs, stack, self.encoder_decoder)
            mask = hidden_position_mask(view.inputs, stack, self.encoder_decoder).to(s_maps[0].device)
            count = (view.num_positions or {}).get(stack)
            if count is None:
                count = mask.sum()
            stack_loss = sum(attention_kl(s_maps[i], t_maps[j].to(s_maps[i].device), mask, reduction="sum")
                             for i, j in pairs)
            stack_loss = stack_loss / len(pairs) / _as_float(count, stack_loss)
            metrics[stack] = stack_loss.detach()
            total = stack_loss if total is None else total + stack_loss
        return total, metrics if len(metrics) > 1 else {}


class Triplet(Objective):
    """Contrastive textual deviation for LM students (MiniCSM-style): the student's pooled representation of a
    consensus statement must be closer to its supporting evidence than to its refuting evidence.

    InfoNCE (`kdistill.losses.info_nce`, the embedding path's loss) with anchor = consensus, positive = supporting,
    the row's refuting evidence as hard negative and the batch's other evidences as in-batch negatives; cosine /
    `temperature`. Representations: mean over real tokens of the last hidden states (T5: the encoder's). Rows come
    from `{consensus, supporting, refuting}` fields next to the LM fields (see `kdistill.data.claims`); it runs on
    the same batch as ce / kd / hidden. Metric: fraction of triplets with cos(c, s) > cos(c, r).
    """

    type = "triplet"
    default_temperature = 0.05

    def forward(self, batch):
        from kdistill.losses import info_nce

        anchor, positive = batch.embeddings("anchor"), batch.embeddings("positive")
        negative = batch.embeddings("negative").reshape(anchor.shape[0], -1, anchor.shape[-1])
        loss = info_nce(anchor, positive, negative, temperature=self.cfg.temperature,
                        num_items=batch.num_examples, gather=True)  # all processes; no-op in one
        with torch.no_grad():
            a, p, n = (F.normalize(x.float(), dim=-1) for x in (anchor, positive, negative[:, 0]))
            closer = ((a * p).sum(-1) > (a * n).sum(-1)).sum().float()
        return loss, {"accuracy": closer / _as_float(batch.num_examples, closer)}


OBJECTIVES: dict[str, type[Objective]] = {
    cls.type: cls for cls in (CrossEntropy, LogitKD, HiddenAlignment, AttentionAlignment, Contrastive, EmbeddingKD, Triplet)}


def build_objectives(configs: dict) -> dict[str, tuple[Objective, float]]:
    """name -> (objective, weight) from the `objectives` section of a RunConfig."""
    out = {}
    for name, cfg in configs.items():
        kind = cfg.type or name
        if kind not in OBJECTIVES:
            raise ValueError(f"objectives.{name}: unknown type {kind!r} (valid: {', '.join(OBJECTIVES)})")
        out[name] = (OBJECTIVES[kind](name, cfg), float(cfg.weight))
    return out
