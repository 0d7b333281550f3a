"""Pure parsers: remote output -> typed results (fed by fixture files in the tests; no I/O here)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from flashcore.parity.results import ParityReport, SchemaError, summarize, summary_line
from pipeline.commands import RESULT_MARKER
from pipeline.inventory import GpuSpec, describe_gpu_requirement
from pipeline.results import GpuInfo, GpuProcess

_NA = {"", "[n/a]", "n/a", "[not supported]", "not supported", "[unknown error]"}
_CUDA = re.compile(r"CUDA Version:\s*([0-9.]+)")
_DRIVER = re.compile(r"Driver Version:\s*([0-9.]+)")


@dataclass
class GpuProbe:
    nvidia_smi: bool               # False: nvidia-smi is not on the host's PATH
    gpus: list[GpuInfo] = field(default_factory=list)
    error: str = ""                # nvidia-smi ran but failed (no devices, NVML mismatch ...)


def _int(text: str) -> int | None:
    text = text.strip()
    if text.lower() in _NA:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def _str(text: str) -> str:
    text = text.strip()
    return "" if text.lower() in _NA else text


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@@") and not line.startswith("@@rc="):
            current = line[2:].strip()
            out[current] = []
        elif line.startswith("@@rc="):
            out.setdefault("rc", []).append(line[5:].strip())
        elif current is not None:
            out[current].append(line.rstrip())
    return out


def parse_gpu_query(text: str) -> GpuProbe:
    """Output of `commands.gpu_query_command()` -> GpuProbe."""
    sec = _sections(text)
    if "no-nvidia-smi" in sec:
        return GpuProbe(nvidia_smi=False)
    lines = [ln for ln in sec.get("gpus", []) if ln.strip()]
    rc = (sec.get("rc") or ["0"])[0]
    header = "\n".join(sec.get("header", []))
    cuda = (m.group(1) if (m := _CUDA.search(header)) else "")
    gpus: list[GpuInfo] = []
    bad: list[str] = []
    for ln in lines:
        cols = [c.strip() for c in ln.split(",")]
        if len(cols) != 9 or _int(cols[0]) is None:
            bad.append(ln.strip())
            continue
        gpus.append(GpuInfo(
            index=int(cols[0]), name=cols[1], uuid=_str(cols[2]), compute_capability=_str(cols[3]),
            memory_total_mib=_int(cols[4]), memory_used_mib=_int(cols[5]), driver_version=_str(cols[6]),
            cuda_version=cuda, ecc_errors=_int(cols[7]), mig_mode=_str(cols[8])))
    if rc != "0" or (bad and not gpus):
        return GpuProbe(nvidia_smi=True, gpus=gpus, error=" ".join(bad) or f"nvidia-smi exited with {rc}")
    by_uuid = {g.uuid: g for g in gpus}
    for ln in sec.get("apps", []):
        cols = [c.strip() for c in ln.split(",")]
        if len(cols) != 4 or _int(cols[1]) is None:
            continue
        gpu = by_uuid.get(cols[0])
        if gpu is not None:
            gpu.processes.append(GpuProcess(gpu_uuid=cols[0], pid=int(cols[1]), name=cols[2],
                                            used_memory_mib=_int(cols[3])))
    return GpuProbe(nvidia_smi=True, gpus=gpus)


def _cc_tuple(cc: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in cc.split("."))
    except ValueError:
        return ()


def check_gpu_requirement(spec: GpuSpec | None, probe: GpuProbe) -> str:
    """'' when `probe` meets `spec`, else why not (one line). `spec=None` (--require-gpu none) always passes."""
    if spec is None:
        return ""
    need = describe_gpu_requirement(spec)
    if not probe.nvidia_smi:
        return f"nvidia-smi not found on the host (need {need}; --require-gpu none runs on the CPU)"
    if probe.error:
        return f"nvidia-smi failed: {probe.error} (need {need})"
    found = ", ".join(sorted({g.name for g in probe.gpus})) or "no GPU"
    ok = [g for g in probe.gpus if _matches(spec, g)]
    if len(ok) < spec.min_count:
        have = f"{len(ok)} matching" if ok else f"found {found}"
        return f"{have}, need {need}" + (f" ({spec.min_count} of them)" if spec.min_count > 1 else "")
    return ""


def _matches(spec: GpuSpec, gpu: GpuInfo) -> bool:
    if spec.name and spec.name.lower() not in gpu.name.lower():
        return False
    if spec.compute_capability and _cc_tuple(gpu.compute_capability) < _cc_tuple(spec.compute_capability):
        return False
    if spec.min_memory_gb and (gpu.memory_total_mib or 0) < spec.min_memory_gb * 1000 * 0.95:
        # nvidia-smi reports MiB of usable memory: an "80GB" H100 shows 81559 MiB, a "40GB" A100 40960.
        return False
    return True


def parse_key_values(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and " " not in key:
            out[key.strip()] = value.strip()
    return out


def parse_result_line(text: str) -> dict[str, Any] | None:
    """The last `@@result {json}` line a remote script printed, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER):])
            except json.JSONDecodeError:
                return None
    return None


_RSYNC_SENT = re.compile(r"Total bytes sent:\s*([\d,.]+)")
_RSYNC_FILES = re.compile(r"Number of regular files transferred:\s*([\d,.]+)")


def parse_rsync_stats(text: str) -> tuple[int, int]:
    """(bytes sent, regular files transferred) from `rsync --stats`."""
    def num(rx: re.Pattern) -> int:
        m = rx.search(text)
        return int(re.sub(r"[,.]", "", m.group(1))) if m else 0
    return num(_RSYNC_SENT), num(_RSYNC_FILES)


def parse_rsync_changed(text: str) -> list[str]:
    """Files rsync sent or deleted, from `--itemize-changes` lines (`>f.st...... path`, `*deleting path`)."""
    out = []
    for line in text.splitlines():
        if line.startswith((">f", "<f", "cL", ">L")) and " " in line:
            out.append(line.split(" ", 1)[1])
        elif line.startswith("*deleting "):
            out.append(line.split(" ", 1)[1].strip() + " (deleted)")
    return out


def tail(text: str, lines: int = 40, max_chars: int = 6000) -> str:
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-max_chars:]


def brief(text: str, lines: int = 3, max_chars: int = 300) -> str:
    """The last non-empty lines of an output as ONE line (for error messages: one line on stderr)."""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " / ".join(kept)[-max_chars:] or "no output"


def redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def parity_report(doc: Any) -> ParityReport | None:
    """The suite's document, typed (flashcore.parity/2, or /1 read as one run), or None when it is no such
    document. The typed reader lives beside the suite (flashcore.parity.results: pydantic, no torch import)."""
    if not isinstance(doc, dict):
        return None
    try:
        return ParityReport.from_dict(doc)
    except SchemaError:
        return None


def parity_summary(doc: dict[str, Any] | None) -> tuple[bool | None, str]:
    """(passed, one line) of a parity document: '9/9 scenarios passed on llama-3.1-8b; 9/9 scenarios passed on
    smollm2-135m', or (None, why it could not be read). Scenarios this reader does not know count like any
    other."""
    if not isinstance(doc, dict):
        return None, "no parity results"
    return summarize(doc)


def model_not_loaded(doc: dict[str, Any] | None) -> str:
    """Why the suite's models did not load ('' when every one did), from each run's typed `loaded` / `error`
    (a /1 document's wording is mapped to them by the reader). Not a parity failure: the kernels never ran."""
    report = parity_report(doc)
    return _not_loaded(report) if report is not None else ""


def _not_loaded(report: ParityReport) -> str:
    return "; ".join(run.error or f"model {run.model.preset!r} did not load" for run in report.runs if not run.loaded)


def parity_verdict(report: ParityReport | None) -> tuple[str, str]:
    """What a typed parity document (`parity_report`; None: there was none) says, in the one order every reader
    applies (SSH hosts, Slurm tasks): 'failed' when a model that loaded disagrees with the reference (the kernels'
    fault, exit 1, even beside a model that did not load), else 'not_loaded' when a model did not load (exit 5:
    the kernels never ran), else 'passed' or 'failed' as the document says; 'unreadable' when there is none. The
    second item is the one-line summary, or why the models did not load."""
    if report is None:
        return "unreadable", "no parity results"
    if any(run.loaded and not run.passed for run in report.runs):
        return "failed", summary_line(report)
    not_loaded = _not_loaded(report)
    if not_loaded:
        return "not_loaded", not_loaded
    return ("passed" if report.passed else "failed"), summary_line(report)


def install_spec_hash(reqs: list[str], python: str, wheel_names: list[str], install_script: bytes,
                      no_deps: list[str] = ()) -> str:
    """The key of a workspace venv: the dependency spec (with the pins installed without dependencies), the host
    python, the wheels and the install script."""
    spec = {"reqs": reqs, "python": python, "wheels": sorted(wheel_names)}
    if no_deps:          # (absent when empty: venvs built before such pins existed keep their key)
        spec["no_deps"] = list(no_deps)
    blob = json.dumps(spec, sort_keys=True).encode()
    return hashlib.sha256(blob + hashlib.sha256(install_script).digest()).hexdigest()[:16]
