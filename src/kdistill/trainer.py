"""DistillTrainer: the one trainer. total loss = sum_i weight_i * objective_i(batch).

It is a `transformers.Trainer`, so TrainingArguments, `accelerate launch`, DeepSpeed/FSDP configs, callbacks,
checkpoints/resume and `report_to` (wandb, tensorboard) work as users know them. What it adds:

* a teacher *source* (`kdistill.teachers`: a live model, the top-k cache, precomputed embeddings), checked before
  training to give what every objective asks of it;
* the batch parsed once into its typed form (`kdistill.batch.Batch`), one student forward pass per token view and
  micro-batch, positions aligned by the one causal shift of `kdistill.models.heads`;
* global normalisation: every objective divides by the number of trained tokens in the whole optimizer step
  (all gradient-accumulation micro-batches, all processes), so 2 x B/2 accumulation equals 1 x B and two
  processes equal one process on the same global batch;
* on-policy distillation (`on_policy`, `kdistill.onpolicy`): an optimizer step's micro-batches are fetched, their
  answers sampled (student or, with seq_kd, teacher) and only then counted, so objectives divide by the step's
  generated tokens;
* every term and metric logged separately (`loss/ce`, `loss/kd`, `kd/top1_agreement`, ...), each averaged over the
  optimizer steps that produced it;
* chunked token losses for large vocabularies (`chunk_size`): the student (and a live teacher) run with their
  output layer bypassed, so their forward returns the final hidden states, and `ce`/`kd` project them to the
  vocabulary a chunk of positions at a time (`kdistill.losses.chunked`): no (tokens x V) logits, forward or
  backward. `resolve_chunking` decides, and checks on a probe input that the model's logits really are
  `hidden @ W.T + b` (soft-capping, logit scales or a LoRA-wrapped lm_head make it fall back to dense logits);
* FSDP2 sharding (`distributed.strategy: fsdp`, TrainingArguments' fsdp_config): the student is sharded by
  accelerate's FSDP plugin (enabled here on CPU too, where accelerate would silently train data parallel), a live
  teacher by `kdistill.models.sharding.shard_for_inference`; the chunked losses keep working: the student's root
  unit (embeddings, output layer) stays gathered from forward to backward, so the output layer is gathered once
  per forward and its gradient is reduce-scattered by FSDP.
* DeepSpeed ZeRO-3 (`distributed.strategy: deepspeed`, TrainingArguments' deepspeed): the student through the
  Trainer's DeepSpeed integration, a live teacher as a second, inference-only engine with the same stage-3 config;
  chunked losses gather the student's partitioned output layer once per forward, after it, and hold it whole until
  that micro-batch's backward has reduce-scattered its gradient (`_holding`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Iterator

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import OffloadPolicy
from transformers import Trainer

from kdistill.batch import Batch, Counts, TextField, TokenView
from kdistill.embedder import Embedder
from kdistill.models.heads import (OutputHead, align_positions, base_model, chunking_problem, lm_model_inputs,
                                   output_layer, output_layer_bypassed)
from kdistill.models.sharding import shard_model
from kdistill.models.zero import gathered, is_partitioned
from kdistill.objectives import Objective, StepBatch
from kdistill.onpolicy import OnPolicy
from kdistill.pooling import pool
from kdistill.teachers.base import TeacherSource
from kdistill.teachers.live import LiveTeacher


OBJECTIVE_PARTS = "objective_parts"
logger = logging.getLogger(__name__)

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

    def __init__(self, model=None, args=None, *rest, teacher: TeacherSource | torch.nn.Module | None = None,
                 objectives: dict[str, tuple[Objective, float]] | None = None,
                 kd_vocab: int | None = None, chunking: dict | None = None, on_policy: OnPolicy | None = None,
                 shard_teacher: dict | None = None, **kwargs):
        """teacher: a `kdistill.teachers` source, or a model (then a `LiveTeacher`). chunking: {"mode": "auto" |
        "on" | "off", "chunk_size": int | "auto", "min_vocab": int} (see `resolve_chunking`; default off).
        on_policy: samples the answers of on-policy steps (`kdistill.onpolicy.OnPolicy`), or None.
        shard_teacher: {"layer_classes": [...] | None}: under FSDP, a live teacher is sharded over the processes
        too (`LiveTeacher.place`); under DeepSpeed ZeRO-3 it becomes an inference-only engine with the student's
        stage-3 config; ignored otherwise."""
        if not objectives:
            raise ValueError("DistillTrainer needs at least one objective")
        if isinstance(teacher, torch.nn.Module):
            teacher = LiveTeacher(teacher)
        needs = {name: o.teacher_needs for name, (o, _) in objectives.items() if o.teacher_needs}
        if needs and teacher is None:
            raise ValueError(f"objective(s) {', '.join(needs)} need a teacher, but none was given")
        if teacher is not None:
            teacher.check_covers(needs)
        self._attach_objective_parts(model, objectives)
        super().__init__(model, args, *rest, **kwargs)
        self.objectives = objectives
        # hidden states and attention maps cost memory: requested only when some objective reads them
        self.model_outputs = frozenset().union(*(o.model_outputs for o, _ in objectives.values()))
        self.kd_vocab = kd_vocab
        self.teacher = teacher
        self.on_policy = on_policy
        config = self.accelerator.unwrap_model(self.model).config
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        fsdp2 = self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2
        if fsdp2:
            self._shard_student()
        self._held: ExitStack | None = None  # the student's gathered output layer (ZeRO-3, chunked losses)
        self._held_whole = False
        if isinstance(teacher, LiveTeacher) and fsdp2 and shard_teacher is not None:
            teacher.place(self.args.device, shard=shard_teacher)
        elif isinstance(teacher, LiveTeacher) and self.is_deepspeed_enabled and shard_teacher is not None:
            teacher.place(self.args.device, zero=self.accelerator.state.deepspeed_plugin.deepspeed_config)
        elif teacher is not None:
            teacher.place(self.args.device)
        self.chunk_size = self.resolve_chunking(chunking or {"mode": "off"})
        if teacher is not None:
            teacher.setup(encoder_decoder=self.is_encoder_decoder, chunked=self.chunk_size is not None,
                          outputs=self.model_outputs)
        # key -> [sum, calls, optimizer steps that recorded it]
        self._terms: dict[str, dict[str, list]] = {"train": defaultdict(lambda: [0.0, 0, set()]),
                                                   "eval": defaultdict(lambda: [0.0, 0, set()])}

    def create_accelerator_and_postprocess(self) -> None:
        """As the Trainer does, and FSDP on CPU: accelerate enables its FSDP plugin only for accelerator devices and
        on CPU processes (gloo) would quietly train data parallel instead; FSDP2 itself runs there, so the plugin
        is switched on (a logged, deliberate deviation from accelerate, used by the CPU tests and benchmarks)."""
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if (self.args.fsdp_plugin_args is not None and getattr(state, "fsdp_plugin", None) is None
                and state.distributed_type == DistributedType.MULTI_CPU):
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if state.mixed_precision != "no":
                state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True
            logger.info("FSDP2 on CPU processes (gloo): accelerate's FSDP plugin enabled by kdistill")

    def _shard_student(self) -> None:
        """FSDP2: shard the student here, with the plugin's settings, before accelerate's `prepare` would (it takes
        an already sharded model as it is). Its root unit (embeddings, output layer) stays gathered from forward to
        backward: the chunked losses read the whole output layer after the forward, and FSDP reduce-scatters its
        gradient (`kdistill.models.sharding.shard_model`)."""
        plugin = self.accelerator.state.fsdp_plugin
        names = plugin.transformer_cls_names_to_wrap
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        offload = plugin.cpu_offload if isinstance(plugin.cpu_offload, OffloadPolicy) else None
        shard_model(self.model, self.args.device, names, reshard_after_forward=bool(plugin.reshard_after_forward),
                    root_reshard_after_forward=False, mp_policy=plugin.mixed_precision_policy,
                    offload_policy=offload)

    @staticmethod
    def _attach_objective_parts(model, objectives) -> None:
        """Objectives with trainable parts (projections) become submodules of the trained model, under
        `objective_parts.<objective name>.`, so the optimizer, data-parallel gradient averaging and checkpoints
        (hence resume) include them. Exports save the student alone: `Embedder.save` writes the encoder only, and
        an LM student is saved inside `without_objective_parts` (the run's save, and `save_model` below); a peft
        adapter export never includes them."""
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

    # ----------------------------------------------------------------------------------------- chunked losses
    def resolve_chunking(self, chunking: dict) -> int | str | None:
        """The chunk size the token objectives use (rows, or "auto": chosen per loss by
        `kdistill.losses.chunked.auto_chunk_size`), or None for dense logits.

        mode "off": dense. "on": chunked, or an error saying why it cannot be. "auto": chunked when an objective
        reads logits (ce, kd), the vocabulary has at least `min_vocab` entries and `chunking_problem` finds nothing
        for the student (and a live teacher model whose logits an objective reads); otherwise dense, with the reason
        logged. FSDP2 is no reason for dense logits (see `_shard_student`), nor is ZeRO-3 (see `_holding`); the
        probe then runs on the sharded models, on every process."""
        mode = chunking.get("mode", "auto")
        if mode == "off":
            return None
        reason = None
        student = self.accelerator.unwrap_model(self.model)
        objectives = [o for o, _ in self.objectives.values()]
        teacher_model = self.teacher.model if self.teacher is not None and any(
            "tokens" in o.teacher_needs for o in objectives) else None
        if not any(o.reads_logits for o in objectives):
            reason = "no objective reads logits"
        elif self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version != 2:
            reason = "FSDP1 flattens the weights: the output layer is not available whole (use FSDP2)"
        elif mode == "auto" and (self.kd_vocab or output_layer(student).out_features) < chunking["min_vocab"]:
            reason = f"the vocabulary is smaller than chunked_loss.min_vocab={chunking['min_vocab']}"
        else:
            for role, model in (("student", student), ("teacher", teacher_model)):
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

    # ------------------------------------------------------------------------------------ normalisation counts
    def _stacks(self) -> tuple[str, ...]:
        """Layer stacks whose hidden-state positions are counted (none unless an objective aligns layers)."""
        if not self.model_outputs:
            return ()
        return ("encoder", "decoder") if self.is_encoder_decoder else ("decoder",)

    def _local_counts(self, batch: Batch) -> Counts:
        return batch.counts(self.is_encoder_decoder, self._stacks())

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """An optimizer step's micro-batches (on-policy steps: their sampled answers) and their global counts.

        None when the run already reached max_steps: resuming from a checkpoint written at the last step (a run
        killed before its export) would otherwise train one step more than max_steps (transformers 5.24's loop
        fetches a step before it checks the count); the step is not taken and training stops."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return [], None
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.on_policy is not None and batches:
            teacher = self.teacher.model if self.teacher is not None else None
            batches, logged = self.on_policy.prepare(batches, self.state.global_step,
                                                     self.accelerator.unwrap_model(self.model), teacher,
                                                     synced=self.args.world_size > 1)
            for key, value in logged.items():
                self._record("train", key, value)
        return batches, self._get_num_items_in_batch(batches, device)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Counts | None:
        """Global counts over the optimizer step's micro-batches and all processes (0-dim tensors)."""
        if not batch_samples:
            return None
        counts = [self._local_counts(Batch.parse(b)) for b in batch_samples]
        views = sorted(counts[0].tokens)
        positions = [(view, stack) for view, stacks in counts[0].positions.items() for stack in stacks]
        totals = torch.tensor([[c.tokens[v] for v in views] + [c.positions[v][s] for v, s in positions] + [c.examples]
                               for c in counts], dtype=torch.long, device=device).sum(0)
        if self.args.world_size > 1:
            totals = self.accelerator.gather(totals.reshape(1, -1)).sum(0)
        n = len(views)
        out = Counts(tokens=dict(zip(views, totals[:n])), examples=totals[-1])
        for i, (view, stack) in enumerate(positions):
            out.positions.setdefault(view, {})[stack] = totals[n + i]
        return out

    # ------------------------------------------------------------------------------------------- forward pass
    def _student_forward(self, model, tokens: TokenView) -> dict[str, Any]:
        """The student on one token view: {"outputs", "aligned": (B, T, V) logits or, chunked, (B, T, H) final
        hidden states, "head" (chunked)}; positions aligned by `align_positions`."""
        inputs = lm_model_inputs(model, tokens.tensors(), self.is_encoder_decoder)
        for name in self.model_outputs:
            inputs[f"output_{name}"] = True
        chunked = self.chunk_size is not None
        with output_layer_bypassed(model) if chunked else nullcontext():
            out = model(**inputs)
        result = {"outputs": out, "aligned": align_positions(out.logits, None, self.is_encoder_decoder)}
        if chunked:
            layer = output_layer(model)
            if self._held is not None and not self._held_whole and is_partitioned(layer):
                self._held.enter_context(gathered(list(layer.parameters())))  # ZeRO-3: whole until the backward
                self._held_whole = True
            result["head"] = OutputHead(layer.weight, layer.bias)
        return result

    @contextmanager
    def _holding(self) -> Iterator[None]:
        """ZeRO-3 and chunked losses: the student's output layer, gathered by `_student_forward` after its forward
        (a module's own forward frees it again), stays whole through the backward, which reduce-scatters its
        gradient to the partitions; it is partitioned again when the micro-batch's step ends."""
        if not (self.is_deepspeed_enabled and self.chunk_size is not None):
            yield
            return
        with ExitStack() as stack:
            self._held, self._held_whole = stack, False
            try:
                yield
            finally:
                self._held = None

    def training_step(self, *args, **kwargs):
        with self._holding():
            return super().training_step(*args, **kwargs)

    def _embed(self, model, text: TextField) -> torch.Tensor:
        """(N, H) student representation of a text field: an Embedder's own embedding, or for an LM student the
        mean over real tokens of its last hidden states (T5: the encoder's)."""
        ids, mask = text.input_ids, text.attention_mask
        if isinstance(self.accelerator.unwrap_model(model), Embedder):
            return model(input_ids=ids, attention_mask=mask)
        if self.is_encoder_decoder:
            hidden = base_model(model).get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                           use_cache=False).hidden_states[-1]
        return pool(hidden, mask, "mean")

    def step_batch(self, model, inputs, num_items_in_batch: Counts | None = None) -> StepBatch:
        """The micro-batch as objectives see it; without step counts (evaluation), its own counts."""
        batch = Batch.parse(inputs)
        counts = num_items_in_batch if num_items_in_batch is not None else self._local_counts(batch)
        return StepBatch(batch, counts, teacher=self.teacher, encoder_decoder=self.is_encoder_decoder,
                         kd_vocab=self.kd_vocab, chunk_size=self.chunk_size,
                         policy=self.on_policy.cfg if self.on_policy is not None else None,
                         student_forward=lambda tokens: self._student_forward(model, tokens),
                         embed=lambda text: self._embed(model, text))

    # ----------------------------------------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        batch = self.step_batch(model, inputs, num_items_in_batch)
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
        outputs = batch.student_outputs if return_outputs and "" in batch.batch.views else None
        return (total, outputs) if return_outputs else total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), self._holding():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -------------------------------------------------------------------------------------------------- logs
    def _record(self, mode: str, key: str, value: float | torch.Tensor) -> None:
        """Accumulate a logged value. Training values are normalised by the step's global counts, so they add up over
        the micro-batches of an optimizer step and are divided by the optimizer steps since the last log that
        recorded them (a value only on-policy steps give is their mean); evaluation values (each batch normalised by
        its own count) are averaged per batch.

        Values may be 0-dim tensors: they are summed on the device and read once, at log time (no per-step sync).
        """
        slot = self._terms[mode][key]
        slot[0] += value
        slot[1] += 1
        slot[2].add(self.state.global_step)

    def _flush(self, mode: str) -> dict[str, float]:
        terms = self._terms[mode]
        if not terms:
            return {}
        keys = sorted(terms)
        values = torch.tensor([float(terms[k][0]) / max(len(terms[k][2]) if mode == "train" else terms[k][1], 1)
                               for k in keys],
                              dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        terms.clear()
        prefix = "eval_" if mode == "eval" else ""
        out = {f"{prefix}{k}": round(v, 6) for k, v in zip(keys, values.tolist())}
        if mode == "train" and self.on_policy is not None:
            out["on_policy/fraction"] = round(self.on_policy.fraction(self.state.global_step), 6)
        return out

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **self._flush("train")}
        elif any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self._flush("eval")}
        super().log(logs, *args, **kwargs)
