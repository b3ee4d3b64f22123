"""Output heads and positions: the output layer as tensors, running a model with it bypassed, and THE causal
shift (position i of a causal LM predicts label i + 1) that training, caching and evaluation all use."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from kdistill.models.sharding import full_weight
from kdistill.models.zero import whole


@dataclass
class OutputHead:
    """A model's output layer as tensors: logits = hidden @ weight.T (+ bias)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def base_model(model):
    """The transformers model under DDP / peft wrappers."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_layer(model) -> torch.nn.Module:
    return base_model(model).get_output_embeddings()


@contextmanager
def output_layer_bypassed(model) -> Iterator[None]:
    """Run `model` with its output layer replaced by the identity: `outputs.logits` then holds the final hidden
    states (after anything the model applies before its lm_head, e.g. T5's d_model**-0.5 rescale of tied
    embeddings). The forward still goes through `model` itself, so DDP and peft wrappers keep working."""
    head = output_layer(model)
    saved = head.__dict__.get("forward")  # accelerate hooks live here: restore, never delete them
    head.forward = _identity
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def align_positions(logits: torch.Tensor, labels: torch.Tensor | None, encoder_decoder: bool):
    """The one place positions are aligned: for causal LMs logits[:, i] predicts labels[:, i + 1] (the last
    position predicts nothing, the first label is never a target); encoder-decoder logits predict their labels."""
    if encoder_decoder:
        return logits if labels is None else (logits, labels)
    logits = logits[:, :-1]
    return logits if labels is None else (logits, shifted_targets(labels, encoder_decoder))


def shifted_targets(labels: torch.Tensor, encoder_decoder: bool) -> torch.Tensor:
    """The targets of `align_positions`' logits: labels without the first (causal LMs), over the last dim."""
    return labels if encoder_decoder else labels[..., 1:]


def lm_model_inputs(model, inputs: dict[str, Any], encoder_decoder: bool) -> dict[str, Any]:
    """The forward arguments of an LM batch (T5: decoder inputs are the labels shifted right)."""
    out = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "decoder_input_ids",
                                                     "decoder_attention_mask")}
    if encoder_decoder and "decoder_input_ids" not in out:
        out["decoder_input_ids"] = base_model(model).prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    out["use_cache"] = False
    return out


def chunking_problem(model, encoder_decoder: bool) -> str | None:
    """Why the chunked losses cannot stand in for this model's logits, or None when they can.

    The output layer must be a plain `nn.Linear`, and the logits of a probe input must equal
    `hidden @ W.T + b` of the bypassed forward (this catches soft-capping, logit scales and any other step after
    the lm_head)."""
    head = output_layer(model)
    if type(head) is not torch.nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain torch.nn.Linear (e.g. LoRA on lm_head)"
    device = head.weight.device
    ids = (torch.arange(1, 9, device=device) % head.out_features).reshape(1, -1)
    inputs = {"input_ids": ids, "use_cache": False}
    if encoder_decoder:
        inputs["decoder_input_ids"] = ids
    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            with output_layer_bypassed(model):
                hidden = model(**inputs).logits
    finally:
        model.train(was_training)
    with whole(head):  # a sharded model (FSDP, ZeRO-3) runs the probe on every process
        weight = full_weight(head.weight.detach()).clone()
        bias = None if head.bias is None else full_weight(head.bias.detach()).clone()
    if hidden.shape[-1] != weight.shape[1]:
        return "its forward changes the output layer's input or output (not hidden @ W.T + b)"
    expected = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    tolerance = 1e-3 * float(expected.abs().max().clamp(min=1.0))
    if logits.shape != expected.shape or not torch.allclose(logits.float(), expected, rtol=1e-3, atol=tolerance):
        return ("its logits are not hidden @ lm_head.weight.T (+ bias): the forward transforms them after the "
                "output layer (e.g. final_logit_softcapping or a logit_scale)")
    return None
