"""FSDP2 sharding (`torch.distributed.fsdp.fully_shard`) of the models kdistill runs, and the way back.

* `shard_for_inference`: a frozen teacher split over the processes, one shard unit per transformer block plus the
  root (embeddings, final norm, output layer); every unit frees its gathered weights after its forward, so a
  process holds its 1/N of the teacher plus one block at a time.
* `shard_model`: the trained student, one unit per block plus the root (embeddings, final norm, output layer, one
  group even when tied), which stays gathered from its forward until backward: the chunked losses read the whole
  output layer after the bypassed forward (gathered once per forward, never per chunk) and FSDP's post-backward
  reduce-scatters its gradient to the shards.
* `full_weight`: a sharded tensor gathered whole (a teacher's output layer, no gradient).
* `unsharded_copy`: the trained student gathered into an ordinary model on process 0 (export, evaluation).

`kdistill.trainer` shards the student with `shard_model` before accelerate's FSDP plugin would (accelerate then
takes the sharded model as it is): the same layout on every accelerate version, and tied T5 embeddings work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

__all__ = ["full_weight", "is_sharded", "layer_classes", "rebuilt", "shard_for_inference", "shard_model",
           "unsharded_copy"]


def layer_classes(model: torch.nn.Module, names: list[str] | None = None) -> tuple[type, ...]:
    """The module classes of `model` that become one shard unit each: those named, or the model's own
    `_no_split_modules` (its transformer block: Qwen2DecoderLayer, T5Block, ...)."""
    wanted = set(names or getattr(model, "_no_split_modules", None) or ())
    return tuple(sorted({type(m) for m in model.modules() if type(m).__name__ in wanted}, key=lambda c: c.__name__))


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, device: torch.device, names: list[str] | None = None, *,
                reshard_after_forward: bool = True, root_reshard_after_forward: bool = True,
                mp_policy: MixedPrecisionPolicy | None = None, offload_policy: OffloadPolicy | None = None
                ) -> torch.nn.Module:
    """Shard `model` over all processes (the default process group) with FSDP2: each block of the classes `names`
    (default `_no_split_modules`) is one unit, everything else (embeddings, final norm, output layer: tied or not,
    one group) the root unit. The shards move to `device`. In place; returns the model.

    reshard_after_forward: the blocks free their gathered weights after their forward. root_reshard_after_forward:
    the same for the root; False keeps it gathered until backward (a trained student: the chunked losses read the
    output layer after the forward, and the backward needs it again)."""
    classes = layer_classes(model, names)
    if not classes:
        raise ValueError(f"{type(model).__name__}: no module of the classes {names or '_no_split_modules'} to shard "
                         "(set distributed.layer_classes)")
    kwargs = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),)),
              "mp_policy": mp_policy or MixedPrecisionPolicy(), "offload_policy": offload_policy or OffloadPolicy()}
    for module in list(model.modules()):
        if isinstance(module, classes) and not isinstance(module, FSDPModule):
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=root_reshard_after_forward, **kwargs)
    return model


def shard_for_inference(model: torch.nn.Module, device: torch.device, names: list[str] | None = None
                        ) -> torch.nn.Module:
    """A frozen model sharded for forward passes only (a teacher): no gradients, every unit (root included) frees
    its gathered weights after its forward, so a process holds 1/N of it plus one unit at a time."""
    model.requires_grad_(False)
    return shard_model(model, device, names, reshard_after_forward=True, root_reshard_after_forward=True)


def full_weight(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: a sharded (DTensor) parameter is all-gathered; a plain tensor is returned as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def unsharded_copy(model: torch.nn.Module, skip_prefixes: tuple[str, ...] = ()) -> torch.nn.Module | None:
    """The sharded `model` gathered into an ordinary (unsharded) model of its own class, on the CPU of process 0;
    None on the other processes. Every process must call it (the gather is collective). Parameters whose names
    start with one of `skip_prefixes` (parts that are not the model's own) are left out."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    cls = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    return rebuilt(cls, model, {k: v for k, v in state.items() if not k.startswith(skip_prefixes)})


def rebuilt(cls: type, model: torch.nn.Module, state: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """An ordinary `cls(model.config)` holding the gathered `state` (tied weights may be absent) and those of
    `buffers` it keeps in its state dict (persistent ones), in the state's dtype, in eval mode, with `model`'s
    generation config."""
    dtype = next(iter(state.values())).dtype
    copy = cls(model.config)
    kept = copy.state_dict().keys()
    state = {**state, **{k: v for k, v in (buffers or {}).items() if k in kept}}
    missing, unexpected = copy.load_state_dict(state, strict=False)
    tied = set(getattr(copy, "all_tied_weights_keys", None) or getattr(copy, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered state dict does not fit {cls.__name__}: missing {missing}, unexpected "
                           f"{unexpected}")
    if getattr(model, "generation_config", None) is not None:
        copy.generation_config = model.generation_config
    return copy.to(dtype).eval()
