"""Process-wide settings for training on CPUs: how glibc's allocator treats the large, short-lived tensors of a step.

By default glibc serves every allocation above a (dynamic, at most 32 MB) threshold with a fresh `mmap` and hands it
back with `munmap` when freed. A training step allocates and frees tens of such tensors (logits, their float32 copy,
their gradients: 64 MB each at batch 8 x 256 tokens x 8,192 vocabulary), so every step pays for the kernel to map
and zero those pages again: on the 2-core machine of the README a third of the step (`phf bench train` measures the
difference). `tune_allocator` keeps them on the heap instead (no mmap for allocations, no trimming of the heap),
so freed memory is reused by the next step. The cost: memory a process has freed is not given back to the system
until it exits, so its resident size stays at its peak.

`phf` applies it at start-up (phf/cli/main.py); set PHF_ALLOCATOR=default to leave the allocator as it is. It does nothing
where the C library is not glibc, and nothing to GPU memory.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys

import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # the largest value mallopt takes: the heap's free top is never given back
ENV = "PHF_ALLOCATOR"
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep large allocations on glibc's heap and never trim it. True if applied (once per process)."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(ENV, "tuned") == "default" or not sys.platform.startswith("linux"):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER))
    if not _tuned:
        log.debug("mallopt refused the allocator settings; glibc's defaults stay")
    return _tuned


def release_free_memory() -> None:
    """Give the heap's free memory back to the system now (glibc's malloc_trim), e.g. before measuring a peak."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _libc_function(name: str):
    """A function of the C library this process runs on, or None where it has none by that name."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def allocator_state() -> str:
    """What tune_allocator did in this process, for benchmark figures and run metadata."""
    return "glibc heap only, never trimmed" if _tuned else "default"


# CPU flags of native bf16 matrix arithmetic: x86's AVX512-BF16 and AMX, Arm's BF16 extension. Without them torch
# computes a bf16 product by converting in software: on a 2-core AVX2 machine, 0.9 GFLOP/s against fp32's ~50.
_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (read from /proc/cpuinfo; False where it is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = {word for line in f if line.lower().startswith(("flags", "features")) for word in line.split()}
    except OSError:
        return platform.machine() == "arm64" and sys.platform == "darwin"  # Apple silicon has BF16
    return bool(flags & _BF16_CPU_FLAGS)


def resolve_dtype(name: str, device: torch.device) -> str:
    """The precision a run computes in: `bf16` or `fp32` as configured; `auto` is bf16 where the device has it in
    hardware (a CUDA GPU of compute capability 8 or more, a CPU with AVX512-BF16, AMX or Arm BF16), else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def allow_tf32(device: torch.device) -> bool:
    """On a CUDA GPU, float32 matrix products in TF32 (what autocast leaves in float32, and every product of an fp32
    run): its tensor cores, at 10 bits of mantissa. Nothing elsewhere (a CPU keeps exact float32). True if set."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def default_device() -> torch.device:
    """Where a model is trained and evaluated: this process' GPU when there is one (torchrun's LOCAL_RANK), else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def inference_autocast(device: torch.device):
    """bf16 autocast for sampling on a GPU that computes bf16; elsewhere fp32 (a CPU gains nothing from bf16
    decoding at phf's sizes, and emulates it where it lacks it in hardware). Log-probabilities are taken in fp32
    after the final matmul either way."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: free memory plus the caches the kernel would give back
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
