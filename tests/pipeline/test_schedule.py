"""`flashcore-deploy schedule` and the inventory lock, each checked as far as this machine allows:

- cron: the emitted line run by /bin/sh the way cron runs it, twice at once: flock -n lets one through;
- systemd: `systemd-analyze verify` on the emitted units (skipped, with the reason, where it is not installed);
- GitHub: the workflow validated against the SchemaStore schema GitHub's editors use (check-jsonschema's vendored
  copy, offline), then its shell steps run here with bash -e as Actions would (GitHub itself is not reachable).

`flashcore-deploy` itself is replaced by a stand-in script in a scratch checkout (the real one would validate
hosts); the stand-in records its argv and sleeps, which is all the recipes' wrapping depends on."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.schedule import (FleetBusy, Recipe, cron_line, github_workflow, inventory_lock, lock_path,
                               systemd_units)

STAND_IN = """#!/bin/sh
# stand-in for flashcore-deploy: record the arguments, write a report where --report-dir says, take a while
echo "$@" >> "{calls}"
while [ $# -gt 0 ]; do [ "$1" = --report-dir ] && dir="$2"; shift; done
mkdir -p "$dir" && echo "# report" > "$dir/host-report.md"
echo started
sleep {sleep}
echo finished
"""


def _checkout(tmp_path: Path, name: str = "flash core %repo", sleep: float = 1.5) -> tuple[Path, Path]:
    repo = tmp_path / name
    exe = repo / ".venv" / "bin" / "flashcore-deploy"
    exe.parent.mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    exe.write_text(STAND_IN.format(calls=calls, sleep=sleep))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return repo, calls


# ------------------------------------------------------------------------------------------------------- cron


def test_cron_line_fields_and_escaping(tmp_path):
    line = cron_line(Recipe(repo="/srv/a %b", hour=3, minute=5, target="all", parallel=4))
    minute, hour, dom, month, dow, command = line.split(" ", 5)
    assert (minute, hour, dom, month, dow) == ("5", "3", "*", "*", "*")
    assert "%" not in command.replace(r"\%", "")            # cron would cut the line at a bare %
    assert " flock -n '/srv/a \\%b/reports/.flashcore-nightly.cron.lock' '/srv/a \\%b/.venv/bin/flashcore-deploy'" \
           " --inventory inventory.yaml --target all --parallel 4" in command


def test_cron_line_runs_once_at_a_time(tmp_path):
    repo, calls = _checkout(tmp_path)
    line = cron_line(Recipe(repo=str(repo), target="nightly", parallel=2))
    command = line.split(" ", 5)[5].replace(r"\%", "%")      # what cron hands to /bin/sh
    first = subprocess.Popen(["/bin/sh", "-c", command])
    deadline = time.monotonic() + 10
    while not calls.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    second = subprocess.run(["/bin/sh", "-c", command], timeout=10)
    assert second.returncode == 1 and time.monotonic() - t0 < 1.0    # flock -n: refused at once
    assert first.wait(timeout=10) == 0
    assert calls.read_text().splitlines() == [
        f"--inventory inventory.yaml --target nightly --parallel 2 --report-dir {repo}/reports"]
    assert (repo / "reports" / "flashcore-nightly.log").read_text() == "started\nfinished\n"
    third = subprocess.run(["/bin/sh", "-c", command], timeout=10)   # the lock is free again
    assert third.returncode == 0 and len(calls.read_text().splitlines()) == 2


# ---------------------------------------------------------------------------------------------------- systemd


def _write_units(r: Recipe, where: Path) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in systemd_units(r).items():
        (where / name).write_text(text)
        out.append(where / name)
    return out


def test_systemd_units_content(tmp_path):
    units = systemd_units(Recipe(repo="/srv/flash%core", hour=4, minute=0))
    service, timer = units["flashcore-nightly.service"], units["flashcore-nightly.timer"]
    assert "OnCalendar=*-*-* 04:00:00\n" in timer and "Persistent=true\n" in timer
    assert "Unit=flashcore-nightly.service" in timer and "WantedBy=timers.target" in timer
    assert "Type=oneshot\n" in service and "EnvironmentFile=-%h/.config/flashcore/nightly.env" in service
    assert "ExecStart=/srv/flash%%core/.venv/bin/flashcore-deploy --inventory inventory.yaml" in service
    assert "HF_TOKEN=" not in service.replace("# HF_TOKEN=...", "")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed here")
def test_systemd_analyze_verifies_the_units(tmp_path):
    repo, _ = _checkout(tmp_path, "flash core %repo")
    r = Recipe(repo=str(repo), env_file=str(tmp_path / "nightly.env"))
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, _write_units(r, tmp_path / "units"))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    # the same check fails on a unit that is wrong: it is not a formality
    bad = _write_units(Recipe(repo=str(tmp_path / "missing")), tmp_path / "bad")
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, bad)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and "is not executable" in res.stderr


# ----------------------------------------------------------------------------------------------------- github


def _workflow(tmp_path: Path, **kw) -> tuple[str, dict]:
    text = github_workflow(Recipe(repo="/unused", **kw))
    return text, yaml.safe_load(text)


def test_workflow_has_what_actions_needs(tmp_path):
    text, wf = _workflow(tmp_path, hour=1, minute=30, target="all", runner_label="gpu-ssh")
    on = wf["on"]                                   # quoted in the file: YAML 1.1 would read a bare `on` as True
    assert on["schedule"] == [{"cron": "30 1 * * *"}] and "workflow_dispatch" in on
    assert wf["concurrency"] == {"group": "flashcore-nightly-inventory.yaml-all", "cancel-in-progress": False}
    job = wf["jobs"]["nightly"]
    assert job["runs-on"] == ["self-hosted", "gpu-ssh"] and job["timeout-minutes"] > 0
    steps = job["steps"]
    assert all(("uses" in s) != ("run" in s) for s in steps)
    assert steps[0]["uses"].startswith("actions/checkout@")
    nightly = next(s for s in steps if s.get("name") == "nightly")
    assert nightly["env"] == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}
    assert "--target all --report-dir" in nightly["run"] and "--identity" in nightly["run"]   # --parallel: the run's
    assert [s for s in steps if "upload-artifact" in s.get("uses", "")][0]["if"] == "always()"
    assert steps[-1]["if"] == "always()" and "rm -f ~/.ssh/flashcore_nightly" in steps[-1]["run"]
    for s in steps:                                  # secrets only through env:, never spliced into a script
        assert "secrets." not in s.get("run", "")
    assert text.count("${{ secrets.") == 3


def test_workflow_matches_the_github_workflow_schema(tmp_path):
    text, _ = _workflow(tmp_path)
    good, bad = tmp_path / "nightly.yml", tmp_path / "broken.yml"
    good.write_text(text)
    bad.write_text(text.replace("runs-on:", "runs_on:"))
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
    res = subprocess.run([*check, str(good)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([*check, str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "'runs-on' is a required property" in res.stdout


def test_workflow_steps_run_here_as_actions_would(tmp_path):
    """Each `run:` with `bash -e` (Actions' default shell on Linux), in a scratch checkout with the stand-in:
    the key lands 0600, the nightly step runs the fleet, only tonight's files are staged for upload, the key goes."""
    _, wf = _workflow(tmp_path)
    repo, calls = _checkout(tmp_path, "checkout", sleep=0)
    home, temp = tmp_path / "home", tmp_path / "runner-temp"
    old = home / "flashcore-nightly" / "reports" / "last-night.md"
    old.parent.mkdir(parents=True)
    temp.mkdir()
    old.write_text("# yesterday\n")
    os.utime(old, (time.time() - 86400,) * 2)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "RUNNER_TEMP": str(temp)}
    secrets = {"FLASHCORE_SSH_KEY": "-----BEGIN KEY-----\nabc\n-----END KEY-----",
               "FLASHCORE_KNOWN_HOSTS": "[10.0.0.1]:22 ssh-ed25519 AAAA", "HF_TOKEN": "hf_planted"}
    for step in wf["jobs"]["nightly"]["steps"]:
        if "run" not in step or step["run"].startswith("bash scripts/bootstrap.sh"):
            continue
        step_env = {k: secrets[v.split("secrets.")[1].split()[0]] for k, v in step.get("env", {}).items()}
        script = tmp_path / "step.sh"
        script.write_text(step["run"])
        res = subprocess.run(["bash", "-e", str(script)], cwd=repo, env={**env, **step_env}, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, (step.get("name"), res.stderr)
        if step.get("name") == "SSH key and known hosts":
            key = home / ".ssh" / "flashcore_nightly"
            assert key.read_text() == secrets["FLASHCORE_SSH_KEY"] + "\n"
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
    args = calls.read_text()
    assert f"--report-dir {home}/flashcore-nightly/reports --identity {home}/.ssh/flashcore_nightly" in args
    assert "hf_planted" not in args
    staged = sorted(p.relative_to(temp / "tonight").as_posix() for p in (temp / "tonight").rglob("*") if p.is_file())
    assert staged == ["host-report.md"]              # tonight's report, not last night's
    assert not (home / ".ssh" / "flashcore_nightly").exists()


# ------------------------------------------------------------------------------------------------------- lock

HOLD = """
import sys, time
from pipeline.schedule import inventory_lock
with inventory_lock(sys.argv[1], lock_dir=sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(inventory: Path, lock_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(inventory), str(lock_dir)], stdout=subprocess.PIPE,
                         text=True, cwd=Path(__file__).resolve().parents[2])
    assert p.stdout.readline().strip() == "held"
    return p


def test_two_runs_of_one_inventory_never_overlap(tmp_path):
    inv, other = tmp_path / "inventory.yaml", tmp_path / "lab.yaml"
    inv.write_text("hosts: {}\n")
    other.write_text("hosts: {}\n")
    locks = tmp_path / "locks"
    holder = _holder(inv, locks)
    try:
        with pytest.raises(FleetBusy, match=rf"another run of .*inventory.yaml is in progress \(pid {holder.pid} on "):
            with inventory_lock(inv, lock_dir=locks):
                pass
        with inventory_lock(other, lock_dir=locks):            # another inventory is another lock
            pass
        with pytest.raises(FleetBusy):                         # the same file by another path is the same lock
            with inventory_lock(tmp_path / "." / "inventory.yaml", lock_dir=locks):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)                     # even a killed holder frees it (flock)
        holder.wait(timeout=10)
    with inventory_lock(inv, lock_dir=locks) as path:
        assert path == lock_path(inv, locks) and path.with_suffix(".owner").read_text().startswith(f"pid {os.getpid()}")
    assert not path.with_suffix(".owner").exists()


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_prints_each_recipe(tmp_path, capsys):
    repo, _ = _checkout(tmp_path, "repo")
    for emit, marker in (("cron", " flock -n "), ("systemd", "OnCalendar=*-*-* 03:45:00"), ("github", "cron: \"45 3")):
        assert main(["schedule", "--emit", emit, "--repo", str(repo), "--at", "03:45"]) == 0
        assert marker in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--emit", "cron", "--at", "24:00"], "--at 24:00: expected HH:MM (24 h)"),
    (["--emit", "cron", "--parallel", "0"], "--parallel must be at least 1"),
    (["--emit", "launchd"], "argument --emit: invalid choice: 'launchd'"),
    (["--emit", "cron", "--repo", "/nonexistent/x"], "--repo /nonexistent/x: not a directory"),
    ([], "the following arguments are required: --emit"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
