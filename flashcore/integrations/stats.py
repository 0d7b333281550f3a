"""Cheap per-layer call counters for the flashcore attention (host-side Python ints only).

Counting reads shapes, never tensor values, so it adds no device work and no host sync. It is skipped while
torch.compile traces; a CUDA-graph replay runs no Python, so only the capture itself is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

ATTR = "_flashcore_stats"


@dataclass
class LayerStats:
    prefill_calls: int = 0
    decode_calls: int = 0
    prefill_tokens: int = 0   # query tokens (batch * Sq) through the prefill kernel
    decode_tokens: int = 0    # query tokens (batch) through the decode kernel
    fallback_calls: int = 0   # masks flashcore cannot express (sliding window, packed, custom): torch SDPA ran

    @property
    def calls(self) -> int:
        return self.prefill_calls + self.decode_calls + self.fallback_calls

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class AttentionStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)

    @property
    def total(self) -> LayerStats:
        out = LayerStats()
        for layer in self.layers.values():
            out.add(layer)
        return out

    def to_dict(self) -> dict:
        as_dict = lambda s: {f.name: getattr(s, f.name) for f in fields(s)}  # noqa: E731
        return {"layers": {i: as_dict(s) for i, s in sorted(self.layers.items())}, "total": as_dict(self.total)}


def record(module: torch.nn.Module, kind: str, tokens: int) -> None:
    """Count one attention call of `kind` ("prefill", "decode" or "fallback") on this attention module."""
    if torch.compiler.is_compiling():
        return
    stats = module.__dict__.get(ATTR)
    if stats is None:
        stats = LayerStats()
        module.__dict__[ATTR] = stats  # plain attribute, bypassing nn.Module registration
    if kind == "prefill":
        stats.prefill_calls += 1
        stats.prefill_tokens += tokens
    elif kind == "decode":
        stats.decode_calls += 1
        stats.decode_tokens += tokens
    else:
        stats.fallback_calls += 1


def collect(model: torch.nn.Module) -> AttentionStats:
    out = AttentionStats()
    for index, module in enumerate(m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj")):
        layer = getattr(module, "layer_idx", index)
        live = module.__dict__.get(ATTR)
        out.layers[layer] = LayerStats(**vars(live)) if live is not None else LayerStats()  # a snapshot
    return out


def reset(model: torch.nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(ATTR, None)
