"""The two shells: flashcore-deploy's argument handling (one clear line, exit 2, no traceback unless --debug),
the --local run through the local backend, and `fab validate` reaching the same run function."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parents[2]
SKIP_ALL = ["--skip", "sync", "--skip", "install", "--skip", "token", "--skip", "suite"]


def test_help_explains_every_option_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--host", "--port", "--user", "--identity", "--known-hosts", "--accept-new-host-key", "--inventory",
                "--target", "--local", "--model", "--require-gpu", "--python", "--wheelhouse", "--report-dir",
                "--skip", "--timeout", "--debug", "examples:", "exit codes:", "130 interrupted"):
        assert opt in out, opt
    assert "--suite-command" not in out          # a testing aid, not a user option


@pytest.mark.parametrize("argv, words", [
    (["--port", "70000", "--host", "h"], "--port: 70000"),
    (["--host", "h", "--local"], "choose one of"),
    (["--host", "h", "--skip", "connect"], "--skip: 'connect' is not a step that can be skipped"),
    (["--host", "h", "--require-gpu", ""], "--require-gpu"),
    (["--host", "h", "--timeout", "-1"], "--timeout: '-1' must be a finite number of seconds > 0"),
    (["--host", "h", "--wheelhouse", "/nonexistent/wh"], "--wheelhouse /nonexistent/wh"),
    (["--host", "h", "--identity", "/nonexistent/key"], "--identity /nonexistent/key"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line_exit_2(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_inventory_exit_2_names_the_field(tmp_path, capsys):
    inv = tmp_path / "inv.yaml"
    inv.write_text("hosts:\n  a: {address: h, port: 22, gpu: {name: H100, min_memory_gb: -5}}\n")
    assert cli.main(["--inventory", str(inv)]) == 2
    err = capsys.readouterr().err
    assert f"{inv}: hosts.a.gpu.min_memory_gb:" in err and err.count("\n") == 1 and "Traceback" not in err
    assert cli.main(["--inventory", str(inv), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err           # --debug shows it
    assert cli.main(["--inventory", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read inventory" in capsys.readouterr().err


def test_local_run_through_the_local_backend(tmp_path, capsys):
    code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--report-dir", str(tmp_path / "r"),
                     "--skip", "install", "--skip", "suite"])
    assert code == 0
    out = capsys.readouterr().out
    assert "[local] sync     ok" in out and "PASSED (suite skipped)" in out
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert doc["local"] is True and doc["steps"][0]["detail"].startswith("local, no SSH")
    assert doc["steps"][1]["name"] == "lock" and doc["steps"][1]["status"] == "ok"
    assert (tmp_path / "ws" / "pipeline" / "steps.py").is_file()
    if doc["device"] == "cpu":
        assert doc["model"] == "tiny" and "No GPU on this host" in doc["notes"][0]


def test_local_suite_hang_is_killed_exit_5(tmp_path, capsys):
    pids = tmp_path / "pids"
    code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--report-dir", str(tmp_path / "r"),
                     *SKIP_ALL[:-2], "--timeout", "1",
                     "--suite-command", f"echo $$ > {pids}; sleep 120 & echo $! >> {pids}; wait"])
    assert code == 5
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert "timed out after 1 s" in doc["error"] and doc["verdict"] == "ERROR: suite step failed"
    for pid in map(int, pids.read_text().split()):
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_crashing_suite_without_results_exit_5(tmp_path, capsys):
    code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--report-dir", str(tmp_path / "r"),
                     *SKIP_ALL[:-2], "--suite-command", "echo boom; exit 2"])
    assert code == 5
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert "crashed (exit 2) without writing its results" in doc["error"]
    assert "boom" in (tmp_path / "r" / doc["artifacts"]["suite.log"]).read_text()
    assert "boom" in {s["name"]: s for s in doc["steps"]}["suite"]["log_tail"]


def test_failing_parity_document_exit_1(tmp_path, capsys):
    doc_src = REPO / "tests" / "pipeline" / "fixtures" / "parity" / "fail_h100_synthetic.json"
    code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--report-dir", str(tmp_path / "r"),
                     *SKIP_ALL[:-2], "--suite-command", f"cp {doc_src} \"$FLASHCORE_PARITY_JSON\"; exit 1"])
    assert code == 1
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert doc["verdict"] == "FAILED: parity" and "failed: batch_4" in doc["error"]
    md = next((tmp_path / "r").glob("*.md")).read_text()
    assert md.splitlines()[0].endswith("FAILED: parity") and "**FAIL**" in md


def test_fab_validate_runs_the_same_code_path(tmp_path):
    fab = Path(sys.executable).parent / "fab"
    if not fab.exists():
        pytest.skip("fab (fabric) not installed in this environment")
    listing = subprocess.run([str(fab), "-l"], cwd=REPO, capture_output=True, text=True)
    assert "validate" in listing.stdout
    p = subprocess.run([str(fab), "validate", "--local", "--workspace", str(tmp_path / "ws"), "--report-dir",
                        str(tmp_path / "r"), "--skip", "install", "--skip", "suite"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASSED (suite skipped): local" in p.stdout
    bad = subprocess.run([str(fab), "validate", "--local", "--require-gpu", "NoSuchGPU-XYZ", "--report-dir",
                          str(tmp_path / "r2")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 4, bad.stdout + bad.stderr      # the exit code passes through fab
    assert "GPU REQUIREMENT NOT MET" in bad.stdout


def test_results_not_matching_the_schema_exit_5(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "flashcore.parity/1", "passed": true, "scenarios": []}')
    code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--report-dir", str(tmp_path / "r"),
                     *SKIP_ALL[:-2], "--suite-command", f"cp {bad} \"$FLASHCORE_PARITY_JSON\""])
    assert code == 5
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert "do not match flashcore.parity/2" in doc["error"]


def test_report_folder_that_cannot_be_made_exit_2_before_anything_runs(tmp_path, capsys):
    a_file = tmp_path / "reports"
    a_file.write_text("not a folder")
    for report_dir, words in ((a_file, "cannot create it"), (a_file / "sub", "cannot create it")):
        code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--report-dir", str(report_dir)])
        err = capsys.readouterr().err
        assert code == 2 and f"--report-dir {report_dir}: {words}" in err and err.count("\n") == 1
    assert not (tmp_path / "ws").exists()                            # nothing ran


def test_template_that_does_not_parse_exit_2(tmp_path, capsys):
    tpl = tmp_path / "t.md.j2"
    tpl.write_text("line one\n{% for x in %}\n")
    code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--template", str(tpl),
                     "--report-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and f"--template {tpl}: line 2:" in err and err.count("\n") == 1
    assert not (tmp_path / "ws").exists()


def test_template_that_fails_while_rendering_still_leaves_a_report_exit_5(tmp_path, capsys):
    tpl = tmp_path / "t.md.j2"
    tpl.write_text("{{ r.host }} {{ 1 / 0 }}\n")
    code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--template", str(tpl), *SKIP_ALL,
                     "--report-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 5 and "ZeroDivisionError" in err and "the built-in template wrote the report" in err
    md = next((tmp_path / "r").glob("*.md")).read_text()
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert md.startswith("# flashcore validation — local: ERROR: report step failed")
    assert doc["exit_code"] == 5 and {s["name"]: s["status"] for s in doc["steps"]}["report"] == "failed"


def test_a_dead_runs_leftover_group_is_killed_when_the_lock_is_taken(tmp_path, capsys):
    """A previous run died without cleaning up (its suite group still runs, its pidfile is there): the next run,
    holding the lock, knows no one else can own that group, kills it and says so."""
    rt = tmp_path / "ws" / ".flashcore"
    rt.mkdir(parents=True)
    orphan = subprocess.Popen(["sh", "-c", f"echo $$ > {rt / 'suite.pid'}; exec sleep 300"], start_new_session=True)
    for _ in range(100):
        if (rt / "suite.pid").exists() and (rt / "suite.pid").read_text().strip():
            break
        time.sleep(0.02)
    code = cli.main(["--local", "--workspace", str(tmp_path / "ws"), *SKIP_ALL, "--report-dir", str(tmp_path / "r")])
    assert code == 0
    assert orphan.wait(timeout=10) == -15
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert any(f"left running: {rt / 'suite.pid'}" in n for n in doc["notes"])


def test_a_checkout_that_cannot_be_read_is_a_reported_step_error(tmp_path):
    """run_host never raises: a code root without pyproject.toml ends as a report saying so (exit 5)."""
    from pipeline.runner import RunOptions, run_host
    from pipeline.settings import Flags, resolve

    (tmp_path / "empty").mkdir()
    cfg = resolve(Flags(local=True, workspace=str(tmp_path / "ws")), REPO)[0]
    res = run_host(cfg, RunOptions(report_dir=str(tmp_path / "r"), code_root=tmp_path / "empty",
                                   out=lambda line: None))
    assert (res.verdict, res.exit_code) == ("ERROR: checkout step failed", 5)
    assert "cannot read the checkout" in res.error and "pyproject.toml" in res.error
    assert [s.status for s in res.steps] == ["skipped"] * 7 + ["ok"]
    assert (tmp_path / "r" / res.artifacts["report_md"]).is_file()
