"""The parity results document, schema "flashcore.parity/1", as typed dataclasses (to_dict / from_dict).

The pytest entry writes it, the pipeline fetches, validates (ParityReport.from_dict raises SchemaError naming the
offending field) and renders it. Floats that are not finite are stored as strings ("nan", "inf") so the file stays
strict JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "flashcore.parity/1"
SCENARIO_NAMES = ("single_token", "generate_50", "generate_200", "gqa_memory", "batch_4")
LATENCY_MODES = ("eager", "cuda_graph")


class SchemaError(ValueError):
    """A parity document does not match flashcore.parity/1."""


def clean_value(value):
    """A measured value as plain JSON: bool / int / finite float / str (non-finite floats become strings)."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _require(data: dict, key: str, types, where: str, nullable: bool = False):
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise SchemaError(f"{where}.{key}: missing")
    value = data[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SchemaError(f"{where}.{key}: expected {types}, got bool")
    if not isinstance(value, types):
        raise SchemaError(f"{where}.{key}: expected {types}, got {type(value).__name__}")
    return value


NUM = (int, float)


@dataclass
class ModelInfo:
    preset: str
    source: str               # "preset" | "hub"
    dtype: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    params: int

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> "ModelInfo":
        out = cls(**{k: _require(d, k, str, where) for k in ("preset", "source", "dtype")},
                  **{k: _require(d, k, int, where) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim",
                                                              "hidden_size", "vocab_size", "params")})
        if out.source not in ("preset", "hub"):
            raise SchemaError(f"{where}.source: must be 'preset' or 'hub', got {out.source!r}")
        return out


@dataclass
class Environment:
    device: str
    device_kind: str          # "cuda" | "cpu"
    python: str
    torch: str
    triton: str
    transformers: str
    flashcore: str
    cuda: str | None
    triton_interpret: bool

    @classmethod
    def from_dict(cls, d: dict, where: str = "environment") -> "Environment":
        out = cls(**{k: _require(d, k, str, where) for k in ("device", "device_kind", "python", "torch", "triton",
                                                              "transformers", "flashcore")},
                  cuda=_require(d, "cuda", str, where, nullable=True),
                  triton_interpret=_require(d, "triton_interpret", bool, where))
        if out.device_kind not in ("cuda", "cpu"):
            raise SchemaError(f"{where}.device_kind: must be 'cuda' or 'cpu', got {out.device_kind!r}")
        return out


@dataclass
class ScenarioResult:
    name: str
    title: str
    passed: bool
    criterion: str
    measured: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    detail: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["measured"] = {str(k): clean_value(v) for k, v in self.measured.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "scenario") -> "ScenarioResult":
        measured = _require(d, "measured", dict, where)
        for key, value in measured.items():
            if not isinstance(value, (int, float, str, bool)):
                raise SchemaError(f"{where}.measured.{key}: expected number, string or bool")
        out = cls(name=_require(d, "name", str, where), title=_require(d, "title", str, where),
                  passed=_require(d, "passed", bool, where), criterion=_require(d, "criterion", str, where),
                  measured=dict(measured), summary=_require(d, "summary", str, where),
                  detail=_require(d, "detail", str, where))
        if out.name not in SCENARIO_NAMES:
            raise SchemaError(f"{where}.name: unknown scenario {out.name!r} (known: {', '.join(SCENARIO_NAMES)})")
        return out


@dataclass
class LatencyRow:
    mode: str                 # "eager" | "cuda_graph"
    flashcore_ms: float | None
    sdpa_ms: float | None
    speedup: float | None     # sdpa_ms / flashcore_ms
    note: str = ""

    @classmethod
    def from_dict(cls, d: dict, where: str = "latency.rows[]") -> "LatencyRow":
        out = cls(mode=_require(d, "mode", str, where),
                  flashcore_ms=_opt_float(_require(d, "flashcore_ms", NUM, where, nullable=True)),
                  sdpa_ms=_opt_float(_require(d, "sdpa_ms", NUM, where, nullable=True)),
                  speedup=_opt_float(_require(d, "speedup", NUM, where, nullable=True)),
                  note=_require(d, "note", str, where))
        if out.mode not in LATENCY_MODES:
            raise SchemaError(f"{where}.mode: must be one of {LATENCY_MODES}, got {out.mode!r}")
        return out


def _opt_float(value):
    return None if value is None else float(value)


@dataclass
class Latency:
    cache_len: int = 2048
    rows: list[LatencyRow] = field(default_factory=list)
    skipped_reason: str | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "latency") -> "Latency":
        rows = _require(d, "rows", list, where)
        return cls(cache_len=_require(d, "cache_len", int, where),
                   rows=[LatencyRow.from_dict(r, f"{where}.rows[{i}]") for i, r in enumerate(rows)],
                   skipped_reason=_require(d, "skipped_reason", str, where, nullable=True))


@dataclass
class Memory:
    kv_cache_bytes: int = 0
    kv_cache_bytes_mha: int = 0
    ratio: float = 0.0
    peak_gpu_bytes: int | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "memory") -> "Memory":
        return cls(kv_cache_bytes=_require(d, "kv_cache_bytes", int, where),
                   kv_cache_bytes_mha=_require(d, "kv_cache_bytes_mha", int, where),
                   ratio=float(_require(d, "ratio", NUM, where)),
                   peak_gpu_bytes=_require(d, "peak_gpu_bytes", int, where, nullable=True))


@dataclass
class ParityReport:
    passed: bool
    model: ModelInfo
    environment: Environment
    scenarios: list[ScenarioResult]
    latency: Latency
    memory: Memory
    started_at: str
    duration_s: float
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return {"schema": self.schema, "passed": self.passed, "model": asdict(self.model),
                "environment": asdict(self.environment), "scenarios": [s.to_dict() for s in self.scenarios],
                "latency": asdict(self.latency), "memory": asdict(self.memory), "started_at": self.started_at,
                "duration_s": float(self.duration_s)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def write(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    def scenario(self, name: str) -> ScenarioResult:
        for s in self.scenarios:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def from_dict(cls, d: dict) -> "ParityReport":
        schema = _require(d, "schema", str, "$")
        if schema != SCHEMA:
            raise SchemaError(f"$.schema: expected {SCHEMA!r}, got {schema!r}")
        scenarios = [ScenarioResult.from_dict(s, f"scenarios[{i}]")
                     for i, s in enumerate(_require(d, "scenarios", list, "$"))]
        return cls(passed=_require(d, "passed", bool, "$"), model=ModelInfo.from_dict(_require(d, "model", dict, "$")),
                   environment=Environment.from_dict(_require(d, "environment", dict, "$")), scenarios=scenarios,
                   latency=Latency.from_dict(_require(d, "latency", dict, "$")),
                   memory=Memory.from_dict(_require(d, "memory", dict, "$")),
                   started_at=_require(d, "started_at", str, "$"),
                   duration_s=float(_require(d, "duration_s", NUM, "$")), schema=schema)

    @classmethod
    def from_json(cls, text: str) -> "ParityReport":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def read(cls, path) -> "ParityReport":
        return cls.from_json(Path(path).read_text())
