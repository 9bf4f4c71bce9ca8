"""Host-device synchronisation in a training step: finding it, and proving there is none.

On a GPU the host queues kernels ahead of the device. Anything that reads a tensor's value on the host
(`.item()`, `float(t)`, `bool(t)`, `if t:`, `.tolist()`, `.cpu()`), or whose output's shape depends on tensor values
(`nonzero`, boolean-mask indexing), makes the host wait until the device has caught up: the queue drains and the GPU
idles while Python prepares the next kernels. phf's step reads nothing back; its loss, gradient norm and
non-finite flag stay on the device until a log step (phf.training.trainer.StepOutcomes).

`no_host_sync(device)` makes that checkable. On CUDA it turns on torch's own check
(`torch.cuda.set_sync_debug_mode("error")`: any synchronising CUDA call raises a RuntimeError, wherever it is made,
transformers' code included). Elsewhere (the CPU, which never waits) it watches the Python-level reads listed in
`HOST_READS` through a torch function mode and raises `HostSyncError` at the first one, naming it: a CPU test that
fails when someone adds an `.item()` to the step. (Not on CUDA: torch.compile would recompile the step under the
mode, and torch's check is the complete one there.)
"""
from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode

from phf.core.errors import PhfError

Tensor = torch.Tensor
# reads of a tensor's value on the host, and operations whose output's size depends on tensor values
HOST_READS = {
    Tensor.item: "Tensor.item()", Tensor.__bool__: "bool(tensor)", Tensor.__float__: "float(tensor)",
    Tensor.__int__: "int(tensor)", Tensor.__index__: "a tensor used as an index", Tensor.tolist: "Tensor.tolist()",
    Tensor.numpy: "Tensor.numpy()", Tensor.cpu: "Tensor.cpu()", torch.nonzero: "torch.nonzero",
    Tensor.nonzero: "Tensor.nonzero()", torch.argwhere: "torch.argwhere", torch.masked_select: "torch.masked_select",
    Tensor.masked_select: "Tensor.masked_select()", torch.unique: "torch.unique", Tensor.unique: "Tensor.unique()",
}


class HostSyncError(PhfError):
    """A training step read a tensor's value on the host (a host-device synchronisation on a GPU)."""


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in parts)


def _to_host(args, kwargs) -> bool:
    """Tensor.to(...) from a device that is not the CPU to the CPU."""
    src = args[0] if args else None
    if not isinstance(src, Tensor) or src.device.type == "cpu":
        return False
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


class HostReads(TorchFunctionMode):
    """Records (and with `strict`, raises at) every host read of a tensor made while it is active."""

    def __init__(self, strict: bool = True):
        super().__init__()
        self.strict = strict
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = HOST_READS.get(func)
        if what is None and func is Tensor.__getitem__ and len(args) > 1 and _bool_index(args[1]):
            what = "indexing with a boolean mask"
        if what is None and func is Tensor.to and _to_host(args, kwargs):
            what = "Tensor.to(cpu)"
        if what is not None:
            caller = traceback.extract_stack(limit=2)[0]  # the frame that made the read
            self.reads.append(f"{what} at {caller.filename}:{caller.lineno}")
            if self.strict:
                raise HostSyncError(f"host-device synchronisation inside a training step: {self.reads[-1]}; keep the "
                                    f"value on the device and read it at a log step")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(device: torch.device, strict: bool = True):
    """Inside, on CUDA any synchronising CUDA call raises (with `strict`; else torch warns); elsewhere a host read
    of a tensor raises HostSyncError (`strict`) or is recorded in the yielded HostReads."""
    reads = HostReads(strict)
    if device.type != "cuda":
        with reads:
            yield reads
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error" if strict else "warn")
    try:
        yield reads
    finally:
        torch.cuda.set_sync_debug_mode(before)
