"""Sharded training with torch FSDP2 (`fully_shard`) when accelerate is launched with an FSDP config.

accelerate 1.x forms the process group on CPU (gloo) but applies its FSDP plugin only on GPUs, so vpgtrans
shards the model itself: every transformers layer (frozen LLM and vision layers, LoRA inside them) is one
unit, the VPG + projector another, the rest the root. Checkpoints gather full tensors on every rank, so a
sharded run writes the same files as a single-process one and can be resumed with any number of processes.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


def fsdp_requested(num_processes: int) -> bool:
    """True when launched by `accelerate launch` with an FSDP config and more than one process."""
    return num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def shard(module: nn.Module, device: torch.device) -> int:
    """`fully_shard` the model in units (see module docstring); returns how many units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in module.modules()):
        from ..errors import ConfigError

        raise ConfigError("the model is already sharded by an earlier training stage",
                          "under FSDP train one stage per launch (`vpgtrans train`); `vpgtrans transfer` runs "
                          "without FSDP")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    trainable = [getattr(module, name) for name in ("vpg", "projector") if hasattr(module, name)]
    if trainable:
        fully_shard(trainable, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return len(units) + bool(trainable) + 1


def regroup(module: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimizer groups again, pointing at the sharded parameters (fully_shard replaces them)."""
    named = dict(module.named_parameters())
    return [{**g, "params": [named[n] for n in g["names"]]} for g in groups]


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_views(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """Stand-ins for (module, optimizer) whose state dicts hold full tensors (a collective: every rank calls it)."""
    weights = {k: _full(v) for k, v in module.trainable_state_dict().items()}
    sd = optimizer.state_dict()
    state = {pid: {k: _full(v) for k, v in entry.items()} for pid, entry in sd["state"].items()}
    full_sd = {"state": state, "param_groups": sd["param_groups"]}
    return SimpleNamespace(trainable_state_dict=lambda: weights), SimpleNamespace(state_dict=lambda: full_sd)


class Loader:
    """Stand-ins for `load_checkpoint` that receive full tensors, then `apply` them to the sharded model."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer
        self.weights = {k: _full(v).clone() for k, v in module.trainable_state_dict().items()}
        self.optimizer_state: dict[str, Any] | None = None
        self.view = SimpleNamespace(trainable_state_dict=lambda: self.weights, named_parameters=lambda: iter(()),
                                    named_buffers=lambda: iter(()))
        self.opt_view = SimpleNamespace(load_state_dict=self._keep)

    def _keep(self, sd: dict[str, Any]) -> None:
        self.optimizer_state = sd

    def apply(self) -> None:
        """Copy the loaded full weights and optimizer state into the local shards."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        targets = dict(self.module.named_parameters())
        targets.update(dict(self.module.named_buffers()))
        with torch.no_grad():
            for name, value in self.weights.items():
                target = targets[name]
                if isinstance(target, DTensor):
                    value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
                    target.to_local().copy_(value.to_local())
                else:
                    target.copy_(value)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sd = self.optimizer_state
        for pid, entry in sd["state"].items():
            p = params[int(pid)]
            for key, value in list(entry.items()):
                if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                    entry[key] = distribute_tensor(value, p.device_mesh, p.placements)
        self.optimizer.load_state_dict(sd)


def unshard_for_good(module: nn.Module) -> None:
    """Turn the sharded model back into a plain one with full tensors (a collective), for saving the final
    model and for a next training stage (`vpgtrans transfer`), which shards it afresh."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
    from torch.distributed.tensor import DTensor

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if isinstance(p, DTensor):
                sub._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
    # torch has no public inverse of fully_shard: drop its hooks and state, and restore each module's class.
    for sub in module.modules():
        state = _get_module_fsdp_state(sub)
        if state is not None:
            for handle in {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)
                           if h is not None}.values():
                handle.remove()
        _module_state_mapping.pop(sub, None)
        for key in (REGISTRY_KEY, STATE_KEY):  # fully_shard refuses a module it has seen before
            sub.__dict__.pop(key, None)
        if isinstance(sub, FSDPModule):
            sub.__class__ = next(b for b in type(sub).__bases__ if b is not FSDPModule)
