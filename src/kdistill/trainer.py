"""DistillTrainer: the one trainer. total loss = sum_i weight_i * objective_i(batch).

It is a `transformers.Trainer`, so TrainingArguments, `accelerate launch`, DeepSpeed/FSDP configs, callbacks,
checkpoints/resume and `report_to` (wandb, tensorboard) work as users know them. What it adds:

* a frozen teacher (eval mode, no grad), placed on the student's device unless it was loaded with a device map;
* one forward pass of student and teacher per micro-batch, positions aligned once (`_align`);
* global normalisation: every objective divides by the number of trained tokens in the whole optimizer step
  (all gradient-accumulation micro-batches, all processes), so 2 x B/2 accumulation equals 1 x B and two
  processes equal one process on the same global batch;
* every term and metric logged separately (`loss/ce`, `loss/kd`, `kd/top1_agreement`, ...);
* chunked token losses for large vocabularies (`chunk_size`): the models run with their output layer bypassed,
  so their forward returns the final hidden states, and `ce`/`kd` project them to the vocabulary a chunk of
  positions at a time (`kdistill.losses.chunked`): no (tokens x V) logits for student or teacher, forward or
  backward. `resolve_chunking` decides, and checks on a probe input that the model's logits really are
  `hidden @ W.T + b` (soft-capping, logit scales or a LoRA-wrapped lm_head make it fall back to dense logits);
* a cached teacher (`topk_temperature`): batches carry the teacher's top-k per trained token and no teacher
  model is loaded.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from transformers import Trainer

from kdistill.models.heads import (OutputHead, align_positions, chunking_problem, lm_model_inputs, output_layer,
                                   output_layer_bypassed, shifted_targets)
from kdistill.objectives import DistillBatch, Objective, view_prefix


OBJECTIVE_PARTS = "objective_parts"
logger = logging.getLogger(__name__)

# objectives that read next-token logits: the only ones the chunked path changes
LOGIT_OBJECTIVES = ("ce", "kd")


@contextmanager
def without_objective_parts(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily detach the objectives' trainable parts (`model.objective_parts`, see
    `DistillTrainer._attach_objective_parts`) so that `save_pretrained` writes the student alone."""
    parts = model._modules.pop(OBJECTIVE_PARTS, None)
    try:
        yield model
    finally:
        if parts is not None:
            model._modules[OBJECTIVE_PARTS] = parts


class DistillTrainer(Trainer):
    # compute_loss returns losses normalised by the step's global token count: Trainer must not rescale them.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *rest, teacher: torch.nn.Module | None = None,
                 objectives: dict[str, tuple[Objective, float]] | None = None,
                 kd_vocab: int | None = None, chunking: dict | None = None,
                 topk_temperature: float | None = None, **kwargs):
        """chunking: {"mode": "auto" | "on" | "off", "chunk_size": int | "auto", "min_vocab": int} (see `resolve_chunking`;
        default off). topk_temperature: the batches carry a cached top-k teacher captured at this temperature
        (`kdistill cache`) instead of a live teacher; only `kd` can use it."""
        if not objectives:
            raise ValueError("DistillTrainer needs at least one objective")
        # LM objectives read a live teacher (or kd: a cached one); embedding objectives read teacher embeddings
        # computed beforehand.
        live = [n for n, (o, _) in objectives.items() if o.needs_teacher and o.task == "lm"]
        if topk_temperature is not None:
            needs_model = [n for n in live if objectives[n][0].type != "kd"]
            if needs_model and teacher is None:
                raise ValueError(f"objective(s) {', '.join(needs_model)} need a live teacher model; a top-k cache "
                                 "only serves kd")
        elif live and teacher is None:
            raise ValueError(f"objective(s) {', '.join(live)} need a teacher, but none was given")
        self._attach_objective_parts(model, objectives)
        super().__init__(model, args, *rest, **kwargs)
        self.objectives = objectives
        # hidden states cost memory: requested from student and teacher only when some objective reads them
        self.output_hidden_states = any(getattr(o, "needs_hidden_states", False) for o, _ in objectives.values())
        self.output_attentions = any(getattr(o, "needs_attentions", False) for o, _ in objectives.values())
        self.kd_vocab = kd_vocab
        self.topk_temperature = topk_temperature
        self.teacher = self._prepare_teacher(teacher) if teacher is not None else None
        config = self.accelerator.unwrap_model(self.model).config
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.chunk_size = self.resolve_chunking(chunking or {"mode": "off"})
        self._teacher_head: OutputHead | None = None
        self._terms: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0.0, 0]),
                                                           "eval": defaultdict(lambda: [0.0, 0])}
        self._window_start: int | None = None  # global step when the current logging window opened

    @staticmethod
    def _attach_objective_parts(model, objectives) -> None:
        """Objectives with trainable parts (projections) become submodules of the trained model, under
        `objective_parts.<objective name>.`, so the optimizer, data-parallel gradient averaging and checkpoints
        (hence resume) include them. Exports save the student alone: `Embedder.save` writes the encoder only, and
        `kdistill.models.save_student` drops the `objective_parts.` keys (`student_state_dict`) of an LM student,
        which stays a `PreTrainedModel` (or peft model, whose adapter export never includes them)."""
        parts = {name: obj for name, (obj, _) in objectives.items() if any(True for _ in obj.parameters())}
        if not parts:
            return
        setattr(model, OBJECTIVE_PARTS, torch.nn.ModuleDict(parts))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (internal calls) keep the objectives' parts so a resumed run continues with them; an export
        (`trainer.save_model(dir)`) writes the student alone."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        with without_objective_parts(self.accelerator.unwrap_model(self.model)):
            return super().save_model(output_dir, _internal_call=False)

    # ------------------------------------------------------------------------------------------------ teacher
    def _prepare_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        teacher.eval()
        teacher.requires_grad_(False)
        if getattr(teacher, "hf_device_map", None) is None:
            teacher.to(self.args.device)
        return teacher

    # ----------------------------------------------------------------------------------------- chunked losses
    def resolve_chunking(self, chunking: dict) -> int | str | None:
        """The chunk size the token objectives use (rows, or "auto": chosen per loss by
        `kdistill.losses.chunked.auto_chunk_size`), or None for dense logits.

        mode "off": dense. "on": chunked, or an error saying why it cannot be. "auto": chunked when an objective
        reads logits (ce, kd), the vocabulary has at least `min_vocab` entries, weights are not sharded
        (FSDP / DeepSpeed) and `chunking_problem` finds nothing for the student (and a live teacher); otherwise
        dense, with the reason logged."""
        mode = chunking.get("mode", "auto")
        if mode == "off":
            return None
        reason = None
        student = self.accelerator.unwrap_model(self.model)
        types = {o.type for o, _ in self.objectives.values()}
        live_teacher = "kd" in types and self.topk_temperature is None
        if not types & set(LOGIT_OBJECTIVES):
            reason = "no objective reads logits"
        elif self.is_fsdp_enabled or self.is_deepspeed_enabled:
            reason = "weights are sharded (FSDP / DeepSpeed): the output layer is not available whole"
        elif mode == "auto" and (self.kd_vocab or output_layer(student).weight.shape[0]) < chunking["min_vocab"]:
            reason = f"the vocabulary is smaller than chunked_loss.min_vocab={chunking['min_vocab']}"
        else:
            for role, model in (("student", student), ("teacher", self.teacher if live_teacher else None)):
                problem = None if model is None else chunking_problem(model, self.is_encoder_decoder)
                if problem:
                    reason = f"the {role}: {problem}"
                    break
        if reason is None:
            size = chunking.get("chunk_size", "auto")
            logger.info("token losses are chunked: %s positions at a time, no (tokens x V) logits",
                        "a working-set budget's worth of" if size == "auto" else size)
            return size
        if mode == "on":
            raise ValueError(f"chunked_loss.mode is 'on' but the chunked losses cannot be used: {reason}")
        logger.info("dense logits for the token losses (chunked_loss.mode=auto): %s", reason)
        return None

    def _head(self, model, role: str) -> OutputHead:
        if role == "student":
            layer = output_layer(model)
            return OutputHead(layer.weight, layer.bias)
        if self._teacher_head is None:  # frozen: copied once to the student's device if it lives elsewhere
            layer = output_layer(self.teacher)
            device = output_layer(model).weight.device
            bias = None if layer.bias is None else layer.bias.detach().to(device)
            self._teacher_head = OutputHead(layer.weight.detach().to(device), bias)
        return self._teacher_head

    # ------------------------------------------------------------------------------------ normalisation counts
    def _count_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Trained positions in a batch, after the causal shift (the first label never is a target)."""
        return shifted_targets(labels, self.is_encoder_decoder).ne(-100).sum()

    @staticmethod
    def _count_examples(batch: dict[str, Any]) -> int:
        for key in ("input_ids", "anchor_input_ids", "text_input_ids", "sentence1_input_ids"):
            if key in batch:
                return int(batch[key].shape[0])
        raise ValueError(f"cannot tell the batch size from keys {sorted(batch)}")

    @staticmethod
    def _views(batch: dict[str, Any]) -> list[str]:
        """Token views present in a batch: 'labels' -> '', 'rationale_labels' -> 'rationale'."""
        return sorted(k[: -len("labels")].rstrip("_") for k in batch if k.endswith("labels"))

    def _local_counts(self, batch: dict[str, Any]) -> tuple[dict[str, int], int]:
        tokens = {view: int(self._count_targets(batch[f"{view_prefix(view)}labels"])) for view in self._views(batch)}
        return tokens, self._count_examples(batch)

    def _position_counts(self, batch: dict[str, Any]) -> dict[str, dict[str, int]]:
        """view -> stack -> positions whose hidden states are compared (see `objectives.hidden_position_mask`);
        empty unless an objective reads hidden states."""
        from kdistill.objectives import hidden_position_mask

        if not (getattr(self, "output_hidden_states", False) or getattr(self, "output_attentions", False)):
            return {}
        stacks = ("encoder", "decoder") if self.is_encoder_decoder else ("decoder",)
        out = {}
        for view in self._views(batch):
            prefix = view_prefix(view)
            inputs = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
            out[view] = {stack: int(hidden_position_mask(inputs, stack, self.is_encoder_decoder).sum())
                         for stack in stacks}
        return out

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Global counts over the optimizer step's micro-batches and all processes:
        {"tokens": {view: trained tokens}, "examples": examples}."""
        if not batch_samples:
            return None
        views = self._views(batch_samples[0])
        position_keys = [(view, stack) for view, stacks in self._position_counts(batch_samples[0]).items()
                         for stack in stacks]
        n = len(views)
        totals = [0] * (n + len(position_keys) + 1)
        for batch in batch_samples:
            tokens, examples = self._local_counts(batch)
            for i, view in enumerate(views):
                totals[i] += tokens[view]
            positions = self._position_counts(batch)
            for i, (view, stack) in enumerate(position_keys):
                totals[n + i] += positions[view][stack]
            totals[-1] += examples
        counts = torch.tensor(totals, dtype=torch.long, device=device)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts.reshape(1, -1)).sum(0)
        out = {"tokens": dict(zip(views, counts[:n])), "examples": counts[-1]}
        if position_keys:
            out["positions"] = defaultdict(dict)
            for i, (view, stack) in enumerate(position_keys):
                out["positions"][view][stack] = counts[n + i]
            out["positions"] = dict(out["positions"])
        return out

    # ------------------------------------------------------------------------------------------- forward pass
    def _model_inputs(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        model_inputs = lm_model_inputs(model, inputs, self.is_encoder_decoder)
        if getattr(self, "output_hidden_states", False):
            model_inputs["output_hidden_states"] = True
        if getattr(self, "output_attentions", False):
            model_inputs["output_attentions"] = True
        return model_inputs

    def _align(self, logits: torch.Tensor, labels: torch.Tensor | None = None):
        return align_positions(logits, labels, self.is_encoder_decoder)

    def _lm_forward(self, model, inputs, need_teacher: bool, student: dict | None = None) -> dict[str, Any]:
        """Student forward (need_teacher=False) or teacher forward on the same inputs (need_teacher=True).

        Dense: {student,teacher}_logits (B, T, V). Chunked (`self.chunk_size`): the output layers are bypassed and
        {student,teacher}_hidden (B, T, H) come with {student,teacher}_head; `outputs.logits` then holds hidden
        states."""
        model_inputs = self._model_inputs(model, inputs)
        chunked = self.chunk_size is not None
        if not need_teacher:
            with output_layer_bypassed(model) if chunked else nullcontext():
                out = model(**model_inputs)
            aligned, targets = self._align(out.logits, inputs["labels"])
            if chunked:
                return {"student_outputs": out, "student_hidden": aligned, "targets": targets,
                        "student_head": self._head(model, "student")}
            return {"student_outputs": out, "student_logits": aligned, "targets": targets}
        if self.teacher is None:
            raise RuntimeError("an objective asked for a live teacher, but the run has no teacher model")
        device = next(self.teacher.parameters()).device
        target_device = student["targets"].device
        with torch.no_grad(), output_layer_bypassed(self.teacher) if chunked else nullcontext():
            out = self.teacher(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs.items()})
        aligned = self._align(out.logits).to(target_device)
        if chunked:
            return {"teacher_outputs": out, "teacher_hidden": aligned, "teacher_head": self._head(model, "teacher")}
        return {"teacher_outputs": out, "teacher_logits": aligned}

    def _batch(self, model, inputs, num_items_in_batch) -> DistillBatch:
        if num_items_in_batch is None:  # evaluation: normalise by this batch's own counts
            tokens, examples = self._local_counts(inputs)
            num_items_in_batch = {"tokens": tokens, "examples": examples, "positions": self._position_counts(inputs)}
        return DistillBatch(
            inputs, num_items_in_batch["tokens"], num_items_in_batch["examples"], kd_vocab=self.kd_vocab,
            num_positions=num_items_in_batch.get("positions"), chunk_size=self.chunk_size,
            topk_temperature=self.topk_temperature,
            lm_forward=lambda inp, need_teacher, student=None: self._lm_forward(model, inp, need_teacher, student),
            embed=lambda field: self._embed(model, inputs, field))

    def _embed(self, model, inputs, field: str) -> torch.Tensor:
        """(N, H) student representation of a text field: an Embedder's own embedding, or for an LM student the
        mean over real tokens of its last hidden states (T5: the encoder's)."""
        from kdistill.embedder import Embedder
        from kdistill.pooling import pool

        ids, mask = inputs[f"{field}_input_ids"], inputs[f"{field}_attention_mask"]
        if isinstance(self.accelerator.unwrap_model(model), Embedder):
            return model(input_ids=ids, attention_mask=mask)
        if self.is_encoder_decoder:
            base = self.accelerator.unwrap_model(model)
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            hidden = base.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                           use_cache=False).hidden_states[-1]
        return pool(hidden, mask, "mean")

    # ----------------------------------------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        batch = self._batch(model, inputs, num_items_in_batch)
        # Under data parallelism gradients are averaged over processes; each process's loss is its share of the
        # global sum / global count, so scale by the process count to make the average the global mean.
        scale = self.accelerator.num_processes if (mode == "train" and num_items_in_batch is not None) else 1
        total = None
        for name, (objective, weight) in self.objectives.items():
            loss, metrics = objective(batch)
            total = weight * loss if total is None else total + weight * loss
            self._record(mode, f"loss/{name}", loss.detach() * scale)
            for key, value in metrics.items():
                self._record(mode, f"{name}/{key}", value * scale)
        total = total * scale
        outputs = batch.student_outputs if return_outputs and "labels" in inputs else None
        return (total, outputs) if return_outputs else total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -------------------------------------------------------------------------------------------------- logs
    def _record(self, mode: str, key: str, value: float | torch.Tensor) -> None:
        """Accumulate a logged value. Training values are normalised by the step's global counts, so they add up over
        the micro-batches of an optimizer step and are divided by the optimizer steps since the last log; evaluation
        values (each batch normalised by its own count) are averaged per batch.

        Values may be 0-dim tensors: they are summed on the device and read once, at log time (no per-step sync).
        """
        if mode == "train" and self._window_start is None:
            self._window_start = self.state.global_step  # also right after resuming from a checkpoint
        slot = self._terms[mode][key]
        slot[0] += value
        slot[1] += 1

    def _flush(self, mode: str) -> dict[str, float]:
        terms = self._terms[mode]
        if not terms:
            return {}
        steps = max(self.state.global_step - (self._window_start or 0), 1)
        keys = sorted(terms)
        values = torch.tensor([float(terms[k][0]) / (steps if mode == "train" else max(terms[k][1], 1))
                               for k in keys],
                              dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        terms.clear()
        prefix = "eval_" if mode == "eval" else ""
        return {f"{prefix}{k}": round(v, 6) for k, v in zip(keys, values.tolist())}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **self._flush("train")}
            self._window_start = None
        elif any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self._flush("eval")}
        super().log(logs, *args, **kwargs)
