"""Compiled decode blocks: the elementwise work around attention fused by torch.compile for single-token steps.

    with compiled_decode_blocks(model):          # Llama / Mistral / Qwen2 from transformers, any attention
        ...capture one decode step in a CUDA graph (flashcore.parity.latency.time_cuda_graph) and replay it

In eager transformers a decode layer runs ~25 tiny elementwise kernels around its projections and attention
(counted from the code: ~7 per RMSNorm, ~10 for the rotary embedding, SwiGLU's activation and product two); at
batch 1 each costs a launch slot of a few us even inside a CUDA graph. Compiling these blocks took the 8B shape's
graphed step from 8.71 to 7.23 ms/token on the H100 (docs/BENCHMARKS.md, 2026-11-28). Here the RMSNorms, the
rotary embedding and the MLP of single-token forwards go through torch.compile'd functions (inductor: fused
Triton kernels for the elementwise work, the projections stay cuBLAS), compiled once per shape and shared by
all layers (plain functions of tensors, so no per-layer guards or recompiles). Multi-token forwards (prefill) keep
the model's own code. The model's weights and modules are untouched; leaving the block restores everything.

Whole-model torch.compile (generate()'s static-cache path) fuses the same and more, but traces every layer and
brings its own cudagraph trees; this compiles three small functions (8-9 s on the H100 box) and leaves the step to
one CUDA graph the caller captures.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm, op for op
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _swiglu(x, w_gate, b_gate, w_up, b_up, w_down, b_down) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    # transformers' apply_rotary_pos_emb, op for op
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
        and isinstance(getattr(module, "weight", None), torch.Tensor)


def _is_swiglu(module: torch.nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    return all(hasattr(module, n) for n in names) and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation")


class _Compiled:
    """The three functions, compiled lazily with one set of options."""

    def __init__(self, backend: str):
        opts = dict(dynamic=False, fullgraph=True, backend=backend)
        self.rms_norm = torch.compile(_rms_norm, **opts)
        self.swiglu = torch.compile(_swiglu, **opts)
        self.rope = torch.compile(_rope, **opts)


def _norm_forward(module, original, compiled: _Compiled):
    def forward(hidden_states):
        if hidden_states.dim() == 3 and hidden_states.shape[1] == 1:  # [B, 1, H]: a decode step
            return compiled.rms_norm(hidden_states, module.weight, module.variance_epsilon)
        return original(hidden_states)
    return forward


def _mlp_forward(module, original, compiled: _Compiled):
    g, u, d = module.gate_proj, module.up_proj, module.down_proj

    def forward(x):
        if x.dim() == 3 and x.shape[1] == 1:
            return compiled.swiglu(x, g.weight, g.bias, u.weight, u.bias, d.weight, d.bias)
        return original(x)
    return forward


def _rope_function(original, compiled: _Compiled):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if q.dim() == 4 and q.shape[2] == 1 and not kwargs and len(args) <= 1:  # [B, H, 1, D]
            return compiled.rope(q, k, cos, sin, *args)
        return original(q, k, cos, sin, *args, **kwargs)
    return apply_rotary_pos_emb


_BY_BACKEND: dict[str, _Compiled] = {}


def _compiled(backend) -> _Compiled:
    """One set of compiled functions per named backend (reused by later blocks: no recompiling); a callable
    backend gets its own."""
    if not isinstance(backend, str):
        return _Compiled(backend)
    if backend not in _BY_BACKEND:
        _BY_BACKEND[backend] = _Compiled(backend)
    return _BY_BACKEND[backend]


@contextlib.contextmanager
def compiled_decode_blocks(model: torch.nn.Module, backend="inductor") -> Iterator[dict]:
    """Within the block, single-token forwards of `model` run its RMSNorms, SwiGLU MLPs and rotary embedding
    through compiled functions. Yields counts of what was routed ({"rms_norm": n, "mlp": n, "rope": n}).
    Modules of other types are left alone; on exit every instance forward and module global is put back."""
    compiled = _compiled(backend)
    patched: list[tuple[torch.nn.Module, object]] = []  # (module, its own instance forward or None)
    globals_patched: list[tuple[object, object]] = []
    counts = {"rms_norm": 0, "mlp": 0, "rope": 0}
    try:
        for module in model.modules():
            if _is_rms_norm(module):
                make, kind = _norm_forward, "rms_norm"
            elif _is_swiglu(module):
                make, kind = _mlp_forward, "mlp"
            else:
                continue
            patched.append((module, module.__dict__.get("forward")))
            module.forward = make(module, module.forward, compiled)
            counts[kind] += 1
        for module_name in {type(m).__module__ for m in model.modules() if hasattr(m, "o_proj")}:
            namespace = sys.modules[module_name]
            original = getattr(namespace, "apply_rotary_pos_emb", None)
            if original is not None:
                namespace.apply_rotary_pos_emb = _rope_function(original, compiled)
                globals_patched.append((namespace, original))
                counts["rope"] += 1
        yield counts
    finally:
        for module, own in patched:
            del module.forward  # the class's forward again, or the instance's own as it was
            if own is not None:
                module.forward = own
        for namespace, original in globals_patched:
            namespace.apply_rotary_pos_emb = original


def with_compiled_blocks(timer: Callable) -> Callable:
    """timer(model, ...) run inside compiled_decode_blocks(model), e.g. the parity suite's CUDA-graph latency:
    with_compiled_blocks(flashcore.parity.latency.time_cuda_graph)(model, prompt, steps)."""

    def timed(model, *args, **kwargs):
        with compiled_decode_blocks(model):
            return timer(model, *args, **kwargs)

    timed.__name__ = getattr(timer, "__name__", "timed")
    return timed
