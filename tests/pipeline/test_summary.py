"""The fleet summary (pipeline/summary.py) over several nights of a real history file: Markdown (regressions at
the top, the recap, sparklines, relative report links), JSON, JUnit XML checked the way Jenkins and GitHub
reporters read it (and the checker itself checked on pytest's own JUnit output), the rerun file, the
$GITHUB_STEP_SUMMARY append, and the exit code.

The host results are the real H100 report (docs/reports) and edited copies of it: later nights, a slower graphed
decode step, a failing two-GPU host, an unreachable one (synthetic, built with the real types)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.gpu_result import GpuResult
from pipeline.regression import Assessment, Finding
from pipeline.results import GpuInfo, HostRunResult, StepResult, SuiteRun
from pipeline.inventory import parse_target_file
from pipeline.summary import Judge, finish_fleet, fleet_exit_code, junit_xml, rerun_text, sparkline

ROOT = Path(__file__).resolve().parents[2]
REAL_REPORT = ROOT / "docs/reports/127.0.0.1_2222-20261125T131741Z.json"
FAIL_DOC = Path(__file__).parent / "fixtures/parity/fail_h100_synthetic.json"
GRAPHED = "llama-3.1-8b.decode.cuda_graph.flashcore_ms"
RATIO = "llama-3.1-8b.decode.cuda_graph.ratio"


# ------------------------------------------------------------------------------------------------ JUnit checker


def junit_problems(text: str) -> list[str]:
    """What a JUnit consumer needs, after the format Jenkins' junit plugin reads (the JUnit.xsd of the Ant/Jenkins
    lineage) and GitHub reporters (dorny/test-reporter, mikepenz/action-junit-report) parse: a <testsuites> or
    <testsuite> root; every <testsuite> with a name and counts (tests, failures, errors, skipped) equal to its
    children; every <testcase> with name, classname and a numeric time; at most one of <failure>, <error>,
    <skipped> per case, <failure>/<error> with a message; totals on <testsuites>, when given (pytest gives none),
    equal to the suites' sums."""
    problems = []
    root = ET.fromstring(text)
    suites = [root] if root.tag == "testsuite" else list(root) if root.tag == "testsuites" else []
    if not suites:
        return [f"root is <{root.tag}>"]
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in suites:
        if suite.tag != "testsuite" or not suite.get("name"):
            problems.append(f"bad suite {suite.tag} {suite.attrib}")
            continue
        cases = suite.findall("testcase")
        outcome = {"failures": "failure", "errors": "error", "skipped": "skipped"}
        counts = {"tests": len(cases), **{k: sum(c.find(v) is not None for c in cases) for k, v in outcome.items()}}
        for k, v in counts.items():
            if int(suite.get(k, "0")) != v:
                problems.append(f"suite {suite.get('name')}: {k}={suite.get(k)} but {v} cases")
            totals[k] += v
        for c in cases:
            if not c.get("name") or not c.get("classname"):
                problems.append(f"case without name/classname: {c.attrib}")
            float(c.get("time", "x"))
            kinds = [x for x in c if x.tag in ("failure", "error", "skipped")]
            if len(kinds) > 1:
                problems.append(f"case {c.get('name')}: {len(kinds)} outcomes")
            if kinds and kinds[0].tag != "skipped" and not kinds[0].get("message"):
                problems.append(f"case {c.get('name')}: {kinds[0].tag} without message")
    if root.tag == "testsuites":
        problems += [f"testsuites {k}={root.get(k)} != {v}" for k, v in totals.items()
                     if root.get(k) is not None and int(root.get(k)) != v]      # optional there, right if given
    return problems


def test_the_checker_accepts_pytests_own_junit_and_catches_a_bad_count(tmp_path):
    (tmp_path / "test_x.py").write_text("import pytest\ndef test_ok(): pass\ndef test_bad(): assert 0\n"
                                        "@pytest.mark.skip('no')\ndef test_skip(): pass\n")
    out = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_x.py"),
                    f"--junitxml={out}", "--rootdir", str(tmp_path)], capture_output=True, cwd=tmp_path)
    real = out.read_text()
    assert junit_problems(real) == []
    assert junit_problems(real.replace('failures="1"', 'failures="0"', 1))


# ---------------------------------------------------------------------------------------------------- nights


def _real() -> HostRunResult:
    return HostRunResult.from_dict(json.loads(REAL_REPORT.read_text()))


def _h100(host: str, day: int, slow: float = 1.0, report_dir: Path | None = None) -> HostRunResult:
    r = _real()
    r.host, r.started_at = host, f"2026-12-{day:02d}T02:17:00+00:00"
    r.parity = copy.deepcopy(r.parity)
    for row in r.parity["latency"]["rows"]:
        if row["mode"] == "cuda_graph":
            row["flashcore_ms"] *= slow
    if report_dir is not None:   # a host report file the summary links to, named as report.write names it
        md = report_dir / f"{host}-202612{day:02d}T021700Z.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(f"# flashcore validation — {host}: PASSED\n")
        r.artifacts["report_md"] = md.name
    return r


def _two_gpu_failing(day: int, report_dir: Path) -> HostRunResult:
    """A 2-GPU host as the runner reports it: a suite per GPU, GPU 0 failing parity, GPU 1 passing."""
    r = _h100("lab-b", day, report_dir=report_dir)
    r.verdict, r.exit_code = "FAILED: parity", 1
    r.gpus = r.gpus + [GpuInfo(1, r.gpus[0].name, "GPU-second-card", driver_version=r.gpus[0].driver_version)]
    r.suites = [SuiteRun(0, r.gpus[0].uuid, r.gpus[0].name, "0", "failed", "FAILED: parity", 1,
                         parity=json.loads(FAIL_DOC.read_text())),
                SuiteRun(1, "GPU-second-card", r.gpus[0].name, "1", "ok", "PASSED", 0, parity=r.parity)]
    r.parity = None
    r.steps = [StepResult("connect", "ok"), StepResult("suite", "failed", 41.8, "gpu0: parity failed; gpu1: ok")]
    return r


def _unreachable(day: int) -> HostRunResult:
    return HostRunResult(host="lab-c", address="203.0.113.9", port=22, user="root", local=False,
                         model="llama-3.1-8b", verdict="UNREACHABLE", exit_code=3, duration_s=10.2,
                         started_at=f"2026-12-{day:02d}T02:17:00+00:00",
                         steps=[StepResult("connect", "failed", 10.2, "timed out")])


def _night(report_dir: Path, day: int, slow: float, env: dict) -> object:
    hosts = [_h100("h100-a", day, slow, report_dir), _two_gpu_failing(day, report_dir), _unreachable(day)]
    return finish_fleet(hosts, report_dir, target="nightly", started_at=f"2026-12-{day:02d}T02:17:00+00:00",
                        environ=env)


def test_nights_build_up_to_a_regression_at_the_top(tmp_path):
    reports = tmp_path / "reports"
    step_summary = tmp_path / "gh-step-summary.md"
    env = {"GITHUB_STEP_SUMMARY": str(step_summary)}
    outs = [_night(reports, day, slow, env) for day, slow in
            [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.15), (6, 1.15)]]
    assert [o.exit_code for o in outs] == [3] * 6          # lab-c unreachable every night: the worst host
    first, fifth, last = outs[0], outs[4], outs[5]
    assert first.doc["regressions"] == [] and "## Regressions" not in Path(first.paths["md"]).read_text()
    assert fifth.doc["regressions"] == [] and any(GRAPHED in s for s in fifth.doc["suspicious"])

    md = Path(last.paths["md"]).read_text()
    lines = md.splitlines()
    assert lines[0] == "# flashcore nightly — nightly: REGRESSION"
    assert lines[2].startswith("**2 of 4 host/GPU runs passed** on 3 hosts (exit code 3), started 2026-12-06 "
                               "02:17:00 UTC") and "1 failed" in lines[2] and "1 unreachable" in lines[2]
    assert md.index("## Regressions") < md.index("## Recap")
    assert f"- **h100-a gpu0: {GRAPHED} 9.962 vs 8.662 (+15%, 5.0 noise units): regression**" in md
    assert RATIO in md.split("## Recap")[0]
    row = next(ln for ln in lines if ln.startswith("| h100-a |"))
    assert "| PASSED | — |" in row and "**regression**" in row
    link = row.split("[report](")[1].split(")")[0]
    assert (reports / link).is_file() and not Path(link).is_absolute()
    spark = row.split("`")[1]
    assert len(spark) == 6 and spark[-1] == "█" and len(set(spark[:4])) == 1       # flat, then up
    assert f"`{spark}` 9.96 (llama-3.1-8b) |" in row                              # the trend's model named
    assert "| lab-b | gpu0 NVIDIA H100 80GB HBM3 (GPU-4af987a7) | FAILED: parity | suite |" in md
    assert "| lab-b | gpu1 NVIDIA H100 80GB HBM3 (GPU-second-c) | PASSED | — |" in md      # judged apart
    assert "| lab-c | no GPU known | UNREACHABLE | connect | 10.2 | — | — | — |" in md
    assert "--target @" + last.doc["rerun_file"] in md

    doc = json.loads(Path(last.paths["json"]).read_text())
    assert doc["schema"] == "flashcore.fleet-summary/1" and doc["exit_code"] == 3 and doc["rerun"] == ["lab-b", "lab-c"]
    a_row = doc["rows"][0]
    assert a_row["judgement"] == "regression" and a_row["trend"][-1] == pytest.approx(8.662377312500524 * 1.15)
    fatal = {f["metric"] for f in a_row["findings"] if f["label"] == "regression"}
    assert fatal == {GRAPHED, RATIO}
    assert a_row["trend_metric"] == GRAPHED and a_row["trend_model"] == "llama-3.1-8b"

    assert parse_target_file(Path(last.paths["rerun"]).read_text()) == ["lab-b", "lab-c"]
    assert step_summary.read_text().count("# flashcore nightly — nightly:") == 6     # appended each night
    assert len(list(reports.glob("summary-*.md"))) == 6


def test_junit_of_a_night(tmp_path):
    out = _night(tmp_path, 1, 1.0, {})
    text = Path(out.paths["junit"]).read_text()
    assert junit_problems(text) == []
    root = ET.fromstring(text)
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("4", "1", "1", "0")
    suites = {s.get("name"): s for s in root}
    assert list(suites) == ["h100-a", "lab-b", "lab-c"]
    b0, b1 = suites["lab-b"].findall("testcase")
    fail = b0.find("failure")
    assert (fail.get("type"), fail.get("message")) == ("failed", "FAILED: parity")
    assert "failed step: suite" in fail.text
    assert [x.tag for x in b1] == ["system-out"]                         # GPU 1 passed: its own test case
    err = suites["lab-c"].find("testcase/error")
    assert (err.get("type"), err.get("message")) == ("unreachable", "UNREACHABLE")
    a = suites["h100-a"].find("testcase")
    assert list(a.iter("failure")) == [] and a.get("classname") == "flashcore.nightly.h100-a"
    assert float(a.get("time")) == pytest.approx(121.775)


def test_junit_marks_a_regression_on_a_passing_gpu_as_a_failure():
    r = GpuResult("10.0.0.5", 0, "GPU-x", "H100", status="passed", verdict="PASSED", duration_s=5.0)
    f = Finding("10.0.0.5", r.label, GRAPHED, "regression", value=10.0, baseline=8.0, noise=0.3, change=0.25)
    doc = {"target": "", "started_at": "2026-12-01T02:17:00+00:00", "rows": [
        {"result": r.to_dict(), "gpu": "gpu0 H100", "report_link": "", "flags": [f.text()],
         "regressions": [f.text()]}]}
    text = junit_xml(doc)
    assert junit_problems(text) == []
    case = ET.fromstring(text).find("testsuite/testcase")
    assert case.get("classname") == "flashcore.nightly.10_0_0_5"     # dots would read as Java packages
    assert case.find("failure").get("type") == "regression" and GRAPHED in case.find("failure").get("message")


def _ran(code: int) -> GpuResult:
    return GpuResult("h", 0, exit_code=code, status="passed" if code == 0 else "failed")


def _regressed() -> Assessment:
    return Assessment(_ran(0), [Finding("h", "h gpu0", GRAPHED, "regression")])


def test_fleet_exit_code_is_the_worst_130_wins_and_regressions_fail():
    assert fleet_exit_code([_ran(0), _ran(0)], []) == 0
    assert fleet_exit_code([_ran(0), _ran(5), _ran(3)], []) == 5
    assert fleet_exit_code([_ran(0), _ran(0)], [_regressed()]) == 1
    assert fleet_exit_code([_ran(5)], [_regressed()]) == 5
    assert fleet_exit_code([_ran(5), _ran(130), _ran(1)], [_regressed()]) == 130


def test_sparkline():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0, 5.0, 5.0]) == "▄▄▄"
    assert sparkline([1.0, None, 2.0]) == "▁ █"
    assert sparkline([]) == "" and sparkline([None]) == ""


def test_rerun_file_round_trip():
    text = rerun_text(["lab-b", "10.0.0.7:2222"], "summary-20261201T021700Z")
    assert text.startswith("# ") and parse_target_file(text + "\n  # a comment\nlab-d  # inline\n") == \
        ["lab-b", "10.0.0.7:2222", "lab-d"]


def test_two_summaries_in_one_second_do_not_overwrite(tmp_path):
    a = _night(tmp_path, 1, 1.0, {})
    b = _night(tmp_path, 1, 1.0, {})
    assert a.paths["md"] != b.paths["md"] and b.paths["md"].endswith("-2.md")


def test_a_host_judged_before_its_report_was_written_is_linked_to_it(tmp_path):
    """The runner judges a host before writing its report (the regressions go to its top), so the report's name
    is not known at the judgement: the summary still links it, relative to its own folder."""
    reports = tmp_path / "reports"
    host = _two_gpu_failing(1, reports)
    name = host.artifacts.pop("report_md")
    judge = Judge(reports / "history.sqlite")
    judge(host)
    host.artifacts["report_md"] = name                         # report.write names it afterwards
    out = finish_fleet([host], reports, judge=judge, target="nightly")
    assert [row["report_link"] for row in out.doc["rows"]] == [name, name]
    assert f"[report]({name})" in Path(out.paths["md"]).read_text()


def test_a_cluster_is_run_again_by_its_name_not_its_nodes(tmp_path):
    """A Slurm cluster's results are its nodes (not targets): the rerun file names the cluster."""
    out = finish_fleet([_two_gpu_failing(1, tmp_path), _unreachable(1)], tmp_path, target="lab", rerun_target="lab")
    assert out.doc["rerun"] == ["lab"] and parse_target_file(Path(out.paths["rerun"]).read_text()) == ["lab"]
    passing = finish_fleet([_h100("node-1", 2)], tmp_path, target="lab", rerun_target="lab")
    assert passing.doc["rerun"] == [] and "rerun" not in passing.paths
