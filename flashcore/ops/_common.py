"""Checks and helpers shared by the attention launchers (no kernels here).

Per-row bounds (q_offset, kv_start, kv_end / kv_lens) arrive as None, a python int, or an integer tensor [B].
They are split into (tensor or None, int) pairs: a kernel reads the tensor when it is given and the int otherwise,
so the common int/None case allocates nothing and stays free of host syncs.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import triton

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels fold it into the softmax scale
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)


# Whether triton.jit compiles the kernels or runs them in its interpreter: read when they were defined
# (triton reads it then too), so setting it later changes nothing.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_problem(version: str = triton.__version__) -> str | None:
    """Why triton's interpreter cannot run these kernels here, or None. Before triton 3.7 the interpreter makes a
    loop bound a Python int with int() of a one-element array, which NumPy 2.x refuses ("only 0-dimensional arrays
    can be converted to Python scalars"): every kernel fails on its first loop (triton 3.7 squeezes first)."""
    import numpy as np
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) >= (3, 7):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            int(np.zeros(1))
            return None
        except TypeError:
            pass
    return (f"triton {version}'s interpreter cannot run the kernels with NumPy {np.__version__} (it turns loop "
            "bounds into ints with int() of one-element arrays, which this NumPy refuses); CPU runs need triton "
            ">= 3.7")


def cpu_problem() -> str | None:
    """Why CPU tensors cannot run here, or None: they run in triton's interpreter only, which must work."""
    if not INTERPRET:
        return ("CPU tensors run in triton's interpreter only: set TRITON_INTERPRET=1 before triton is imported, "
                "or put the tensors on a GPU")
    return interpreter_problem()


# Decided once, with the kernels: check_qkv reads a constant (also under torch.compile, which traces the checks)
CPU_PROBLEM = cpu_problem()


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes [B, Hq, Sq, D] / [B, Hkv, Skv, D], same dtype and device, Hq % Hkv == 0, D in {64, 128}; CPU
    tensors only where triton's interpreter can run them (CPU_PROBLEM)."""
    for label, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: {label} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {q.dtype} not supported (use float16, bfloat16 or float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    batch, hq, _, d = q.shape
    if k.shape[0] != batch or k.shape[3] != d:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head_dim {d} not supported (use one of {SUPPORTED_HEAD_DIMS})")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"{name}: query heads ({hq}) must be a multiple of KV heads ({k.shape[1]})")
    if q.device.type == "cpu" and CPU_PROBLEM:
        raise ValueError(f"{name}: {CPU_PROBLEM}")


def split_row_arg(name: str, what: str, value, batch: int, default: int,
                  device: torch.device) -> tuple[torch.Tensor | None, int]:
    """None | int | int tensor [B] -> (tensor or None, int fallback)."""
    if value is None:
        return None, default
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise ValueError(f"{name}: {what} must be None, an int or an integer tensor [B], got {type(value)}")
    if isinstance(value, int):
        return None, value
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name}: {what} must be an integer tensor, got {value.dtype}")
    if value.numel() != batch:
        raise ValueError(f"{name}: {what} must have one entry per batch row ({batch}), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: {what} is on {value.device} but q is on {device}")
    return value.reshape(batch), default


def default_scale(sm_scale: float | None, head_dim: int) -> float:
    return float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(head_dim)


def empty_bhsd(batch: int, heads: int, seq: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] view of a [B, S, H, D] buffer: transformers' transpose back to [B, S, H, D] is then free."""
    return like.new_empty(batch, seq, heads, head_dim).transpose(1, 2)


def use_custom_op() -> bool:
    """True while torch.compile traces or a dispatch mode (fake tensors, functionalization) is active: then the
    launchers go through their registered custom op. Plain eager calls and CUDA-graph capture call the Triton
    launcher directly and skip the dispatcher's per-call cost (tens of microseconds, as much as a decode step)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


class CompiledLaunch:
    """Launch one compiled Triton kernel again with no per-call Python work beyond the C launcher.

    `kernel[grid](*args)` binds and specialises every argument, reads its knobs and builds a string cache key on
    each call: on the H100 host that costs tens of microseconds, more than a decode kernel runs. The caller keeps
    one CompiledLaunch per specialisation it owns (the compiled kernel triton's first launch returned, for fixed
    argument classes) and passes device pointers as ints, which triton's launcher takes as they are. Triton's
    launch hooks (profilers) are not called on this path. Needs triton's CompiledKernel launch API (checked on
    3.6); without it, or where the kernel needs scratch memory, it goes through the compiled kernel's own runner.
    """

    def __init__(self, compiled, grid: tuple):
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.compiled = compiled
        run = compiled.run  # triton's CudaLauncher (loads the module on first use)
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        plain = (getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 0) == 0
                 and hasattr(run, "launch"))
        self._launch = run.launch if plain else None
        self._flags = (bool(getattr(run, "launch_cooperative_grid", False)), bool(getattr(run, "launch_pdl", False)))

    def __call__(self, stream: int, args: tuple) -> None:
        gx, gy, gz = self.grid
        if self._launch is not None:
            self._launch(gx, gy, gz, stream, self.function, *self._flags, None, None, self.metadata, None, None, None,
                         *args)
        else:
            self.compiled[self.grid](*args, stream=stream)


def current_stream(device_index: int) -> int:
    """The raw handle of the current CUDA stream of a device (what triton's launcher takes)."""
    return torch._C._cuda_getCurrentRawStream(device_index)


def kept_buffer(make: Callable[[], torch.Tensor], stream: int | None = None) -> torch.Tensor:
    """A buffer kept across calls (a workspace, zeroed tickets), allocated where no CUDA graph pool can claim it.

    torch.compile's CUDA-graph trees warm a function up eagerly with every allocation of the calling *thread* routed
    to the graph's private pool (`_cuda_beginAllocateCurrentThreadToPool`); a tensor kept from there and not
    returned makes them fail ("tensor(s) in the cudagraph pool not tracked as outputs"), and would be overwritten by
    later replays. So on a GPU `make` runs on a short-lived thread (the general pool, the device's default stream),
    which is then synchronised; `stream` (the raw handle of the stream that uses the buffer) is recorded on it so
    the caching allocator never hands its memory out while that stream may still read it."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_make_synchronised, make, stream).result()


def _make_synchronised(make: Callable[[], torch.Tensor], stream: int | None) -> torch.Tensor:
    t = make()
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
        if stream is not None:
            t.record_stream(torch.cuda.ExternalStream(stream, device=t.device))
    return t


def is_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (a cheap C query; call it with CUDA only)."""
    return torch._C._cuda_isCurrentStreamCapturing()
