"""One host's HostRunResult -> REPORT_DIR/<stem>.md (templates/report.md.j2, or a user's template) and the same
data as <stem>.json (schema flashcore.report/1). The Markdown is a pure view of that one typed result, rendered
once; secrets are scrubbed from both. A user's template that fails still leaves a report (the built-in template
writes it) and the run says why with a non-zero exit; a template that does not even parse is refused up front
(`check_template`, exit 2)."""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from flashcore.parity.results import ParityReport
from pipeline import parse
from pipeline.errors import EXIT_OK, EXIT_STEP, StepError, UsageError
from pipeline.results import HostRunResult, StepResult, SuiteRun

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_TEMPLATE = TEMPLATES / "report.md.j2"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "host"


def reserve_stem(report_dir: Path, host: str, started: datetime) -> str:
    """<host>-<UTC time>, claimed by creating its .json exclusively: two runs of one host within a second (or in
    two threads) never share a report."""
    base = f"{_slug(host)}-{started.strftime('%Y%m%dT%H%M%SZ')}"
    report_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        stem = base if n == 1 else f"{base}-{n}"
        try:
            with open(report_dir / f"{stem}.json", "x"):
                return stem
        except FileExistsError:
            continue
    raise StepError(f"{report_dir}: no free report name for {base}")


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if "." in f"{value:.{digits}f}" else str(value)
    return str(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _measured(value: Any) -> str:
    def one(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else _num(v)
    if isinstance(value, dict):
        return ", ".join(f"{k}={one(v)}" for k, v in value.items()) or "—"
    return one(value)


def _cell(value: Any) -> str:
    if value is None or value == "" or isinstance(value, jinja2.Undefined):
        return "—"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _ratio(value: Any) -> str:
    """A worst err/bound: 0.38, or "inf" / "nan" as the document stores them, or — (no bound)."""
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _cell(value)


def _clip(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def environment(template: Path | None = None) -> jinja2.Environment:
    """The jinja2 Environment of a template's folder, made once per folder: its templates are compiled once
    and kept (jinja2's own cache re-reads one only when its file changed), not once per report."""
    return _environment(str((template.parent if template else TEMPLATES).resolve()))


@functools.lru_cache(maxsize=16)
def _environment(folder: str) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([folder]), undefined=jinja2.ChainableUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(num=_num, bytes=_bytes, measured=_measured, cell=_cell, ratio=_ratio, clip=_clip,
                       legend=lambda doc: criteria_legend([parse.parity_report(doc)]), graphed=graphed_line,
                       parity_line=lambda doc: parse.parity_summary(doc)[1] if doc else "—")
    return env


@dataclass(frozen=True)
class ParitySection:
    """One suite's parity document as the report shows it: typed (flashcore.parity/2, a /1 document read as one
    run), or why there is none to show."""

    where: str                     # " — GPU 0 (GPU-…)" for one GPU's suite, "" for the host's one suite
    report: ParityReport | None
    problem: str = ""              # no report: "no parity results" or why the document could not be read


def parity_sections(result: HostRunResult) -> list[ParitySection]:
    """One section per suite: each GPU's (its own document), or the host's one suite."""
    suites = [(s.parity, _where(s)) for s in result.suites] if len(result.suites) > 1 else [(result.parity, "")]
    out = []
    for doc, where in suites:
        report = parse.parity_report(doc)
        out.append(ParitySection(where, report, "" if report else parse.parity_summary(doc)[1]))
    return out


def criteria_legend(reports) -> dict[str, str]:
    """Each distinct criterion text of every run of `reports` -> a short name (C1, C2 ... in order of first use):
    the tables show the name, the legend below them the text once."""
    names: dict[str, str] = {}
    for report in reports:
        for run in report.runs if report is not None else ():
            for s in run.scenarios if run.loaded else ():     # a model that did not load: nothing evaluated
                if s.criterion and s.criterion not in names:
                    names[s.criterion] = f"C{len(names) + 1}"
    return names


def graphed_line(doc: dict[str, Any] | None) -> str:
    """Per model, the CUDA-graph decode step flashcore / SDPA in ms (and with compiled blocks): the per-GPU
    table's cell, e.g. "llama-3.1-8b 8.69 / 10.45, compiled 7.23 / 9.02; smollm2-135m ..."."""
    report = parse.parity_report(doc)
    parts = []
    for run in report.runs if report is not None else ():
        rows = {row.mode: row for row in run.latency.rows}
        figures = [f"{'compiled ' if mode.endswith('compiled') else ''}{_num(rows[mode].flashcore_ms)} / "
                   f"{_num(rows[mode].sdpa_ms)}" for mode in ("cuda_graph", "cuda_graph_compiled") if mode in rows]
        if figures:
            parts.append(f"{run.model.preset} " + ", ".join(figures))
    return "; ".join(parts) or "—"


def _where(s: SuiteRun) -> str:
    return f" — GPU {s.gpu_index}" + (f" ({s.gpu_uuid})" if s.gpu_uuid else "")


def render_markdown(result: HostRunResult, template: str | Path | None = None) -> str:
    path = Path(template) if template else DEFAULT_TEMPLATE
    tpl = environment(path).get_template(path.name)
    per_gpu = [s for s in result.suites if s.gpu_index is not None]
    sections = parity_sections(result)
    if len(result.suites) > 1:
        summary = "; ".join(f"{s.tag}: {parse.parity_summary(s.parity)[1]}" for s in result.suites)
    else:
        _, summary = parse.parity_summary(result.parity)
    runs = [run for sec in sections if sec.report for run in sec.report.runs]
    failing = any(not run.passed for run in runs)
    models = list(dict.fromkeys(run.model.preset for run in runs))
    return tpl.render(r=result, parity=result.parity or {}, parity_summary=summary, failed=result.failed_steps,
                      per_gpu=per_gpu, sections=sections, criteria=criteria_legend(s.report for s in sections),
                      models=models, scenario_failures=failing)


def check_template(template: str | Path) -> None:
    """A user's template must exist and parse (before anything runs); a failure while rendering is caught later."""
    path = Path(template)
    if not path.is_file():
        raise UsageError(f"--template {template}: no such file")
    try:
        environment(path).get_template(path.name)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(f"--template {template}: line {e.lineno}: {e.message}") from None
    except (jinja2.TemplateError, OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--template {template}: {type(e).__name__}: {e}") from None


def check_report_dir(report_dir: str | Path) -> None:
    """The report folder can be created and written (before anything runs)."""
    p = Path(report_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--report-dir {report_dir}: cannot create it ({e.strerror})") from None
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"--report-dir {report_dir}: not a writable directory")


def _report_failed(result: HostRunResult, step: StepResult, why: str) -> None:
    step.status, step.detail = "failed", why
    if result.exit_code == EXIT_OK:
        result.verdict, result.exit_code, result.error = "ERROR: report step failed", EXIT_STEP, why


def write(result: HostRunResult, report_dir: Path, stem: str, template: str | Path | None = None,
          secrets: list[str] | None = None) -> None:
    """Write <stem>.md and <stem>.json into `report_dir`; the report step (appended to `result`) says how it went."""
    md_path, json_path = report_dir / f"{stem}.md", report_dir / f"{stem}.json"
    step = StepResult("report", "ok", detail=f"{md_path.name} + {json_path.name}")
    result.steps.append(step)
    result.artifacts.update(report_md=md_path.name, report_json=json_path.name)
    try:
        markdown = render_markdown(result, template)
    except Exception as e:  # noqa: BLE001 - a user's template must not cost the report
        _report_failed(result, step, f"template {template} failed ({type(e).__name__}: {e}); the built-in template "
                                     "wrote the report")
        markdown = render_markdown(result)
    for path, text in ((md_path, markdown), (json_path, json.dumps(result.to_dict(), indent=2, default=str) + "\n")):
        try:
            path.write_text(parse.redact(text, secrets or []))
        except OSError as e:
            _report_failed(result, step, f"cannot write {path} ({e.strerror})")
