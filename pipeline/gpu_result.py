"""One GPU's result in a fleet run: the record the history store keeps, the summary lists and JUnit reports.

    GpuResult        host, GPU (index, UUID, model), status, verdict, failed step, duration, metrics, scenario
                     verdicts, versions, report path
    gpu_results()    a HostRunResult -> one GpuResult per GPU the host has
    parity_metrics() a parity document (flashcore.parity/2, or /1) -> {metric name: value}, per model, unknown
                     scenarios and modes included

The runner validates every GPU (or those --gpus selects) with a suite of its own (`HostRunResult.suites`): each
GPU's record has that suite's verdict and figures; a GPU left out by --gpus is named "not run". A run that stopped
before its suites gives every selected GPU the host's verdict and failed step. A result with one suite on the
default device and no per-GPU suites (a Slurm task, a report written before per-GPU runs) gives GPU 0 the run's
figures and names the others "not run".

Metric names (all floats; direction and gating in `pipeline.regression.METRICS`). A suite validates several
models (a GPU's default: llama-3.1-8b and smollm2-135m): each model's metrics carry its name first.

    <model>.decode.<mode>.flashcore_ms   decode latency per token, <mode> = eager | cuda_graph |
                                         cuda_graph_compiled | any mode the suite adds
    <model>.decode.<mode>.sdpa_ms        the same for SDPA, measured in the same run (the reference)
    <model>.decode.<mode>.ratio          flashcore_ms / sdpa_ms (lower is better; host speed cancels out)
    <model>.err_bound.<scenario>         worst logit error over its bound in that scenario (1.0 = at the bound), for
                                         every scenario with a bound (a /1 document's: its *err_over_bound values)
    <model>.duration_s                   that model's share of the suite's time
    suite_duration_s                     the suite's own wall time, every model

e.g. `llama-3.1-8b.decode.cuda_graph.flashcore_ms`. Scenario verdicts are keyed the same way
(`smollm2-135m.batch_4`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline import errors, parse
from pipeline.results import GpuInfo, HostRunResult, SuiteRun

Status = Literal["passed", "failed", "error", "unreachable", "interrupted", "unknown", "not run"]
NOT_RUN = "not run"
# versions compared between runs ("environment changed: torch 2.11.0 -> 2.12.0"); the code hash is kept apart
ENV_KEYS = ("driver", "cuda", "torch", "triton", "transformers", "python", "gpu_uuid")   # gpu_uuid: a card swapped
CODE_KEY = "code"


@dataclass
class GpuResult:
    host: str
    gpu_index: int | None           # None: a host without GPU (the suite ran on the CPU)
    gpu_uuid: str = ""
    gpu_name: str = ""              # the model, e.g. "NVIDIA H100 80GB HBM3"; "cpu": ran without GPU; "": unknown
    status: Status = "unknown"
    verdict: str = ""               # the host report's verdict line, e.g. "FAILED: parity"
    failed_step: str = ""
    exit_code: int = 0
    duration_s: float = 0.0
    started_at: str = ""            # ISO 8601, UTC
    metrics: dict[str, float] = field(default_factory=dict)
    scenarios: dict[str, bool] = field(default_factory=dict)   # scenario name -> passed
    versions: dict[str, str] = field(default_factory=dict)     # ENV_KEYS + CODE_KEY + revision
    report: str = ""                # the host report (Markdown) this GPU's result is in, relative to the report
                                    # folder (its `artifacts["report_md"]`: where the summary is too)
    note: str = ""

    @property
    def ran(self) -> bool:
        return self.status != NOT_RUN

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def label(self) -> str:
        """`host gpu0`, `host cpu` or `host` (no GPU known): one line of the recap, one JUnit test case."""
        if self.gpu_index is not None:
            return f"{self.host} gpu{self.gpu_index}"
        return f"{self.host} cpu" if self.gpu_name == "cpu" else self.host

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GpuResult:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


def status_for(exit_code: int, verdict: str = "") -> Status:
    """Ansible-recap style state of a run from its exit code (pipeline.errors); an UNKNOWN verdict (a bug, a host
    whose run never ended) is "unknown"."""
    if verdict == "UNKNOWN":
        return "unknown"
    if exit_code > 128:   # ended by a signal (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)
        return "interrupted"
    return {errors.EXIT_OK: "passed", errors.EXIT_PARITY: "failed", errors.EXIT_GPU: "failed",
            errors.EXIT_CONNECT: "unreachable", errors.EXIT_STEP: "error", errors.EXIT_USAGE: "error",
            errors.EXIT_BUSY: "error"}.get(exit_code, "unknown")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value else None   # NaN is no measurement


def parity_metrics(doc: dict[str, Any] | None) -> dict[str, float]:
    """{metric: value} of a parity document (read typed: flashcore.parity/2, or /1 as one run), every metric of a
    model run prefixed by its model; a document that cannot be read, or a run whose model did not load, gives
    none."""
    report = parse.parity_report(doc)
    if report is None:
        return {}
    out: dict[str, float] = {}
    for run in report.runs:
        if not run.loaded:
            continue
        model = run.model.preset
        for row in run.latency.rows:
            fc, sdpa = _number(row.flashcore_ms), _number(row.sdpa_ms)
            if fc is not None:
                out[f"{model}.decode.{row.mode}.flashcore_ms"] = fc
            if sdpa is not None:
                out[f"{model}.decode.{row.mode}.sdpa_ms"] = sdpa
            if fc is not None and sdpa:
                out[f"{model}.decode.{row.mode}.ratio"] = fc / sdpa
        for scen in run.scenarios:
            if (x := _number(scen.worst_err_over_bound)) is not None:
                out[f"{model}.err_bound.{scen.name}"] = x
        if (d := _number(run.duration_s)):
            out[f"{model}.duration_s"] = d
    if (d := _number(report.duration_s)):
        out["suite_duration_s"] = d
    return out


def scenario_verdicts(doc: dict[str, Any] | None) -> dict[str, bool]:
    """{"<model>.<scenario>": passed} of the runs whose model loaded (a model that did not load says nothing
    about its scenarios: that run is a step error, never a scenario that "newly fails")."""
    report = parse.parity_report(doc)
    if report is None:
        return {}
    return {f"{run.model.preset}.{s.name}": s.passed for run in report.runs if run.loaded for s in run.scenarios}


def versions_of(result: HostRunResult, gpu: GpuInfo | None, parity: dict[str, Any] | None = None) -> dict[str, str]:
    v = result.versions
    suite_env = (parity or {}).get("environment") if isinstance(parity, dict) else None
    suite_env = suite_env if isinstance(suite_env, dict) else {}
    out = {
        "driver": gpu.driver_version if gpu else "",
        "cuda": v.get("torch_cuda") or (gpu.cuda_version if gpu else "") or str(suite_env.get("cuda") or ""),
        **{k: v.get(k) or str(suite_env.get(k) or "") for k in ("torch", "triton", "transformers", "python")},
        "gpu_uuid": gpu.uuid if gpu else "",
        CODE_KEY: v.get("flashcore_content_hash") or result.sync.content_hash,
        "revision": v.get("flashcore_revision", ""),
    }
    return {k: str(x) for k, x in out.items() if x not in (None, "")}


def _record(result: HostRunResult, gpu: GpuInfo | None, parity: dict[str, Any] | None = None) -> GpuResult:
    """The facts every record of `result` shares, for one GPU (`gpu=None`: a host without GPU)."""
    return GpuResult(
        host=result.host, gpu_index=gpu.index if gpu else None, gpu_uuid=gpu.uuid if gpu else "",
        gpu_name=gpu.name if gpu else ("cpu" if result.device == "cpu" else ""), started_at=result.started_at,
        report=result.artifacts.get("report_md", ""), versions=versions_of(result, gpu, parity),
        duration_s=result.duration_s)


def _judged(rec: GpuResult, exit_code: int, verdict: str, failed_step: str, parity: dict[str, Any] | None,
            note: str = "") -> GpuResult:
    rec.status, rec.verdict, rec.exit_code = status_for(exit_code, verdict), verdict, exit_code
    rec.failed_step, rec.note = failed_step, note
    rec.metrics, rec.scenarios = parity_metrics(parity), scenario_verdicts(parity)
    return rec


def _not_run(result: HostRunResult, gpu: GpuInfo, why: str) -> GpuResult:
    rec = _record(result, gpu)
    rec.status, rec.verdict, rec.note, rec.duration_s = NOT_RUN, NOT_RUN, why, 0.0
    return rec


def _host_record(result: HostRunResult, gpu: GpuInfo | None) -> GpuResult:
    """A GPU whose fate is the host's (the run stopped before the suites, or ran one suite for the host)."""
    failed = result.failed_steps
    busy = f"{len(gpu.processes)} process(es) already on this GPU" if gpu and gpu.processes else ""
    return _judged(_record(result, gpu, result.parity), result.exit_code, result.verdict,
                   failed[0].name if failed else "", result.parity, busy)


def _suite_record(result: HostRunResult, suite: SuiteRun, gpu: GpuInfo | None) -> GpuResult:
    """A GPU validated by a suite of its own: that suite's verdict, failed step and figures."""
    busy = f"busy: {suite.busy}" if suite.busy else ""
    return _judged(_record(result, gpu, suite.parity), suite.exit_code, suite.verdict,
                   "suite" if suite.status == "failed" else "", suite.parity, busy)


def _selection(result: HostRunResult) -> str:
    return ",".join(map(str, result.gpus_selected or []))


def gpu_results(result: HostRunResult) -> list[GpuResult]:
    """One GpuResult per GPU of `result` (see the module's docstring); a run that stopped before listing GPUs
    (unreachable, ...) or a host without GPU yields one record without a GPU."""
    gpus = sorted(result.gpus, key=lambda g: g.index)
    if result.suites:
        by_index = {s.gpu_index: s for s in result.suites}
        if None in by_index or not gpus:
            return [_suite_record(result, s, None) for s in result.suites]
        return [_suite_record(result, by_index[g.index], g) if g.index in by_index else
                _not_run(result, g, f"not selected (--gpus {_selection(result)})") for g in gpus]
    if not gpus or result.device == "cpu":
        return [_host_record(result, None)]
    if result.parity is not None:   # one suite on the default device: a Slurm task, an older report
        return [_host_record(result, g) if i == 0 else
                _not_run(result, g, "not validated: this run validated GPU 0 only (the suite ran on the default "
                                    "device)") for i, g in enumerate(gpus)]
    return [_host_record(result, g) if result.gpus_selected is None or g.index in result.gpus_selected else
            _not_run(result, g, f"not selected (--gpus {_selection(result)})") for g in gpus]
