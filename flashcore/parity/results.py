"""The parity results document, schema "flashcore.parity/2": one typed pydantic model, published as JSON Schema.

    report = ParityReport.read("parity.json")        # also reads flashcore.parity/1 documents (one model)
    report.passed, report.runs[0].model.preset, report.runs[0].scenarios[0].worst_err_over_bound
    json_schema()                                    # == flashcore/parity/parity.schema.json (a test checks it)

Layout: the run's environment and seed, then one `ModelRun` per model the suite was asked for (a GPU host runs the
8B shape and a real trained model), each with its scenarios, decode latency, KV-cache memory and, for a model
with a tokenizer, `samples`: chat prompts with the answers the reference, flashcore and SDPA generated. A run
whose model could not be loaded says so in `loaded: false` (and why in `error`): its scenarios did not run, which
is no verdict on the kernels. `timings_s` says where a run's time went (load, reference, scenarios, samples,
latency).

Readers are tolerant where a newer writer may add things: unknown fields are ignored, and scenario names and
latency modes are free strings (a scenario or mode this reader does not know is shown like any other). They are strict where a wrong document
would mislead: types, required fields, and a `passed: true` that its own runs or scenarios contradict.
Non-finite floats (an error that overflowed) are stored as the strings "inf", "-inf", "nan" so the file stays
strict JSON. Changes from /1: `model`, `scenarios`, `latency`, `memory` moved into `runs[]`; new `seed`,
`samples`, `ModelInfo.weights`, `ScenarioResult.worst_err_over_bound` and `.duration_s`; `source` may be "package".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, model_validator)

SCHEMA = "flashcore.parity/2"
SCHEMA_V1 = "flashcore.parity/1"
JSON_SCHEMA_PATH = Path(__file__).with_name("parity.schema.json")


class SchemaError(ValueError):
    """A parity document does not match flashcore.parity/2 (or /1); the message names the offending field."""


def clean_value(value):
    """A measured value as plain JSON: bool / int / finite float / str (non-finite floats become strings)."""
    if hasattr(value, "item") and not isinstance(value, (bool, int, float, str)):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (bool, int, str)):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _finite_or_text(value):
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


# A measured value: bool, int, finite float or text ("inf" / "nan" for a float that was not finite)
Value = Annotated[Union[StrictBool, StrictInt, StrictFloat, StrictStr], AfterValidator(_finite_or_text)]
Ratio = Annotated[Union[StrictFloat, StrictInt, StrictStr, None], AfterValidator(_finite_or_text)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_assignment=True)


class ModelInfo(_Doc):
    preset: str                       # the name the suite was asked for (a preset, a packaged model or a hub id)
    source: Literal["preset", "hub", "package"]
    dtype: str
    num_layers: StrictInt
    num_heads: StrictInt
    num_kv_heads: StrictInt
    head_dim: StrictInt
    hidden_size: StrictInt
    vocab_size: StrictInt
    params: StrictInt
    weights: str = ""                 # where the weights come from: "random (seed 0)", a package file + sha256, ...


class Environment(_Doc):
    device: str
    device_kind: Literal["cuda", "cpu"]
    python: str
    torch: str
    triton: str
    transformers: str
    flashcore: str
    cuda: str | None
    triton_interpret: StrictBool


class ScenarioResult(_Doc):
    name: str
    title: str
    passed: StrictBool
    criterion: str
    measured: dict[str, Value] = Field(default_factory=dict)
    summary: str = ""
    detail: str = ""
    worst_err_over_bound: Ratio = None   # max over steps of err(flashcore) / bound; <= 1 passes; None: no bound
    duration_s: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _clean_measured(cls, data: Any):
        if isinstance(data, dict) and isinstance(data.get("measured"), dict):
            data = {**data, "measured": {str(k): _clean_if_number(v) for k, v in data["measured"].items()}}
        return data


def _clean_if_number(value):
    """Python-side values (torch / numpy scalars, non-finite floats) into JSON values; anything else is left for
    validation to reject."""
    if isinstance(value, float) or (hasattr(value, "item") and not isinstance(value, (bool, int, str))):
        return clean_value(value)
    return value


class LatencyRow(_Doc):
    mode: str                         # eager | cuda_graph | cuda_graph_compiled (flashcore.parity.latency), or newer
    flashcore_ms: float | None
    sdpa_ms: float | None
    speedup: float | None             # sdpa_ms / flashcore_ms
    note: str = ""


class Latency(_Doc):
    cache_len: StrictInt = 2048
    rows: list[LatencyRow] = Field(default_factory=list)
    skipped_reason: str | None = None


class Memory(_Doc):
    kv_cache_bytes: StrictInt = 0
    kv_cache_bytes_mha: StrictInt = 0
    ratio: float = 0.0
    peak_gpu_bytes: StrictInt | None = None


class Sample(_Doc):
    """One chat prompt of a real model and the greedy answers generated from it (display material for the
    report; the verdict comes from the teacher-forced scenarios)."""
    prompt: str                       # the user's message
    prompt_tokens: StrictInt          # the whole chat-templated prompt
    reference: str                    # fp32 reference, greedy
    flashcore: str
    sdpa: str
    new_tokens: StrictInt
    first_divergence: StrictInt | None = None    # first token where flashcore's answer parts from the reference's
    divergence_margin: float | None = None       # the reference's top-1 margin there (a near-tie when small)


class ModelRun(_Doc):
    model: ModelInfo
    passed: StrictBool
    scenarios: list[ScenarioResult]
    latency: Latency = Field(default_factory=Latency)
    memory: Memory = Field(default_factory=Memory)
    samples: list[Sample] = Field(default_factory=list)
    duration_s: float = 0.0
    error: str = ""                   # one line: why the model did not load, or what failed outside the scenarios
    loaded: StrictBool = True         # false: the model could not be loaded (no verdict on the kernels)
    timings_s: dict[str, float] = Field(default_factory=dict)   # load, reference, scenarios, samples, latency

    @model_validator(mode="after")
    def _passed_agrees(self):
        if self.passed and (not self.loaded or not self.scenarios or not all(s.passed for s in self.scenarios)):
            raise ValueError("passed is true but a scenario failed or none ran")
        return self

    def scenario(self, name: str) -> ScenarioResult:
        for s in self.scenarios:
            if s.name == name:
                return s
        raise KeyError(name)


class ParityReport(_Doc):
    schema_: Literal["flashcore.parity/2"] = Field(SCHEMA, alias="schema")
    passed: StrictBool
    seed: StrictInt | None = None
    environment: Environment
    runs: list[ModelRun]
    started_at: str
    duration_s: float

    model_config = ConfigDict(extra="ignore", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _passed_agrees(self):
        if self.passed and (not self.runs or not all(r.passed for r in self.runs)):
            raise ValueError("passed is true but a model run failed or none ran")
        return self

    # -- convenience -----------------------------------------------------------------------------------------

    @property
    def schema(self) -> str:  # noqa: D401 - the document's schema string
        return self.schema_

    def run(self, preset: str) -> ModelRun:
        for r in self.runs:
            if r.model.preset == preset:
                return r
        raise KeyError(preset)

    def scenario(self, name: str, preset: str | None = None) -> ScenarioResult:
        return (self.run(preset) if preset else self.runs[0]).scenario(name)

    # the first model's run under the names a /1 document had at its top level (Python readers of /1 keep working)
    model = property(lambda self: self.runs[0].model)
    scenarios = property(lambda self: self.runs[0].scenarios)
    latency = property(lambda self: self.runs[0].latency)
    memory = property(lambda self: self.runs[0].memory)

    # -- I/O -------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def write(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any) -> "ParityReport":
        """Validate a document (flashcore.parity/2, or /1 upgraded to one run); SchemaError names the field."""
        if not isinstance(data, dict):
            raise SchemaError(f"$: expected an object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema == SCHEMA_V1:
            data = upgrade_v1(data)
        elif schema != SCHEMA:
            raise SchemaError(f"$.schema: expected {SCHEMA!r} (or {SCHEMA_V1!r}), got {schema!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(_first_error(exc, v1=schema == SCHEMA_V1)) from None

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


V1_RUN_FIELDS = ("model", "scenarios", "latency", "memory")


def upgrade_v1(data: dict) -> dict:
    """A flashcore.parity/1 document (one model at the top level) as a /2 document with one run. /1 kept each
    scenario's worst err/bound among its measured values (`*err_over_bound`), and said that its model did not
    load only in words: every scenario failed unevaluated with "model ... did not load"."""
    out = {k: v for k, v in data.items() if k not in V1_RUN_FIELDS}
    run = {k: data[k] for k in V1_RUN_FIELDS if k in data}
    if "passed" in data:
        run["passed"] = data["passed"]
    if isinstance(run.get("scenarios"), list):      # new dicts: the caller's document is left as it was
        run["scenarios"] = [_v1_scenario(s) if isinstance(s, dict) else s for s in run["scenarios"]]
    scenarios = [s for s in run.get("scenarios") or [] if isinstance(s, dict)]
    why = [str(s.get("summary", "")) for s in scenarios]
    if scenarios and all("did not load" in w for w in why):
        run.update(loaded=False, error=why[0])
    out.update(schema=SCHEMA, runs=[run])
    return out


def _v1_scenario(s: dict) -> dict:
    """/2's worst err/bound of a /1 scenario: the largest of its measured `*err_over_bound` values."""
    ratios = [v for k, v in s.get("measured", {}).items() if str(k).endswith("err_over_bound")
              and isinstance(v, (int, float)) and not isinstance(v, bool)] if isinstance(s.get("measured"), dict) else []
    return {**s, "worst_err_over_bound": max(ratios)} if ratios and s.get("worst_err_over_bound") is None else s


def _first_error(exc: ValidationError, v1: bool = False) -> str:
    """'runs[0].model.params: Field required' (for a /1 document the path it had there: 'model.params')."""
    err = exc.errors()[0]
    parts: list[str] = []
    for item in err["loc"]:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
        else:
            parts.append(str(item))
    path = ".".join(parts) or "$"
    if v1 and path.startswith("runs[0]."):
        path = path.removeprefix("runs[0].")
    return f"{path}: {err['msg']}"


def json_schema() -> dict:
    """The JSON Schema of flashcore.parity/2 (what parity.schema.json holds)."""
    schema = ParityReport.model_json_schema(by_alias=True)
    schema["$id"] = SCHEMA
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def write_json_schema(path: Path = JSON_SCHEMA_PATH) -> Path:
    """Regenerate the published schema: python -c 'from flashcore.parity.results import write_json_schema as w; w()'"""
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    return path


def summarize(data: Any) -> tuple[bool | None, str]:
    """(passed, one line) of any parity document, never raising: what a report's verdict line shows.
    '9/9 scenarios passed on llama-3.1-8b, 9/9 on smollm2-135m' or why the document could not be read."""
    try:
        report = ParityReport.from_dict(data)
    except SchemaError as exc:
        return None, f"unreadable parity document ({exc})"
    return report.passed, summary_line(report)


def summary_line(report: ParityReport) -> str:
    """One line for every model run of a typed document (summarize's line)."""
    return "; ".join(run_line(run) for run in report.runs) or "no model ran"


def run_line(run: ModelRun) -> str:
    """'9/9 scenarios passed on tiny', '8/9 ... (failed: batch_4)', 'smollm2-135m not loaded: ...'."""
    if not run.loaded:
        return f"{run.model.preset} not loaded: {run.error.removeprefix(f'model {run.model.preset!r} did not load: ')}"
    failed = [s.name for s in run.scenarios if not s.passed]
    text = f"{len(run.scenarios) - len(failed)}/{len(run.scenarios)} scenarios passed on {run.model.preset}"
    if failed:
        text += " (failed: " + ", ".join(failed) + ")"
    if run.error:
        text += f" ({run.error})"
    return text
