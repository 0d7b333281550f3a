"""Every step without SSH, pyinfra-style: a fixture file gives the host's config and facts, the operations the
step must plan (the commands out), the outputs those produce, and the StepResult / error / learned facts the
step must conclude. A new case is a new file in fixtures/steps/ (STEP.CASE.json), not new test code.

Fixture keys: step, about; cfg (HostConfig fields over name "gpu-a", address 10.0.0.1), probe (default: a root
host with python3), here (Here fields; the catalogue is this checkout's), device, target (a SuiteTarget: one GPU's suite); ops (each: type + fields that must be equal, `contains` / `lacks`:
substrings of its command), plan_error; outputs (a CommandResult as {exit_code, stdout[_file], stderr,
timed_out}, a HoldOutput as {held, lines, waited_s}, a Get's text or {text_file} or null, PutTarball's bytes);
status, detail (substrings), log_tail (substrings), error (class name), exit_code, verdict, learned (subset),
notes (substrings, or [] for none), artifacts (names); secret_not_in_commands.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import pytest

from pipeline import commands, steps
from pipeline.catalogue import read_catalogue
from pipeline.errors import verdict_for
from pipeline.inventory import parse_gpu_requirement
from pipeline.local import CodeTree
from pipeline.remote import CommandResult
from pipeline.results import StepResult
from pipeline.settings import HostConfig

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]
CASES = sorted(p.name.removesuffix(".json") for p in (FIX / "steps").glob("*.json"))
STEP = {s.name: s for s in steps.STEPS}
DEFAULT_PROBE = {"home": "/root", "python_path": "/usr/bin/python3", "tool.rsync": "/usr/bin/rsync"}


def _facts(case: dict) -> steps.Facts:
    cfg = dict(case.get("cfg", {}))
    if "gpu" in cfg:
        cfg["gpu"] = parse_gpu_requirement(cfg["gpu"] if cfg["gpu"] is not None else "none")
    if "gpus" in cfg:
        cfg["gpus"] = tuple(cfg["gpus"])
    config = HostConfig(**{"name": "gpu-a", "address": "10.0.0.1", **cfg})
    here = {"tree": CodeTree(Path("/src"), ("a.py", "b.py"), "c" * 64, 100), "revision": "abc123def456",
            "requirements": ["torch>=2.11", "pytest-timeout>=2"],
            "scripts": {"install.py": b"# install", "token_check.py": b"# token"},
            "catalogue": read_catalogue(REPO), **case.get("here", {})}
    here["wheels"] = tuple(tuple(w) for w in here.get("wheels", ()))
    f = steps.Facts(config, steps.Here(**here))
    f.probe = case.get("probe", DEFAULT_PROBE)
    f.lay = commands.layout(commands.expand_home(config.workspace, f.probe["home"]))
    f.device = case.get("device", "")
    f.target = steps.SuiteTarget(**case["target"]) if "target" in case else None
    return f


def _output(value):
    if isinstance(value, dict) and "exit_code" in value:
        stdout = (FIX / value["stdout_file"]).read_text() if "stdout_file" in value else value.get("stdout", "")
        return CommandResult("(the command)", value["exit_code"], stdout, value.get("stderr", ""), 0.1,
                             value.get("timed_out", False))
    if isinstance(value, dict) and "held" in value:
        return steps.HoldOutput(value["held"], value["lines"], value["waited_s"])
    if isinstance(value, dict) and "text_file" in value:
        return (FIX / value["text_file"]).read_text()
    return value


def _subset(actual, expected, where: str) -> None:
    if isinstance(expected, dict):
        actual = asdict(actual) if is_dataclass(actual) else actual
        for k, v in expected.items():
            _subset(actual[k], v, f"{where}.{k}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("name", CASES)
def test_step_fixture(name):
    case = json.loads((FIX / "steps" / f"{name}.json").read_text())
    step, f = STEP[case["step"]], _facts(case)
    if "plan_error" in case:
        with pytest.raises(Exception) as e:
            step.plan(f)
        assert case["plan_error"] in str(e.value)
        return
    ops = step.plan(f)
    if "ops" in case:
        assert [type(op).__name__ for op in ops] == [o["type"] for o in case["ops"]], [type(o).__name__ for o in ops]
        for op, want in zip(ops, case["ops"]):
            for key, value in want.items():
                if key == "contains":
                    for text in value:
                        assert text in op.command, f"{name}: {text!r} not in {op.command!r}"
                elif key == "lacks":
                    for text in value:
                        assert text not in op.command, f"{name}: {text!r} in {op.command!r}"
                elif key != "type":
                    assert getattr(op, key) == value, f"{name}: {type(op).__name__}.{key}"
    secret = case.get("secret_not_in_commands")
    if secret:
        assert all(secret not in getattr(op, "command", "") for op in ops)
        assert not any(secret in repr(op) for op in ops) and secret not in repr(f)   # not even in a repr
    if "outputs" not in case:
        return
    out = step.conclude(f, [_output(v) for v in case["outputs"]])
    assert out.step.name == case["step"] and out.step.status == case["status"], out.step
    for text in case.get("detail", []):
        assert text in out.step.detail, f"{name}: {text!r} not in {out.step.detail!r}"
    for text in case.get("log_tail", []):
        assert text in out.step.log_tail
    if "error" in case:
        assert type(out.error).__name__ == case["error"] and str(out.error) == out.step.detail
        verdict, code = verdict_for(out.error, case["step"], False)
        assert code == case.get("exit_code", code) and verdict == case.get("verdict", verdict)
    else:
        assert out.error is None
    if "learned" in case:
        f.learn(out.learned)
        _subset(f, case["learned"], name)
    if "notes" in case:
        notes = out.learned.get("notes", [])
        assert len(notes) == len(case["notes"]) and all(t in n for t, n in zip(case["notes"], notes)), notes
    if "artifacts" in case:
        assert sorted(out.artifacts) == sorted(case["artifacts"])


def test_every_step_has_fixtures():
    covered = {name.split(".")[0] for name in CASES}
    assert covered == set(STEP), set(STEP) - covered
    assert [f.name for f in fields(steps.Facts)][:2] == ["cfg", "here"]


def _gpu_facts(gpus=None, device="cuda") -> steps.Facts:
    from pipeline import parse
    f = _facts({"cfg": {"gpus": gpus} if gpus is not None else {}})
    f.gpus = parse.parse_gpu_query((FIX / "gpu" / "multi_h100_busy.txt").read_text()).gpus
    f.device = device
    return f


def test_suite_targets_one_per_gpu_selected_busy_named_or_the_default_device():
    every = steps.suite_targets(_gpu_facts())
    assert [(t.index, t.tag) for t in every] == [(0, "gpu0"), (1, "gpu1"), (2, "gpu2"), (3, "gpu3")]
    assert every[0].busy == "1 process: pid 41872 /usr/bin/python3 (40422 MiB)" and every[1].busy == ""
    assert [t.index for t in steps.suite_targets(_gpu_facts(gpus=[3, 1]))] == [1, 3]
    assert steps.suite_targets(_gpu_facts(device="cpu")) == [steps.SuiteTarget()]
    assert steps.suite_targets(_facts({})) == [steps.SuiteTarget()]          # --skip gpu: the default device


def _outcome(status: str, error=None, parity=None, detail="d") -> steps.Outcome:
    return steps.Outcome(StepResult("suite", status, 2.0, detail, "cmd", "tail"), {"parity": parity,
                         "versions": {"suite_device": "cuda"}}, {}, error)


def test_combine_suites_the_worst_gpu_decides_and_is_named():
    from pipeline.errors import Interrupted, ParityFailure, StepError
    f = _gpu_facts()
    t0, t1, t2 = steps.suite_targets(f)[:3]
    doc = json.loads((FIX / "parity" / "pass_cpu_tiny.json").read_text())
    o = steps.combine_suites(f, [(t0, _outcome("ok", parity=doc, detail="5/5")),
                                 (t1, _outcome("failed", ParityFailure("parity failed: 4/5"), detail="pf")),
                                 (t2, _outcome("failed", StepError("suite crashed"), detail="crash"))])
    assert o.step.status == "failed" and o.step.detail == "gpu0: 5/5; gpu1: pf; gpu2: crash"
    assert type(o.error).__name__ == "StepError" and o.error.exit_code == 5        # the highest code wins
    assert str(o.error) == "GPU 2 (GPU-0b1c2d3e-2222-4222-8222-222222222222): suite crashed"
    runs = o.learned["suites"]
    assert [(r.gpu_index, r.verdict, r.exit_code, r.cuda_visible_devices) for r in runs] == \
        [(0, "PASSED", 0, "0"), (1, "FAILED: parity", 1, "1"), (2, "ERROR: suite step failed", 5, "2")]
    assert runs[0].parity == doc and o.learned["parity"] is None and runs[0].busy.startswith("1 process")
    o = steps.combine_suites(f, [(t0, _outcome("failed", ParityFailure("pf"))),
                                 (t1, _outcome("failed", Interrupted("interrupted (SIGTERM) during suite", 15)))])
    assert isinstance(o.error, Interrupted) and o.error.exit_code == 143 and str(o.error).startswith("GPU 1 (")
    single = _outcome("ok", parity=doc)
    assert steps.combine_suites(f, [(t0, single)]) is single and single.learned["parity"] == doc   # as it was


def test_host_deadline_is_the_sum_of_the_steps_limits():
    cfg = HostConfig(name="h", address="a", connect_timeout=10, lock_timeout=300, install_timeout=900,
                     suite_timeout=1800)
    limit = steps.host_deadline(cfg)
    assert cfg.suite_timeout + cfg.install_timeout + cfg.lock_timeout < limit < 2 * 3600
    assert steps.host_deadline(HostConfig(name="h", address="a", suite_timeout=60)) < limit
