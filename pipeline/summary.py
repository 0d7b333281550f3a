"""The fleet summary of one nightly run, beside the host reports:

    summary-<UTC>.md          templates/summary.md.j2: regressions first, then an Ansible-recap table (host, GPU,
                              verdict, failed step, duration, regression flags, trend sparkline, report link)
    summary-<UTC>.json        the same data (schema flashcore.fleet-summary/1)
    summary-<UTC>.junit.xml   one test case per host/GPU, one test suite per host (Jenkins / GitHub reporters)
    summary-<UTC>.rerun.txt   the hosts to run again (`--target @summary-<UTC>.rerun.txt`), when any failed

and the Markdown appended to $GITHUB_STEP_SUMMARY when that is set.

    Judge          called by the runner for each host as it finishes, before its report is written: every GPU's
                   record judged against its own earlier results, the regressions put at the top of that report
    finish_fleet() the one call after the hosts (any executor's: the SSH fleet, Slurm): the records not judged
                   yet, fleet-wide shifts, the history row, the summary files (`summary=False`: a single host's
                   run, history only), the exit code

Everything else here is pure.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import errors
from pipeline.gpu_result import GpuResult, gpu_results
from pipeline.history import HistoryStore, default_path
from pipeline.regression import Assessment, FleetShift, assess, fleet_shifts
from pipeline.report import reserve_stem
from pipeline.results import HostRunResult

SUMMARY_SCHEMA = "flashcore.fleet-summary/1"
TEMPLATE = "summary.md.j2"
SPARK_METRIC = "*.decode.cuda_graph.flashcore_ms"  # the trend shown per host/GPU: its first model's graphed step
SPARK_RUNS = 14
SPARK_CHARS = "▁▂▃▄▅▆▇█"
EXIT_REGRESSION = errors.EXIT_PARITY     # a confirmed regression fails the fleet like a failed validation
JUNIT_ERROR_STATES = ("error", "unreachable", "interrupted", "unknown")


def sparkline(values: Sequence[float | None]) -> str:
    """▁▂▃▄▅▆▇█ scaled between the series' min and max; a gap is a space, a flat series sits in the
    middle. (Eight lines of code: the PyPI `sparklines` package would be a dependency for nothing more.)"""
    nums = [v for v in values if v is not None]
    if not nums:
        return ""
    lo, hi = min(nums), max(nums)
    top = len(SPARK_CHARS) - 1
    return "".join(" " if v is None else SPARK_CHARS[top // 2 if hi == lo else round((v - lo) / (hi - lo) * top)]
                   for v in values)


def fleet_exit_code(results: Sequence[GpuResult], assessments: Sequence[Assessment],
                    host_codes: Sequence[int] = ()) -> int:
    """The worst host's or GPU's exit code (130 wins, as for hosts run one after another), and EXIT_REGRESSION when
    a regression is confirmed. `host_codes`: the hosts' own (a host can fail after its GPUs passed: the report)."""
    code = errors.overall_exit_code([*host_codes, *(r.exit_code for r in results)])
    if code <= 128 and any(a.regressed for a in assessments):
        code = max(code, EXIT_REGRESSION)
    return code


def rerun_hosts(results: Sequence[GpuResult]) -> list[str]:
    """Hosts with any GPU that ran and did not pass, in first-seen order."""
    return list(dict.fromkeys(r.host for r in results if r.ran and not r.passed))


def rerun_text(targets: Sequence[str], stem: str) -> str:
    return f"# the targets that did not pass in {stem}; run them again with --target @<this file>\n" + \
        "".join(f"{t}\n" for t in targets)


def _gpu_cell(r: GpuResult) -> str:
    """`gpu0 NVIDIA H100 80GB HBM3 (GPU-8020d172)`, `cpu` (ran without GPU) or `no GPU known` (stopped before)."""
    if r.gpu_index is None:
        return "cpu" if r.gpu_name == "cpu" else "no GPU known"
    return f"gpu{r.gpu_index} {r.gpu_name}" + (f" ({r.gpu_uuid[:12]})" if r.gpu_uuid else "")


def _report_link(report: str, report_dir: Path) -> str:
    """The host report as a link from the summary, which sits in the report folder too: a report named relative to
    that folder (what report.write records in `artifacts["report_md"]`, whatever the working directory) is the
    link itself; an absolute path is made relative to the folder."""
    if not report:
        return ""
    if not Path(report).is_absolute():
        return Path(report).as_posix()
    try:
        return Path(os.path.relpath(report, Path(report_dir).resolve())).as_posix()
    except ValueError:   # another drive (Windows): keep the path as it is
        return report


def spark_metric(r: GpuResult, past: Sequence[GpuResult]) -> str:
    """The metric of a row's trend: the first SPARK_METRIC of this result (its suite's first model), else of the
    latest earlier result that has one; '' when none has."""
    for rec in (r, *reversed(past)):
        name = next((m for m in rec.metrics if fnmatch.fnmatchcase(m, SPARK_METRIC)), "")
        if name:
            return name
    return ""


def _row(r: GpuResult, a: Assessment, past: Sequence[GpuResult], report_dir: Path) -> dict[str, Any]:
    metric = spark_metric(r, past)
    trend = [p.metrics.get(metric) for p in past if p.ran][-(SPARK_RUNS - 1):] + [r.metrics.get(metric)]
    trend = trend if any(v is not None for v in trend) else []
    return {
        "result": r.to_dict(), "label": r.label, "gpu": _gpu_cell(r), "status": r.status,
        "judgement": a.status if r.ran else "not run", "report_link": _report_link(r.report, report_dir),
        "flags": [f.text() for f in a.flags], "findings": [dataclasses.asdict(f) for f in a.flags],
        "regressions": [f.text() for f in a.findings if f.fatal],
        "suspicious": [f.text() for f in a.flags if not f.fatal and f.gate and f.label == "suspicious"],
        "trend": trend, "sparkline": sparkline(trend), "trend_metric": metric,
        "trend_model": metric.removesuffix(SPARK_METRIC.removeprefix("*")),
    }


def build_summary(results: Sequence[GpuResult], assessments: Sequence[Assessment],
                  pasts: Sequence[Sequence[GpuResult]], shifts: Sequence[FleetShift], *, report_dir: Path,
                  stem: str, started_at: str, finished_at: str, target: str, history: str,
                  host_codes: Sequence[int] = (), rerun_target: str = "") -> dict[str, Any]:
    """The summary document (pure): what the Markdown, the JSON and the JUnit XML are made from. `rerun`: what
    `--target @<rerun file>` runs again: the hosts that did not pass, or `rerun_target` when any did not (a Slurm
    cluster: its name; its nodes are not targets)."""
    rows = [_row(r, a, p, report_dir) for r, a, p in zip(results, assessments, pasts, strict=True)]
    ran = [r for r in results if r.ran]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    rerun = rerun_hosts(results)
    rerun = [rerun_target] if rerun and rerun_target else rerun
    return {
        "schema": SUMMARY_SCHEMA, "stem": stem, "target": target, "started_at": started_at,
        "finished_at": finished_at, "exit_code": fleet_exit_code(results, assessments, host_codes),
        "hosts": len({r.host for r in results}), "gpus": len(ran), "passed": sum(r.passed for r in ran),
        "counts": counts, "rows": rows,
        "regressions": [f"{row['label']}: {t}" for row in rows for t in row["regressions"]],
        "suspicious": [f"{row['label']}: {t}" for row in rows for t in row["suspicious"]],
        "shifts": [s.text() for s in shifts], "rerun": rerun,
        "rerun_file": f"{stem}.rerun.txt" if rerun else "", "history": history,
        "metric": SPARK_METRIC,
    }


def render_markdown(doc: Mapping[str, Any], template: str | Path | None = None) -> str:
    from pipeline.report import TEMPLATES, environment
    path = Path(template) if template else TEMPLATES / TEMPLATE
    return environment(path).get_template(path.name).render(s=doc)


def junit_xml(doc: Mapping[str, Any]) -> str:
    """JUnit XML as Jenkins' junit plugin and GitHub's JUnit reporters read it: <testsuites> with the totals,
    one <testsuite> per host (name, tests, failures, errors, skipped, time, timestamp), one <testcase> per GPU
    (classname, name, time) holding <failure> (failed validation or a confirmed regression), <error> (the run
    broke: unreachable, a step error, interrupted), <skipped> (a GPU not validated) or nothing (passed)."""
    root = ET.Element("testsuites", name=f"flashcore nightly {doc['target']}".strip())
    by_host: dict[str, list[dict]] = {}
    for row in doc["rows"]:
        by_host.setdefault(row["result"]["host"], []).append(row)
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    total_time = 0.0
    for host, rows in by_host.items():
        suite = ET.SubElement(root, "testsuite", name=host, hostname=host, timestamp=doc["started_at"][:19])
        counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
        time_s = 0.0
        for row in rows:
            r = row["result"]
            case = ET.SubElement(suite, "testcase", classname=f"flashcore.nightly.{host.replace('.', '_')}",
                                 name=row["gpu"], time=f"{r['duration_s']:.3f}")
            counts["tests"] += 1
            time_s += r["duration_s"]
            kind = ("skipped" if r["status"] == "not run" else "error" if r["status"] in JUNIT_ERROR_STATES
                    else "failure" if r["status"] != "passed" or row["regressions"] else "")
            if kind:
                counts["errors" if kind == "error" else "failures" if kind == "failure" else "skipped"] += 1
                message = r["note"] if kind == "skipped" else \
                    "; ".join([r["verdict"]] * (r["status"] != "passed") + row["regressions"]) or r["verdict"]
                child = ET.SubElement(case, kind, message=message)
                if kind != "skipped":
                    child.set("type", "regression" if r["status"] == "passed" else r["status"])
                    child.text = "\n".join(filter(None, [f"failed step: {r['failed_step']}" if r["failed_step"]
                                                         else "", *row["flags"]]))
            out = [f"report: {row['report_link']}" if row["report_link"] else "", *row["flags"]]
            if any(out):
                ET.SubElement(case, "system-out").text = "\n".join(filter(None, out))
        for k, v in counts.items():
            suite.set(k, str(v))
            totals[k] += v
        suite.set("time", f"{time_s:.3f}")
        total_time += time_s
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_summary(doc: Mapping[str, Any], report_dir: Path, environ: Mapping[str, str] | None = None,
                  template: str | Path | None = None) -> dict[str, str]:
    """The files (and $GITHUB_STEP_SUMMARY); returns their paths by kind."""
    environ = os.environ if environ is None else environ
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = doc["stem"]
    markdown = render_markdown(doc, template)
    paths = {"md": report_dir / f"{stem}.md", "json": report_dir / f"{stem}.json",
             "junit": report_dir / f"{stem}.junit.xml"}
    paths["md"].write_text(markdown)
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["junit"].write_text(junit_xml(doc))
    if doc["rerun"]:
        paths["rerun"] = report_dir / doc["rerun_file"]
        paths["rerun"].write_text(rerun_text(doc["rerun"], stem))
    if environ.get("GITHUB_STEP_SUMMARY"):
        with open(environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as fh:
            fh.write(markdown + "\n")
        paths["github_step_summary"] = Path(environ["GITHUB_STEP_SUMMARY"])
    return {k: str(v) for k, v in paths.items()}


@dataclass
class FleetOutcome:
    exit_code: int
    paths: dict[str, str]
    doc: dict[str, Any]
    results: list[GpuResult] = field(default_factory=list)
    assessments: list[Assessment] = field(default_factory=list)


@dataclass
class _Judged:
    records: list[GpuResult]
    pasts: list[list[GpuResult]]
    assessments: list[Assessment]


class Judge:
    """The history's judgement of each host's run, made as the host finishes and before its report is written
    (`RunOptions.judge`): every GPU's record against the earlier results of its slot. The regressions go to the
    top of that report (`HostRunResult.regressions`, `.flags`). Thread-safe; nothing is written to the history
    here (finish_fleet records the whole run at its end, so every host is judged against the same past)."""

    def __init__(self, history: str | Path):
        self.path = Path(history)
        self._lock = threading.Lock()
        self._judged: dict[int, tuple[HostRunResult, _Judged]] = {}

    def __call__(self, result: HostRunResult) -> None:
        records = gpu_results(result)
        with HistoryStore(self.path) as store:
            pasts = [store.earlier(r) if r.ran else [] for r in records]
        assessments = [assess(r, p) for r, p in zip(records, pasts)]
        slot = {id(a): a.result.label.removeprefix(result.host).strip() or result.host for a in assessments}
        result.regressions = [f"{slot[id(a)]}: {f.text()}" for a in assessments for f in a.findings if f.fatal]
        result.flags = [f"{slot[id(a)]}: {f.text()}" for a in assessments for f in a.flags if not f.fatal]
        with self._lock:
            self._judged[id(result)] = (result, _Judged(records, pasts, assessments))

    def of(self, result: HostRunResult) -> _Judged:
        """The judgement of `result` (made now if it was not yet); its records name the report written since."""
        with self._lock:
            found = self._judged.get(id(result))
        if found is None:
            self(result)
            with self._lock:
                found = self._judged[id(result)]
        for record in found[1].records:       # judged before its report was written: the report's name is known now
            record.report = result.artifacts.get("report_md", "")
        return found[1]


def finish_fleet(host_results: Sequence[HostRunResult], report_dir: str | Path, *, history: str | Path | None = None,
                 target: str = "", started_at: str = "", environ: Mapping[str, str] | None = None,
                 template: str | Path | None = None, judge: Judge | None = None,
                 summary: bool = True, rerun_target: str = "") -> FleetOutcome:
    """After the hosts: judge every GPU not judged yet against the history, find fleet-wide shifts, record the
    run, write the summary files (unless `summary=False`: one host's run, history only). `history`: the store's
    path (default REPORT_DIR/history.sqlite); `judge`: the one the hosts' runs were judged by; `rerun_target`:
    the target the rerun file names instead of the hosts (build_summary)."""
    report_dir = Path(report_dir)
    now = datetime.now(timezone.utc)
    started = datetime.fromisoformat(started_at) if started_at else now
    judge = judge or Judge(history or default_path(report_dir))
    judged = [judge.of(h) for h in host_results]
    results = [r for j in judged for r in j.records]
    pasts = [p for j in judged for p in j.pasts]
    assessments = [a for j in judged for a in j.assessments]
    shifts = fleet_shifts(assessments)
    stem = reserve_stem(report_dir, "summary", started) if summary else ""   # never overwrites another
    with HistoryStore(judge.path) as store:
        doc = build_summary(results, assessments, pasts, shifts, report_dir=report_dir, stem=stem,
                            started_at=started.isoformat(), finished_at=now.isoformat(), target=target,
                            history=str(store.path), host_codes=[h.exit_code for h in host_results],
                            rerun_target=rerun_target)
        store.record_run(results, started_at=started.isoformat(), finished_at=now.isoformat(), target=target,
                         summary=f"{stem}.md" if summary else "", exit_code=doc["exit_code"])
    paths = write_summary(doc, report_dir, environ, template) if summary else {}
    return FleetOutcome(doc["exit_code"], paths, doc, results, assessments)
