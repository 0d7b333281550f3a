"""Typed results: what each step returns and what one host's run adds up to.

`HostRunResult.to_dict()` is the report's JSON document (schema `flashcore.report/1`); `from_dict()` reads it
back so a later fleet recap can aggregate and compare runs without re-parsing Markdown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

REPORT_SCHEMA = "flashcore.report/1"
StepStatus = Literal["ok", "failed", "skipped"]
STEP_NAMES = ("connect", "lock", "gpu", "sync", "install", "token", "suite", "report")
SKIPPABLE_STEPS = ("gpu", "sync", "install", "token", "suite")


@dataclass
class StepResult:
    name: str
    status: StepStatus
    duration_s: float = 0.0
    detail: str = ""
    command: str = ""
    log_tail: str = ""


@dataclass
class GpuProcess:
    gpu_uuid: str
    pid: int
    name: str
    used_memory_mib: int | None


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str = ""
    compute_capability: str = ""
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    driver_version: str = ""
    cuda_version: str = ""
    ecc_errors: int | None = None
    mig_mode: str = ""
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass
class SyncFacts:
    method: str = ""            # rsync | tar | unchanged
    content_hash: str = ""      # sha256 over (path, file sha256) of what the workspace holds
    files: int = 0
    bytes_sent: int = 0


@dataclass
class SuiteRun:
    """One suite process of a run: on one GPU (pinned with CUDA_VISIBLE_DEVICES, its own results folder) or, on a
    host without GPU, on the CPU (`gpu_index` None). A host with several GPUs has one per GPU, run at once."""

    gpu_index: int | None = None
    gpu_uuid: str = ""
    gpu_name: str = ""
    cuda_visible_devices: str = ""
    status: StepStatus = "skipped"
    verdict: str = ""           # PASSED, FAILED: parity, ERROR: suite step failed, INTERRUPTED ...
    exit_code: int = 0
    error: str = ""
    duration_s: float = 0.0
    busy: str = ""              # the processes already on this GPU when the run looked ("" = none)
    parity: dict[str, Any] | None = None
    command: str = ""
    log_tail: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)   # name -> path relative to the report's folder

    @property
    def tag(self) -> str:
        """`gpu0`: the GPU's results folder and output prefix ("" for the one suite of a host without GPU)."""
        return "" if self.gpu_index is None else f"gpu{self.gpu_index}"


@dataclass
class HostRunResult:
    host: str                   # inventory name, or ADDRESS:PORT, or "local"
    address: str
    port: int
    user: str
    local: bool
    model: str
    device: str = ""            # cuda | cpu (what the suite ran on)
    require_gpu: str = ""
    workspace: str = ""
    started_at: str = ""
    finished_at: str = ""
    duration_s: float = 0.0
    steps: list[StepResult] = field(default_factory=list)
    gpus: list[GpuInfo] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    sync: SyncFacts = field(default_factory=SyncFacts)
    parity: dict[str, Any] | None = None   # the suite's flashcore.parity/2 document when ONE suite ran (else None)
    suites: list[SuiteRun] = field(default_factory=list)     # one per GPU validated (or the CPU), each its parity
    gpus_selected: list[int] | None = None  # --gpus / the inventory's gpus: (None: every GPU of the host)
    verdict: str = "not run"
    exit_code: int = 0
    error: str = ""
    notes: list[str] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)   # what the cleanup could not remove from the host
    reproduce: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path relative to the report's folder
    regressions: list[str] = field(default_factory=list)   # confirmed regressions against the history (exit 1)
    flags: list[str] = field(default_factory=list)         # other findings against the history (suspicious ...)

    def step(self, name: str) -> StepResult | None:
        return next((s for s in self.steps if s.name == name), None)

    @property
    def failed_steps(self) -> list[StepResult]:
        return [s for s in self.steps if s.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": REPORT_SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> HostRunResult:
        if doc.get("schema") != REPORT_SCHEMA:
            raise ValueError(f"not a {REPORT_SCHEMA} document: schema={doc.get('schema')!r}")
        data = {k: v for k, v in doc.items() if k != "schema"}
        data["steps"] = [StepResult(**s) for s in data.get("steps", [])]
        data["gpus"] = [GpuInfo(**{**g, "processes": [GpuProcess(**p) for p in g.get("processes", [])]})
                        for g in data.get("gpus", [])]
        data["sync"] = SyncFacts(**data.get("sync", {}))
        data["suites"] = [SuiteRun(**x) for x in data.get("suites", [])]
        return cls(**data)
