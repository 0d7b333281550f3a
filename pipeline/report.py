"""Render one host's HostRunResult: templates/report.md.j2 (or a user's template) -> REPORT_DIR/<stem>.md, and
the same data as <stem>.json (schema flashcore.report/1) beside it. Secrets are scrubbed from both."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jinja2

from pipeline import parse
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


def render_markdown(result: HostRunResult, template: str | Path | None = None) -> str:
    path = Path(template) if template else DEFAULT_TEMPLATE
    env = environment(path)
    tpl = env.get_template(path.name)
    _, summary = parse.parity_summary(result.parity)
    return tpl.render(r=result, parity=result.parity or {}, parity_summary=summary,
                      failed=result.failed_steps)


def write_report(result: HostRunResult, report_dir: Path, stem: str, template: str | Path | None = None,
                 secrets: list[str] | None = None, report_step_start: float | None = None) -> dict[str, str]:
    report_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = report_dir / f"{stem}.md", report_dir / f"{stem}.json"
    step = StepResult("report", "ok", detail=f"{md_path} + {json_path.name}")
    result.steps.append(step)
    result.artifacts.update(report_md=str(md_path), report_json=str(json_path))
    start = report_step_start if report_step_start is not None else time.monotonic()
    render_markdown(result, template)  # a timing pass: the report shows its own step's duration (a few ms)
    step.duration_s = round(time.monotonic() - start, 3)
    markdown = render_markdown(result, template)
    md_path.write_text(parse.redact(markdown, secrets or []))
    json_path.write_text(parse.redact(json.dumps(result.to_dict(), indent=2, default=str), secrets or []) + "\n")
    return {"md": str(md_path), "json": str(json_path)}
