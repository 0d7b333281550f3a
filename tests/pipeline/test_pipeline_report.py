"""The report: verdict first, every section, the parity/latency/memory tables from a flashcore.parity/1
document, failures with log excerpts, the JSON round trip, secrets scrubbed, a user's own template."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.report import render_markdown, write
from pipeline.results import REPORT_SCHEMA, GpuInfo, GpuProcess, HostRunResult, StepResult

FIX = Path(__file__).parent / "fixtures"


def _result(parity: str | None, **kw) -> HostRunResult:
    kw = {"device": "cuda", **kw}
    r = HostRunResult(host="gpu-box", address="127.0.0.1", port=2222, user="root", local=False,
                      model="llama-3.1-8b", require_gpu="H100", reproduce="flashcore-deploy --host x", **kw)
    r.gpus = [GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-1", "9.0", 81559, 1, "570.133.20", "12.8", 0, "Disabled",
                      [GpuProcess("GPU-1", 4242, "python", 512)])]
    r.versions = {"python": "3.12.3", "torch": "2.11.0+cu128", "torch_cuda": "12.8", "triton": "3.6.0",
                  "transformers": "5.17.0", "flashcore": "0.1.0", "flashcore_revision": "abc123def456"}
    r.sync.content_hash = "f" * 64
    r.steps = [StepResult("connect", "ok", 0.1, "ssh"), StepResult("gpu", "ok", 0.2, "1 x H100")]
    if parity:
        r.parity = json.loads((FIX / "parity" / parity).read_text())
    return r


def test_failed_parity_report_has_every_section_in_order():
    r = _result("fail_h100_synthetic.json", verdict="FAILED: parity", exit_code=1, error="parity failed: 1/2")
    r.steps.append(StepResult("suite", "failed", 300.0, "parity failed", "python -m pytest ...",
                              "E   AssertionError: row 2\nFAILED tests/parity/test_parity_suite.py::test_batch"))
    md = render_markdown(r)
    lines = md.splitlines()
    assert lines[0] == "# flashcore validation — gpu-box: FAILED: parity"
    assert lines[2].startswith("**Verdict: FAILED: parity**") and lines[3] == ""
    assert "| huggingface_hub | — |" in md
    order = ["**Verdict: FAILED: parity** (exit code 1)", "## Host and GPU", "## Versions", "## Steps", "## Parity",
             "## Decode latency", "## Memory", "## Failures", "## Reproduce"]
    positions = [md.index(s) for s in order]
    assert positions == sorted(positions)
    assert "| 0 | NVIDIA H100 80GB HBM3 | 9.0 | 1 / 81559 | 570.133.20 | 12.8 | 0 | Disabled | 4242 python (512 MiB) |" in md
    assert "| batch_4 | " in md and "| 3/4 rows within bounds (row 2 exceeds: err/bound 12.9) | **FAIL** |" in md
    assert "| single_token | C1 | " in md and "| batch_4 | C4 | " in md              # short names in the table
    assert md.count("per step err(flashcore vs fp32 ref)") == 3                  # ... each text once, in the legend
    assert "- **C1**: per step err(flashcore vs fp32 ref) <= 2*err(sdpa vs fp32 ref) + eps" in md
    assert "| max err flashcore 0.00353 vs sdpa 0.0037 (worst err/bound 0.38); top-1 agree 100% vs sdpa 100%; " \
           "confident mismatches 0/1 | pass |" in md
    assert "| cuda_graph | 8.9 | 10.55 | 1.19x | static cache |" in md
    assert "| 256.00 MiB | 1.00 GiB | 4x | 16.00 GiB |" in md
    assert "FAILED tests/parity/test_parity_suite.py::test_batch" in md      # log excerpt
    assert "row 2: max err 0.91 > bound 0.0705 at step 7" in md                               # failing scenario's detail
    assert "revision abc123def456, content ffffffffffffffff" in md
    assert "flashcore-deploy --host x" in md


def test_cpu_report_says_so_and_latency_skip_reason():
    r = _result("pass_cpu_tiny.json", verdict="PASSED", device="cpu")
    r.gpus = []
    r.notes.append("No GPU on this host: the parity suite ran the `tiny` preset on the CPU")
    md = render_markdown(r)
    assert "> No GPU on this host" in md and "No GPU found: the suite ran on the CPU." in md
    assert "Not measured: no CUDA device" in md
    assert "## Failures\n\nNone." in md


def test_report_without_parity_and_json_round_trip(tmp_path):
    r = _result(None, verdict="UNREACHABLE", exit_code=3, error="cannot connect")
    write(r, tmp_path, "gpu-box-20261125T120000Z")
    assert (tmp_path / "gpu-box-20261125T120000Z.md").is_file()
    doc = json.loads((tmp_path / "gpu-box-20261125T120000Z.json").read_text())
    assert doc["schema"] == REPORT_SCHEMA and doc["verdict"] == "UNREACHABLE"
    assert doc["steps"][-1]["name"] == "report" and doc["steps"][-1]["status"] == "ok"
    back = HostRunResult.from_dict(doc)
    assert back == r
    assert "No parity results" in (tmp_path / "gpu-box-20261125T120000Z.md").read_text()


def test_secrets_are_scrubbed_from_both_files(tmp_path):
    secret = "hf_ThisMustNeverBeWritten123"
    r = _result(None, verdict="ERROR: token step failed", exit_code=5, error=f"bad {secret}")
    r.steps.append(StepResult("token", "failed", 1.0, f"x {secret}", log_tail=secret))
    write(r, tmp_path, "s", secrets=[secret])
    for p in (tmp_path / "s.md", tmp_path / "s.json"):
        assert secret in r.error and secret not in p.read_text()


def test_user_template(tmp_path):
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text("{{ r.host }} => {{ r.verdict }} ({{ r.steps | length }} steps)\n")
    assert render_markdown(_result(None, verdict="PASSED"), tpl) == "gpu-box => PASSED (2 steps)\n"


def test_real_h100_parity_document_renders():
    """The parity suite's own fixture: a real llama-3.1-8b run on an H100 (tests/parity/fixtures)."""
    real = Path(__file__).resolve().parents[1] / "parity" / "fixtures" / "parity-llama-3.1-8b-h100.json"
    if not real.exists():
        import pytest
        pytest.skip("the parity suite's H100 fixture is not in this checkout")
    r = _result(None, verdict="PASSED")
    r.parity = json.loads(real.read_text())
    md = render_markdown(r)
    assert "| eager | 46.311 | 64.634 | 1.4x |" in md
    assert "| cuda_graph | 8.692 | 10.448 | 1.2x |" in md
    assert "| 16.88 MiB | 67.50 MiB | 4x | 44.94 GiB |" in md
    assert md.count("| pass |") == 5 and "**FAIL**" not in md


def test_rendered_once_relative_links_start_in_seconds_left_behind(tmp_path, monkeypatch):
    from pipeline import report

    r = _result("pass_cpu_tiny.json", verdict="UNREACHABLE", exit_code=3, started_at="2026-11-25T12:00:00+00:00")
    r.artifacts = {"parity.json": "gpu-box-20261125T120000Z/parity.json", "suite.log": "gpu box/suite.log"}
    r.left_behind = ["the token file /w/.flashcore/hf_token"]
    calls = []
    real = report.render_markdown
    monkeypatch.setattr(report, "render_markdown", lambda *a, **k: calls.append(1) or real(*a, **k))
    report.write(r, tmp_path, "s")
    assert len(calls) == 1                                               # one typed result, rendered once
    md = (tmp_path / "s.md").read_text()
    assert "[parity.json](gpu-box-20261125T120000Z/parity.json)" in md and "[suite.log](gpu%20box/suite.log)" in md
    assert "[report_md](s.md)" in md and str(tmp_path) not in md       # relative to the report's folder
    assert "| Started | 2026-11-25T12:00:00+00:00 (" in md
    assert "### Possibly left on the host\n\n- the token file /w/.flashcore/hf_token" in md
    assert "## Failures\n\nNone." not in md


def _two_gpus() -> HostRunResult:
    """A 2-GPU host: GPU 0 passes, GPU 1 fails parity (its suite's own document)."""
    from pipeline.results import SuiteRun
    passing = json.loads((FIX / "parity" / "pass_cpu_tiny.json").read_text())
    failing = json.loads((FIX / "parity" / "fail_h100_synthetic.json").read_text())
    r = _result(None, verdict="FAILED: parity", exit_code=1, error="GPU 1 (GPU-2): parity failed: 3/4")
    r.gpus.append(GpuInfo(1, "NVIDIA H100 80GB HBM3", "GPU-2", "9.0", 81559, 1, "570.133.20", "12.8", 0, "Disabled"))
    r.suites = [SuiteRun(0, "GPU-1", "NVIDIA H100 80GB HBM3", "0", "ok", "PASSED", 0, duration_s=61.0,
                         busy="1 process: pid 4242 python (512 MiB)", parity=passing,
                         artifacts={"parity.json": "s/gpu0/parity.json"}),
                SuiteRun(1, "GPU-2", "NVIDIA H100 80GB HBM3", "1", "failed", "FAILED: parity", 1,
                         "parity failed: 3/4 scenarios passed (failed: batch_4)", 63.5, parity=failing,
                         command="python -m pytest ...", log_tail="FAILED test_batch")]
    r.steps.append(StepResult("suite", "failed", 64.0, "gpu0: 5/5 ...; gpu1: parity failed"))
    return r


def test_a_row_per_gpu_and_each_gpus_own_parity():
    md = render_markdown(_two_gpus())
    assert "## Per GPU" in md and md.index("## Per GPU") < md.index("## Host and GPU")
    assert "| 0 | GPU-1 | NVIDIA H100 80GB HBM3 | PASSED | 5/5 scenarios passed | — | 61 | 1 process: pid 4242 " \
           "python (512 MiB) | [parity.json](s/gpu0/parity.json) |" in md
    assert "| 1 | GPU-2 | NVIDIA H100 80GB HBM3 | **FAILED: parity**: parity failed: 3/4 scenarios passed (failed: " \
           "batch_4) | 4/5 scenarios passed (failed: batch_4) | 8.9 / 10.55 | 63.5 | — | — |" in md
    assert "| Parity | gpu0: 5/5 scenarios passed; gpu1: 4/5 scenarios passed (failed: batch_4) |" in md
    order = ["## Parity — GPU 0 (GPU-1)", "## Decode latency: flashcore vs SDPA — GPU 0 (GPU-1)",
             "## Parity — GPU 1 (GPU-2)", "## Memory — GPU 1 (GPU-2)", "## Failures"]
    assert [md.index(s) for s in order] == sorted(md.index(s) for s in order)
    assert "### suite on GPU 1: parity failed: 3/4" in md and "FAILED test_batch" in md
    assert "### scenario batch_4 — GPU 1 (GPU-2): 3/4 rows within bounds" in md
    assert "### suite: gpu0" not in md                       # the combined step is told per GPU instead


def test_regressions_at_the_top_and_the_template_compiled_once(monkeypatch):
    import jinja2

    from pipeline import report
    r = _result("pass_cpu_tiny.json", verdict="PASSED")
    r.regressions = ["gpu0: decode.cuda_graph.flashcore_ms 9.962 vs 8.662 (+15%, 5.0 noise units): regression"]
    r.flags = ["gpu0: decode.eager.flashcore_ms 60 vs 46 (+30%): suspicious"]
    report._environment.cache_clear()
    compiled = []
    real = jinja2.Environment.compile
    monkeypatch.setattr(jinja2.Environment, "compile", lambda self, *a, **k: compiled.append(1) or real(self, *a, **k))
    for _ in range(20):
        md = render_markdown(r)
    assert len(compiled) == 1                                 # once, not once per report
    lines = md.splitlines()
    assert lines[0] == "# flashcore validation — gpu-box: PASSED, REGRESSION"
    assert md.index("## Regressions") < md.index("Also flagged:") < md.index("## Host and GPU")
    assert "- **gpu0: decode.cuda_graph.flashcore_ms 9.962 vs 8.662" in md and "- gpu0: decode.eager" in md
