"""Per-GPU records from today's HostRunResult: per-model metrics out of real parity documents (the H100 8B run and
the CPU tiny run of the /1 suite, read as one run; a /2 document with two models), unknown scenarios/modes
tolerated, a model that did not load giving no metric and no scenario verdict, one record per GPU (GPU 0 ran, the
others named "not run"), statuses, versions, and the JSON round trip."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from pipeline.gpu_result import GpuResult, gpu_results, parity_metrics, scenario_verdicts, status_for
from pipeline.results import GpuInfo, HostRunResult, StepResult

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[2]
H100_DOC = ROOT / "tests" / "parity" / "fixtures" / "parity-llama-3.1-8b-h100.json"
H100_REPORT = ROOT / "docs" / "reports" / "127.0.0.1_2222-20261125T131741Z.json"
TWO_MODELS = "pass_cpu_two_models.json"          # a real /2 document: tiny and smollm2-135m on this CPU
TWO_MODELS_PATH = FIX / "parity" / TWO_MODELS
ONE_NOT_LOADED = "two_models_one_not_loaded.json"


def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


def test_metrics_of_the_real_h100_document():
    """A /1 document (one model, llama-3.1-8b) still yields its metrics, named like a /2 document's run."""
    m = parity_metrics(_doc(H100_DOC))
    assert m["llama-3.1-8b.decode.cuda_graph.flashcore_ms"] == pytest.approx(8.691689968749916)
    assert m["llama-3.1-8b.decode.cuda_graph.sdpa_ms"] == pytest.approx(10.4476094999999)
    assert m["llama-3.1-8b.decode.cuda_graph.ratio"] == pytest.approx(8.691689968749916 / 10.4476094999999)
    assert m["llama-3.1-8b.decode.eager.flashcore_ms"] == pytest.approx(46.31110037500008)
    assert m["llama-3.1-8b.err_bound.single_token"] == pytest.approx(0.42279887199401855)
    assert m["llama-3.1-8b.err_bound.batch_4"] == pytest.approx(0.4884451627731323)   # the worst of its four rows
    assert "llama-3.1-8b.err_bound.gqa_memory" not in m                                # no error bound there
    assert m["suite_duration_s"] == pytest.approx(64.58)
    assert scenario_verdicts(_doc(H100_DOC)) == {f"llama-3.1-8b.{s}": True for s in
                                                 ("single_token", "generate_50", "generate_200", "gqa_memory", "batch_4")}


def test_cpu_document_has_margins_but_no_latency():
    m = parity_metrics(_doc(FIX / "parity" / "pass_cpu_tiny.json"))
    assert not [k for k in m if ".decode." in k]                # latency skipped on the CPU
    assert {k for k in m if ".err_bound." in k} == {f"tiny.err_bound.{s}" for s in
                                                    ("single_token", "generate_50", "generate_200", "batch_4")}


def test_two_models_each_with_their_own_prefix():
    doc = _doc(FIX / "parity" / TWO_MODELS)
    m, verdicts = parity_metrics(doc), scenario_verdicts(doc)
    models = [run["model"]["preset"] for run in doc["runs"]]
    assert models == ["tiny", "smollm2-135m"]
    for run in doc["runs"]:
        model = run["model"]["preset"]
        for s in run["scenarios"]:
            assert m[f"{model}.err_bound.{s['name']}"] == pytest.approx(s["worst_err_over_bound"])
            assert verdicts[f"{model}.{s['name']}"] is s["passed"]
        assert m[f"{model}.duration_s"] == run["duration_s"]
    assert m["suite_duration_s"] == doc["duration_s"] and len(verdicts) == 2 * len(doc["runs"][0]["scenarios"])


def test_a_model_that_did_not_load_gives_no_metric_and_no_scenario_verdict():
    """Its scenarios "failed" unevaluated: recording them would make the next night's "newly fails" a regression
    (exit 1) for what is a step error (exit 5)."""
    doc = _doc(FIX / "parity" / ONE_NOT_LOADED)
    m, verdicts = parity_metrics(doc), scenario_verdicts(doc)
    assert m and not [k for k in m if k.startswith("smollm2-135m.")]
    assert verdicts and not [k for k in verdicts if k.startswith("smollm2-135m.")]


def test_unknown_scenarios_and_modes_are_kept_and_malformed_documents_give_nothing():
    doc = copy.deepcopy(_doc(TWO_MODELS_PATH))
    run = doc["runs"][0]
    run["scenarios"].append({**run["scenarios"][0], "name": "sliding_window", "passed": False,
                             "worst_err_over_bound": 1.7, "new_field": [1]})
    run["passed"] = doc["passed"] = False
    run["latency"]["rows"] += [{"mode": "paged", "flashcore_ms": 7.5, "sdpa_ms": 0, "speedup": None},   # no ratio
                               {"mode": "nan", "flashcore_ms": "nan", "sdpa_ms": 3.0, "speedup": None}]
    m = parity_metrics(doc)
    assert m["tiny.err_bound.sliding_window"] == 1.7 and scenario_verdicts(doc)["tiny.sliding_window"] is False
    assert m["tiny.decode.paged.flashcore_ms"] == 7.5 and "tiny.decode.paged.ratio" not in m
    assert "tiny.decode.nan.flashcore_ms" not in m and m["tiny.decode.nan.sdpa_ms"] == 3.0
    doc["runs"][0]["scenarios"].append({"passed": True})                    # no name: not a parity document
    assert parity_metrics(doc) == {} and scenario_verdicts(doc) == {}
    assert parity_metrics(None) == {} and parity_metrics({"latency": "x", "scenarios": None}) == {}


def test_real_report_gives_one_record_with_its_facts():
    r = HostRunResult.from_dict(_doc(H100_REPORT))
    [g] = gpu_results(r)
    assert (g.host, g.gpu_index, g.gpu_name, g.status, g.verdict, g.exit_code) == \
        ("127.0.0.1:2222", 0, "NVIDIA H100 80GB HBM3", "passed", "PASSED", 0)
    assert g.gpu_uuid.startswith("GPU-") and g.label == "127.0.0.1:2222 gpu0"
    assert g.versions["driver"] == "580.159.04" and g.versions["torch"] == "2.11.0+cu130"
    assert g.versions["cuda"] == "13.0" and g.versions["transformers"] == "5.17.0"
    assert g.versions["code"] == r.versions["flashcore_content_hash"]
    assert g.metrics["llama-3.1-8b.decode.cuda_graph.flashcore_ms"] == pytest.approx(8.662377312500524)
    assert g.duration_s == r.duration_s and g.started_at == r.started_at and not g.failed_step


def _multi_gpu_failed() -> HostRunResult:
    r = HostRunResult(host="lab-b", address="10.0.0.2", port=22, user="root", local=False, model="llama-3.1-8b",
                      device="cuda", verdict="FAILED: parity", exit_code=1, duration_s=300.0,
                      started_at="2026-11-26T02:17:00+00:00", artifacts={"report_md": "reports/lab-b-x.md"})
    r.gpus = [GpuInfo(1, "NVIDIA H100 80GB HBM3", "GPU-bbb", driver_version="580.1"),
              GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-aaa", driver_version="580.1")]
    r.steps = [StepResult("connect", "ok"), StepResult("suite", "failed", 290.0, "parity failed")]
    r.parity = _doc(FIX / "parity" / "fail_h100_synthetic.json")
    return r


def test_two_gpus_today_one_ran_one_named_not_run():
    g0, g1 = gpu_results(_multi_gpu_failed())
    assert (g0.gpu_index, g0.gpu_uuid, g0.status, g0.failed_step, g0.exit_code) == (0, "GPU-aaa", "failed", "suite", 1)
    assert g0.scenarios["llama-3.1-8b.batch_4"] is False and g0.metrics and g0.report == "reports/lab-b-x.md"
    assert (g1.gpu_index, g1.gpu_uuid, g1.status, g1.ran) == (1, "GPU-bbb", "not run", False)
    assert not g1.metrics and g1.exit_code == 0 and "GPU 0 only" in g1.note


def test_unreachable_and_cpu_hosts():
    down = HostRunResult(host="lab-c", address="10.0.0.3", port=22, user="root", local=False, model="m",
                         verdict="UNREACHABLE", exit_code=3, steps=[StepResult("connect", "failed")])
    [g] = gpu_results(down)
    assert (g.gpu_index, g.gpu_name, g.status, g.failed_step, g.label) == (None, "", "unreachable", "connect", "lab-c")
    cpu = HostRunResult(host="local", address="localhost", port=0, user="me", local=True, model="tiny",
                        device="cpu", verdict="PASSED", parity=_doc(FIX / "parity" / "pass_cpu_tiny.json"))
    [c] = gpu_results(cpu)
    assert (c.gpu_name, c.label, c.status) == ("cpu", "local cpu", "passed") and c.scenarios


@pytest.mark.parametrize("code, status", [(0, "passed"), (1, "failed"), (2, "error"), (3, "unreachable"),
                                          (4, "failed"), (5, "error"), (130, "interrupted"), (77, "unknown")])
def test_status_from_exit_code(code, status):
    assert status_for(code) == status


def test_json_round_trip_ignores_unknown_keys():
    g = gpu_results(_multi_gpu_failed())[0]
    doc = json.loads(json.dumps(g.to_dict()))
    assert GpuResult.from_dict({**doc, "added_later": 1}) == g


def test_a_gpu_per_suite_the_ones_not_selected_named():
    """Per-GPU suites (the runner's own): each GPU its own verdict and figures; --gpus 0,2 left GPU 1 out."""
    from pipeline.results import SuiteRun
    r = _multi_gpu_failed()
    r.gpus.append(GpuInfo(2, "NVIDIA H100 80GB HBM3", "GPU-ccc", driver_version="580.1"))
    r.parity, r.gpus_selected = None, [0, 2]
    r.suites = [SuiteRun(0, "GPU-aaa", "NVIDIA H100 80GB HBM3", "0", "ok", "PASSED", 0,
                         parity=_doc(H100_DOC), busy="1 process: pid 7 python (10 MiB)"),
                SuiteRun(2, "GPU-ccc", "NVIDIA H100 80GB HBM3", "2", "failed", "FAILED: parity", 1,
                         parity=_doc(FIX / "parity" / "fail_h100_synthetic.json"))]
    g0, g1, g2 = gpu_results(r)
    assert (g0.gpu_index, g0.status, g0.failed_step, g0.exit_code, g0.gpu_uuid) == (0, "passed", "", 0, "GPU-aaa")
    assert g0.metrics["llama-3.1-8b.decode.cuda_graph.flashcore_ms"] == pytest.approx(8.691689968749916)
    assert g0.note == "busy: 1 process: pid 7 python (10 MiB)" and g0.versions["gpu_uuid"] == "GPU-aaa"
    assert (g1.status, g1.note) == ("not run", "not selected (--gpus 0,2)") and not g1.ran
    assert (g2.status, g2.failed_step, g2.scenarios["llama-3.1-8b.batch_4"]) == ("failed", "suite", False)


def test_a_run_stopped_before_its_suites_gives_each_selected_gpu_the_hosts_fate():
    r = _multi_gpu_failed()
    r.parity, r.verdict, r.exit_code, r.gpus_selected = None, "ERROR: sync step failed", 5, [1]
    r.steps = [StepResult("connect", "ok"), StepResult("sync", "failed", 1.0, "rsync failed")]
    g0, g1 = gpu_results(r)
    assert (g0.status, g0.note) == ("not run", "not selected (--gpus 1)")
    assert (g1.status, g1.failed_step, g1.verdict) == ("error", "sync", "ERROR: sync step failed")
    r.gpus_selected, r.verdict = None, "UNKNOWN"
    assert [g.status for g in gpu_results(r)] == ["unknown", "unknown"]
