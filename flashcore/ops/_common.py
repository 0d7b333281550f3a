"""Checks and helpers shared by the attention launchers (no kernels here).

Per-row bounds (q_offset, kv_start, kv_end / kv_lens) arrive as None, a python int, or an integer tensor [B].
They are split into (tensor or None, int) pairs: a kernel reads the tensor when it is given and the int otherwise,
so the common int/None case allocates nothing and stays free of host syncs.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels fold it into the softmax scale
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes [B, Hq, Sq, D] / [B, Hkv, Skv, D], same dtype and device, Hq % Hkv == 0, D in {64, 128}."""
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


def _arg_class(value):
    """What triton's launcher specialises an argument on, or finer: dtype and 16-byte alignment of a tensor;
    for an int whether it is 1, a multiple of 16, and its width (i32 / i64 / u64); other values themselves."""
    kind = type(value)
    if kind is int:
        return (value == 1, value % 16 == 0, -2**31 <= value < 2**31, value >= 2**63)
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if kind is float:
        return float
    return value  # None, bool, str


class LaunchCache:
    """Launch a Triton kernel again without triton's per-call Python work.

    `kernel[grid](*args)` binds and specialises every argument, reads its knobs and builds a string cache key
    on each call: on the H100 host that is tens of microseconds per launch, more than a decode kernel runs.
    The compiled kernel the first call returns is launched directly by later calls whose key matches; the key
    is the argument classes of _arg_class (constexpr arguments by value) plus the launch options, so a cached
    kernel is only reused where triton would have picked the same binary. Launches go to the current stream
    (CUDA-graph capture included). In the interpreter (CPU) nothing is cached.
    """

    def __init__(self, fn, max_entries: int = 256):
        self.fn = fn
        self.max_entries = max_entries
        params = getattr(fn, "params", None)  # None for the interpreter's InterpretedFunction
        self._constexpr = tuple(p.is_constexpr for p in params) if params is not None else None
        self._compiled: dict = {}

    def key(self, args: tuple, options: tuple) -> tuple:
        return options + tuple(a if const else _arg_class(a) for a, const in zip(args, self._constexpr))

    def __call__(self, grid: tuple, args: tuple, num_warps: int, num_stages: int) -> None:
        if self._constexpr is None or not args[0].is_cuda:
            self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages)
            return
        if len(args) != len(self._constexpr):
            raise TypeError(f"{self.fn.__name__}: {len(args)} arguments for {len(self._constexpr)} parameters")
        key = self.key(args, (args[0].device.index, num_warps, num_stages))
        compiled = self._compiled.get(key)
        if compiled is not None:
            compiled[grid + (1,) * (3 - len(grid))](*args)  # the compiled kernel's runner wants 3 grid dims
            return
        compiled = self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages)
        if compiled is not None and hasattr(compiled, "packed_metadata"):  # a CompiledKernel
            if len(self._compiled) >= self.max_entries:
                self._compiled.clear()
            self._compiled[key] = compiled
