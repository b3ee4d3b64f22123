"""DeepSpeed ZeRO-3 (`distributed.strategy: deepspeed`): the stage-3 config, the frozen teacher as a second,
inference-only engine, the partitioned output layer gathered for the chunked losses, and the way back to an
ordinary model. DeepSpeed is imported lazily: it is an optional dependency, needed only by runs that ask for it.

* `import_problem`: why DeepSpeed cannot be imported, or None.
* `stage3_config`: the config a run uses (generated from the section, or the user's JSON file), with the values
  transformers fills in ("auto") left to it.
* `cpu_process_state`: processes with no accelerator (CPU, gloo) set up for the Trainer's DeepSpeed integration.
* `inference_engine`: a frozen model partitioned by its own engine, built with the student's stage-3 config without
  optimizer or scheduler; its forward gathers one module's weights at a time.
* `is_partitioned` / `gathered` / `whole`: a ZeRO-3 parameter is whole inside `gathered` on every process (no
  process modifies it), except that its own module's forward frees it again at its end: gathered after that
  forward, it stays whole through the backward that follows, and its gradient is reduce-scattered to the
  partitions as usual (the trainer's chunked losses rely on this; tested equal to dense logits).
* `unpartitioned_copy`: the trained student gathered, one parameter at a time, into an ordinary model on process 0.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from kdistill.models.sharding import rebuilt

__all__ = ["cpu_process_state", "gathered", "import_problem", "inference_engine", "is_partitioned", "stage3_config",
           "unpartitioned_copy", "whole"]

GENERATED = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": True},
}


def import_problem() -> str | None:
    """None when DeepSpeed can be imported; otherwise why not (one line)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # ImportError, or a broken build raising anything at import
        return f"{type(error).__name__}: {error}"
    return None


def stage3_config(path: str | None) -> dict[str, Any]:
    """The run's DeepSpeed config: the JSON file at `path`, or the generated stage-3 config. The trainer's export
    needs the gathered weights at save time, so `stage3_gather_16bit_weights_on_model_save` is switched on."""
    if path is None:
        return copy.deepcopy(GENERATED)
    config = json.loads(Path(path).read_text())
    config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def cpu_process_state():
    """accelerate's process state for DeepSpeed on CPU processes: transformers asks accelerate for a DeepSpeed
    state without a backend, which on a machine with no accelerator starts DeepSpeed's process group but counts
    one process; with the gloo backend named, every process counts. Pass `accelerator_config={"use_configured_state":
    True}` to TrainingArguments after this."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        return PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def _filled(config: dict[str, Any], hidden: int) -> dict[str, Any]:
    """`config` without optimizer and scheduler, the "auto" bucket sizes set for a model of width `hidden` as
    transformers sets them for the student, and any other "auto" value refused (the engine would not accept it)."""
    out = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("optimizer", "scheduler")}
    zero = out.setdefault("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    autos = [key for key, value in _flat(out) if value == "auto"]
    if autos:
        raise ValueError(f"DeepSpeed config: {', '.join(autos)} still 'auto' for the teacher engine")
    return out


def _flat(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def inference_engine(model: torch.nn.Module, config: dict[str, Any]):
    """`model` (frozen, eval mode) partitioned over all processes by an engine of its own with the student's
    stage-3 `config` (filled in by transformers) minus optimizer and scheduler. Calling `model` itself then
    gathers each module's weights for its forward and frees them after. Returns the engine (keep it alive)."""
    import deepspeed

    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model")
    engine, *_ = deepspeed.initialize(model=model, config=_filled(config, int(hidden)))
    model.eval()
    return engine


def is_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered(params: list[torch.nn.Parameter]):
    """The ZeRO-3 `params` whole on every process inside the context (read-only: no process modifies them);
    a null context for ordinary parameters."""
    params = [p for p in params if p is not None]
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@contextmanager
def whole(module: torch.nn.Module) -> Iterator[None]:
    """`module`'s own parameters (weight, bias) whole inside the context (see `gathered`)."""
    with gathered(list(module.parameters(recurse=False))):
        yield


def unpartitioned_copy(model: torch.nn.Module, skip_prefixes: tuple[str, ...] = ()) -> torch.nn.Module | None:
    """The ZeRO-3 `model` gathered into an ordinary model of its own class on the CPU of process 0 (None on the
    others); every process must call it (each parameter is gathered in turn: one whole parameter at a time)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with gathered([param]):
            if rank == 0 and not name.startswith(skip_prefixes):
                state[name] = param.detach().to("cpu", copy=True)
    if rank != 0:
        return None
    buffers = {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()
               if not name.startswith(skip_prefixes)}
    return rebuilt(type(model), model, state, buffers)
