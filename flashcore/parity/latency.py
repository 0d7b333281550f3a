"""Decode latency at a long cache: flashcore vs SDPA, ms per generated token, in the same process.

    eager                plain Python decoding over a DynamicCache (what HF generate does), greedy token fed back
    cuda_graph           one decode step (forward + argmax + feeding the token back + advancing the position)
                         captured as a CUDA graph over a StaticCache, then replayed: no Python, no host sync per token
    cuda_graph_compiled  the same graphed step with the elementwise work around attention fused by torch.compile
                         (flashcore.integrations.compiled: RMSNorm, rotary embedding, SwiGLU), the whole-model
                         decode step issue 10 measures; flashcore and SDPA alike

GPU only (CUDA events need a device; on the CPU the kernels run in the Triton interpreter, so a time says
nothing about them). Each mode is isolated: a failure becomes that row's note, never the whole suite's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from flashcore.integrations import set_attention
from flashcore.integrations.compiled import with_compiled_blocks
from flashcore.parity import decoding
from flashcore.parity.results import Latency, LatencyRow


@dataclass
class Timing:
    ms_per_token: float | None
    note: str = ""


@torch.no_grad()
def time_eager(model, prompt: torch.Tensor, steps: int, warmup: int = 4) -> Timing:
    cache = decoding.new_cache(model)
    logits = decoding.forward(model, prompt, cache, None, None)
    token = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(warmup):
        token = decoding.forward(model, token, cache, None, None)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = decoding.forward(model, token, cache, None, None)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return Timing((time.perf_counter() - start) * 1e3 / steps, "DynamicCache, Python loop, greedy")


@torch.no_grad()
def time_cuda_graph(model, prompt: torch.Tensor, steps: int, warmup: int = 3) -> Timing:
    cache_len = prompt.shape[1]
    max_len = cache_len + steps + warmup + 8
    decoding.warm_up_for_capture(model, prompt, max_len)
    cache = decoding.static_cache(model, max_len)
    positions = torch.arange(cache_len, device=prompt.device).view(1, -1)
    logits = model(input_ids=prompt, **decoding.step_kwargs(model, cache, positions)).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    position = torch.full((1, 1), cache_len, dtype=torch.long, device=prompt.device)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(input_ids=token, **decoding.step_kwargs(model, cache, position)).logits
        token.copy_(out[:, -1].argmax(-1, keepdim=True))
        position.add_(1)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return Timing((time.perf_counter() - start) * 1e3 / steps,
                  f"StaticCache({max_len}), one captured decode step replayed {steps}x")


# the compiled functions are compiled once per shape and shared by flashcore and SDPA (and by both models of
# one suite where their shapes agree); the first compiled row pays that compile (8-9 s on the H100 box, seconds
# with inductor's on-disk cache warm)
def time_cuda_graph_compiled(model, prompt: torch.Tensor, steps: int) -> Timing:
    t = with_compiled_blocks(time_cuda_graph)(model, prompt, steps)
    return Timing(t.ms_per_token, t.note + "; RMSNorm, rotary embedding and SwiGLU compiled (torch.compile)")


MODES = (("eager", time_eager), ("cuda_graph", time_cuda_graph), ("cuda_graph_compiled", time_cuda_graph_compiled))


def _isolated(fn, *args) -> Timing:
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a mode that cannot run is reported, not fatal
        torch.cuda.synchronize()
        return Timing(None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")


def measure(model, attn: str, cache_len: int = 2048, steps: int = 32, seed: int = 0) -> Latency:
    """flashcore (`attn`) vs SDPA decode latency after a cache_len-token prompt: eager, CUDA graph, and CUDA graph
    with compiled blocks (MODES)."""
    if not torch.cuda.is_available() or model.device.type != "cuda":
        return Latency(cache_len=cache_len, rows=[], skipped_reason=cpu_skip_reason())
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, cache_len), generator=g).to(model.device)
    rows = []
    for mode, fn in MODES:
        fc = _isolated(fn, set_attention(model, attn), prompt, steps)
        sdpa = _isolated(fn, set_attention(model, "sdpa"), prompt, steps)
        speedup = sdpa.ms_per_token / fc.ms_per_token if fc.ms_per_token and sdpa.ms_per_token else None
        note = fc.note if fc.note == sdpa.note else f"flashcore: {fc.note}; sdpa: {sdpa.note}"
        rows.append(LatencyRow(mode=mode, flashcore_ms=fc.ms_per_token, sdpa_ms=sdpa.ms_per_token, speedup=speedup,
                               note=f"{note}; batch 1, {steps} tokens after a {cache_len}-token prompt"))
    set_attention(model, attn)
    return Latency(cache_len=cache_len, rows=rows, skipped_reason=None)


def cpu_skip_reason() -> str:
    return ("no CUDA device: on the CPU the kernels run in the Triton interpreter, whose timings say nothing "
            "about the kernels")
