"""Shrinking a model to a subset of its transformer layers (a student built from its teacher's layers)."""

from __future__ import annotations

import copy

import torch

_LAYER_LIST_NAMES = ("layer", "layers", "block", "h")


def _layer_lists(model) -> dict[str, torch.nn.ModuleList]:
    """name -> ModuleList of transformer layers (one for encoders/decoders, two for T5: encoder and decoder)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES and len(module):
            # outermost lists only: a T5 block holds its own `layer` list (attention, feed-forward)
            if not any(name.startswith(prev + ".") for prev in found):
                found[name] = module
    return found


def shrink(model, layers: list[int], decoder_layers: list[int] | None = None):
    """A copy of `model` keeping only the given layer indices (in order), e.g. [0, 2, 4] of 6.

    Works for BERT-like encoders (`encoder.layer`), Qwen/Llama-like decoders (`layers`) and T5 (`layers` picks
    encoder blocks, `decoder_layers` decoder blocks, default the same indices). The config's layer counts (and
    per-layer lists such as `layer_types`) are updated, attention layers are renumbered for the KV cache, and
    T5's relative position bias, which only the first block owns, is moved to the new first block.
    """
    lists = _layer_lists(model)
    if not lists:
        raise ValueError(f"shrink: no transformer layer list found in {type(model).__name__}")
    model = copy.deepcopy(model)
    lists = _layer_lists(model)
    config = model.config
    is_t5 = getattr(config, "is_encoder_decoder", False)
    plan: dict[str, list[int]] = {}
    for name, module in lists.items():
        stack = name.split(".")[-2] if "." in name else ""
        keep = decoder_layers if (is_t5 and stack == "decoder" and decoder_layers is not None) else layers
        n = len(module)
        if not keep:
            raise ValueError("shrink: keep at least one layer")
        bad = [i for i in keep if not -n <= i < n]
        if bad:
            raise ValueError(f"shrink: layer(s) {bad} out of range for {name} with {n} layers")
        keep = [i % n for i in keep]
        if len(set(keep)) != len(keep):
            raise ValueError(f"shrink: duplicate layers in {keep}")
        plan[name] = keep
    for name, keep in plan.items():
        module = lists[name]
        old = list(module)
        new = torch.nn.ModuleList(old[i] for i in keep)
        if is_t5 and keep[0] != 0:
            first_attention = new[0].layer[0].SelfAttention
            first_attention.relative_attention_bias = old[0].layer[0].SelfAttention.relative_attention_bias
            first_attention.has_relative_attention_bias = True
        for new_index, layer in enumerate(new):
            for sub in layer.modules():
                if hasattr(sub, "layer_idx") and isinstance(sub.layer_idx, int):
                    sub.layer_idx = new_index
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
        stack_config = getattr(parent, "config", None)
        if is_t5 and stack_config is not None and stack_config is not config:
            stack_config.num_layers = len(keep)
    first = next(iter(plan.values()))
    if is_t5:
        enc = next(v for k, v in plan.items() if k.startswith("encoder"))
        dec = next(v for k, v in plan.items() if k.startswith("decoder"))
        config.num_layers, config.num_decoder_layers = len(enc), len(dec)
    else:
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, attr) and isinstance(getattr(config, attr), int):
                setattr(config, attr, len(first))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and layer_types:
            config.layer_types = [layer_types[i] for i in first]
    return model
