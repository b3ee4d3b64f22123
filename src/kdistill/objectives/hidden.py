"""Alignment of intermediate hidden states of mapped student/teacher layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdistill.batch import hidden_position_mask
from kdistill.fields import option
from kdistill.losses import HIDDEN_LOSSES, layer_output_index, resolve_layer_map
from kdistill.objectives.base import AlignmentConfig, Objective, as_float

__all__ = ["HiddenAlignment", "HiddenAlignmentConfig", "hidden_stacks", "num_layers"]


@dataclass
class HiddenAlignmentConfig(AlignmentConfig):
    """hidden: distance between (projected) student and teacher hidden states of mapped layers."""

    hidden_loss: str = option("mse", "Per-position distance between (projected) student and teacher hidden states: "
                              "mse (mean over the width) or cosine (1 - cos).", tuple(HIDDEN_LOSSES))


def num_layers(model, stack: str) -> int:
    """Layers of one stack ("encoder" / "decoder") of a model."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        if stack == "encoder":
            return int(config.num_layers)
        return int(getattr(config, "num_decoder_layers", None) or config.num_layers)
    return int(config.num_hidden_layers)


def hidden_stacks(model) -> tuple[str, ...]:
    """The layer stacks an alignment objective aligns: ('encoder', 'decoder') for T5, ('decoder',) otherwise."""
    return ("encoder", "decoder") if getattr(model.config, "is_encoder_decoder", False) else ("decoder",)


class LayerAlignment(Objective):
    """What hidden and attention alignment share: layer maps per stack, resolved when the models are known, and
    the position masks and global counts of each stack."""

    teacher_needs = frozenset({"hidden_states"})
    model_outputs = frozenset({"hidden_states"})

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.layer_maps: dict[str, list[tuple[int, int]]] = {}
        self.encoder_decoder = False

    def _spec(self, stack: str):
        override = self.cfg.encoder_layer_map if stack == "encoder" else self.cfg.decoder_layer_map
        return self.cfg.layer_map if override is None else override

    def resolve_maps(self, student, teacher) -> None:
        self.encoder_decoder = bool(getattr(student.config, "is_encoder_decoder", False))
        for stack in hidden_stacks(student):
            try:
                self.layer_maps[stack] = resolve_layer_map(self._spec(stack), num_layers(student, stack),
                                                           num_layers(teacher, stack))
            except ValueError as exc:
                raise ValueError(f"objectives.{self.name} ({stack}): {exc}") from None

    def stack_terms(self, view):
        """Per stack: (stack, layer pairs, (B, T) position mask, global position count)."""
        if not self.layer_maps:
            raise RuntimeError(f"objectives.{self.name}: setup(student, teacher) was not called")
        for stack, pairs in self.layer_maps.items():
            mask = hidden_position_mask(view.tokens, stack, self.encoder_decoder)
            count = (view.num_positions or {}).get(stack)
            yield stack, pairs, mask, (mask.sum() if count is None else count)


class HiddenAlignment(LayerAlignment):
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
    Config = HiddenAlignmentConfig

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.distance = HIDDEN_LOSSES[cfg.hidden_loss]

    def setup(self, student, teacher):
        self.resolve_maps(student, teacher)
        s_dim, t_dim = int(student.config.hidden_size), int(teacher.config.hidden_size)
        self.projections = torch.nn.ModuleDict()
        if s_dim != t_dim:
            for stack, pairs in self.layer_maps.items():
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
                               "output_hidden_states=True (DistillTrainer does so for objectives whose "
                               "model_outputs include hidden_states)")
        return states

    def forward(self, batch):
        view = batch.view(self.cfg.view)
        total, metrics = None, {}
        for stack, pairs, mask, count in self.stack_terms(view):
            s_states = self._states(view.student_outputs, stack, self.encoder_decoder)
            t_states = self._states(view.teacher_outputs, stack, self.encoder_decoder)
            mask = mask.to(s_states[0].device)
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
            stack_loss = stack_loss / len(pairs) / as_float(count, stack_loss)
            metrics[stack] = stack_loss.detach()
            total = stack_loss if total is None else total + stack_loss
        return total, metrics if len(metrics) > 1 else {}
