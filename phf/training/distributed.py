"""Distributed training: the ranks of a torchrun launch (DDP over gloo on CPU, nccl on GPU), and FSDP2 — sharding
a model, its gradients' clipping, and full (unsharded) state dicts for checkpoints that DDP and FSDP runs share.
Everything here is a no-op or a plain call for a single process."""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from phf.core.errors import PhfError
from phf.core.runtime import default_device


# -- distributed helpers ----------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def init_distributed(device: torch.device, timeout_minutes: float = 60.0) -> Dist:
    """The process group of a torchrun job, with an explicit timeout: how long a rank waits for the others at a
    collective (rank 0 preparing the data included) before it fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def pick_device() -> torch.device:
    return default_device()


# -- FSDP2: sharding, and full state dicts for checkpoints --------------------------------------------------------
def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 in place: `fully_shard` each transformer block (the classes the model lists in `_no_split_modules`,
    GPT2Block for GPT-2), then the root, which keeps the embeddings and the final norm. Parameters become DTensor
    shards; build the optimizer after this."""

    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise PhfError(f"train.parallel=fsdp: {type(model).__name__} names no transformer block class "
                       f"(_no_split_modules) to shard by; use train.parallel=ddp")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    # the model returns views (logits, hidden states); the objectives never modify them in place, which is what
    # this warning is about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def no_sync(train_model: torch.nn.Module):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) of a micro-batch that is not the step's last."""
    if isinstance(train_model, torch.nn.parallel.DistributedDataParallel):
        return train_model.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        train_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)

    return fsdp_no_sync()


def clip_sharded_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over FSDP2 shards (DTensor) and plain tensors (an objective's own heads) together: the
    global norm of all gradients, every rank the same."""

    grads = [p.grad for p in params if p.grad is not None]
    norms = []
    for kind in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if kind:
            n = torch.nn.utils.get_total_norm(kind)
            norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # on the device: no host read (a product by 1 is exact)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return total


def optimizer_param_names(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order of optimizer.state_dict()'s integer ids."""
    names = {id(p): n for n, p in root.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_full_state(model: torch.nn.Module, root: torch.nn.Module, optimizer: torch.optim.Optimizer
                      ) -> tuple[torch.nn.Module | None, dict | None]:
    """Collective (every rank calls it): the full, unsharded weights and optimizer state, gathered to rank 0 on
    the CPU. Rank 0 gets a plain (unsharded) copy of the model to save and the optimizer state in
    optimizer.state_dict()'s layout (so DDP and FSDP checkpoints are interchangeable); other ranks get (None, None)."""

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(root, optimizer, options=opts)
    if dist.get_rank() != 0:
        return None, None
    with torch.device("meta"):  # no memory, no initialisation: the gathered weights are assigned to it
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(weights, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    index = {n: i for i, n in enumerate(optimizer_param_names(root, optimizer))}
    optim = {"state": {index[n]: v for n, v in optim["state"].items()},
             "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in optim["param_groups"]]}
    return plain, optim


def load_sharded_optimizer(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer.state_dict() (every rank holds it) into an optimizer over FSDP2 shards."""

    names = optimizer_param_names(root, optimizer)
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise PhfError("the checkpoint's optimizer state does not fit this model; start a new run with --init-from")
    state = {"state": {names[i]: v for i, v in state["state"].items()},
             "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
