"""One host's HostRunResult -> REPORT_DIR/<stem>.md (templates/report.md.j2, or a user's template) and the same
data as <stem>.json (schema flashcore.report/1). The Markdown is a pure view of that one typed result, rendered
once; secrets are scrubbed from both. A user's template that fails still leaves a report (the built-in template
writes it) and the run says why with a non-zero exit; a template that does not even parse is refused up front
(`check_template`, exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jinja2

from pipeline import parse
from pipeline.errors import EXIT_OK, EXIT_STEP, UsageError
from pipeline.results import HostRunResult, StepResult

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_TEMPLATE = TEMPLATES / "report.md.j2"


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


def environment(template: Path | None = None) -> jinja2.Environment:
    loader = jinja2.FileSystemLoader([str(template.parent)] if template else [str(TEMPLATES)])
    env = jinja2.Environment(loader=loader, undefined=jinja2.ChainableUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(num=_num, bytes=_bytes, measured=_measured, cell=_cell)
    return env


def criteria_legend(parity: dict[str, Any] | None) -> dict[str, str]:
    """Each distinct criterion text -> a short name (C1, C2 ... in order of first use): the table shows the
    name, the legend below it the text once."""
    names: dict[str, str] = {}
    for s in (parity or {}).get("scenarios") or []:
        text = str(s.get("criterion", "")) if isinstance(s, dict) else ""
        if text and text not in names:
            names[text] = f"C{len(names) + 1}"
    return names


def render_markdown(result: HostRunResult, template: str | Path | None = None) -> str:
    path = Path(template) if template else DEFAULT_TEMPLATE
    tpl = environment(path).get_template(path.name)
    _, summary = parse.parity_summary(result.parity)
    return tpl.render(r=result, parity=result.parity or {}, parity_summary=summary, failed=result.failed_steps,
                      criteria=criteria_legend(result.parity))


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
