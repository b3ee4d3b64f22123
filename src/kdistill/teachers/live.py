"""A live teacher: a frozen model run on the student's batch, once per token view and micro-batch."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from kdistill.models.heads import OutputHead, align_positions, lm_model_inputs, output_layer, output_layer_bypassed
from kdistill.models.sharding import full_weight, is_sharded, shard_for_inference
from kdistill.models.zero import inference_engine, is_partitioned, whole
from kdistill.teachers.base import DenseLogits, HiddenAndHead, TeacherQuery, TeacherSource

__all__ = ["LiveTeacher"]


class LiveTeacher(TeacherSource):
    """A teacher model in memory (eval mode, no grad), placed on the student's device unless it was loaded with
    a device map. Dense mode gives (B, T, V) logits; chunked mode runs it with the output layer bypassed and gives
    its final hidden states with the output layer (copied once to the student's device), so no (tokens x V)
    tensor is made. Hidden states / attention maps are requested only when an objective reads them.

    Sharded (`place(..., shard=...)`, FSDP2 training): every process holds 1/N of the weights, gathered one block
    at a time during the forward; the chunked losses' output layer is gathered whole once per query. The same
    with DeepSpeed ZeRO-3 (`place(..., zero=config)`): the teacher is a second, inference-only engine."""

    name = "live teacher model"
    provides = frozenset({"tokens", "hidden_states", "attentions"})

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.chunked = False
        self.extra_outputs: frozenset[str] = frozenset()
        self._head: OutputHead | None = None
        self.engine = None

    def place(self, device, shard: dict | None = None, zero: dict | None = None):
        """Eval mode, frozen, on `device`. shard: {"layer_classes": [...] | None} splits the weights over the
        processes of the default process group (`kdistill.models.sharding.shard_for_inference`). zero: the
        student's DeepSpeed stage-3 config: the teacher becomes an inference-only engine partitioned with it
        (`kdistill.models.zero.inference_engine`; no optimizer)."""
        self.model.eval()
        self.model.requires_grad_(False)
        if (shard is not None or zero is not None) and getattr(self.model, "hf_device_map", None) is not None:
            raise ValueError("a teacher loaded with a device_map cannot also be sharded: drop teacher.device_map "
                             "or set distributed.shard_teacher: false")
        if zero is not None and not is_partitioned(self.model):
            self.engine = inference_engine(self.model.to(device), zero)
        elif shard is not None and not is_sharded(self.model):
            shard_for_inference(self.model, device, shard.get("layer_classes"))
        elif getattr(self.model, "hf_device_map", None) is None:
            self.model.to(device)

    def setup(self, *, encoder_decoder, chunked, outputs=frozenset()):
        self.encoder_decoder = encoder_decoder
        self.chunked = chunked
        self.extra_outputs = frozenset(outputs)
        self._head = None

    def head(self, device: torch.device) -> OutputHead:
        """The output layer as tensors on `device` (frozen: copied once; sharded: gathered on every call)."""
        if is_partitioned(self.model):
            layer = output_layer(self.model)
            with torch.no_grad(), whole(layer):
                bias = None if layer.bias is None else layer.bias.detach().to(device, copy=True)
                return OutputHead(layer.weight.detach().to(device, copy=True), bias)
        if is_sharded(self.model):
            layer = output_layer(self.model)
            with torch.no_grad():
                bias = None if layer.bias is None else full_weight(layer.bias).to(device)
                return OutputHead(full_weight(layer.weight).to(device), bias)
        if self._head is None or self._head.weight.device != device:
            layer = output_layer(self.model)
            bias = None if layer.bias is None else layer.bias.detach().to(device)
            self._head = OutputHead(layer.weight.detach().to(device), bias)
        return self._head

    def _forward(self, query: TeacherQuery):
        inputs = lm_model_inputs(self.model, query.tokens.tensors(), self.encoder_decoder)
        for name in self.extra_outputs:
            inputs[f"output_{name}"] = True
        device = next(self.model.parameters()).device
        with torch.no_grad(), output_layer_bypassed(self.model) if self.chunked else nullcontext():
            out = self.model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
        return out, align_positions(out.logits, None, self.encoder_decoder).to(query.tokens.labels.device)

    def run(self, query: TeacherQuery):
        """(model output, positions-aligned logits or hidden states), computed once per query."""
        return query.once("live_teacher", lambda: self._forward(query))

    def tokens(self, query):
        _, aligned = self.run(query)
        if self.chunked:
            return HiddenAndHead(aligned, query.once("live_teacher_head", lambda: self.head(aligned.device)))
        return DenseLogits(aligned)

    def outputs(self, query):
        return self.run(query)[0]
