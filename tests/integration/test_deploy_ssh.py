"""flashcore-deploy end to end over a real sshd on loopback: the happy path once (the real parity suite, tiny
preset, CPU), a warm re-run, and every failure the issue names, each with its exit code and a report."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import CODE, REPO, Background, alive, deploy, free_port, hanging_suite

pytestmark = pytest.mark.integration
SUITE = REPO / "tests" / "parity" / "test_parity_suite.py"
ALL_BUT_CONNECT = ["--skip", "gpu", "--skip", "sync", "--skip", "install", "--skip", "token", "--skip", "suite"]
CPU = ["--require-gpu", "none", "--model", "tiny", "--python", sys.executable]


@pytest.fixture(scope="session")
def happy(sshd, workspace, tmp_path_factory):
    if not SUITE.exists():
        pytest.skip(f"the parity suite {SUITE.relative_to(REPO)} has not landed yet")
    reports = tmp_path_factory.mktemp("reports-happy")
    return deploy(sshd.base_args() + CPU + ["--workspace", str(workspace), "--timeout", "600"], reports, timeout=900)


def test_happy_path_passes_and_reports_everything(happy, sshd, code_snapshot):
    assert CODE["root"] == code_snapshot          # every run syncs the frozen snapshot, not the live checkout
    assert happy.code == 0, happy.out[-4000:]
    doc = happy.report()
    assert doc["schema"] == "flashcore.report/1"
    assert doc["verdict"] == "PASSED" and doc["exit_code"] == 0
    assert [s["name"] for s in doc["steps"]] == ["connect", "lock", "gpu", "sync", "install", "token", "suite",
                                                 "report"]
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status == {"connect": "ok", "lock": "ok", "gpu": "ok", "sync": "ok", "install": "ok", "token": "skipped",
                      "suite": "ok", "report": "ok"}
    assert doc["device"] == "cpu" and doc["model"] == "tiny"
    assert doc["sync"]["method"] == "rsync" and len(doc["sync"]["content_hash"]) == 64
    for key in ("python", "torch", "triton", "transformers", "flashcore", "flashcore_revision"):
        assert doc["versions"].get(key), key
    assert doc["parity"]["schema"] == "flashcore.parity/2" and doc["parity"]["passed"] is True


def test_happy_path_streams_and_fetches_artifacts(happy, sshd):
    assert f"[127.0.0.1:{sshd.port} suite]" in happy.out       # live output, with the step shown
    doc = happy.report()
    for name in ("parity.json", "junit.xml", "suite.log"):
        path = happy.report_dir / doc["artifacts"][name]             # relative to the report's folder
        assert path.is_file() and path.stat().st_size > 0, name
    assert "<testsuite" in (happy.report_dir / doc["artifacts"]["junit.xml"]).read_text()
    md = happy.report_md()
    assert md.splitlines()[0].endswith("PASSED")                # verdict first
    for section in ("## Host and GPU", "## Versions", "## Steps", "## Parity", "## Decode latency",
                    "## Memory", "## Failures", "## Reproduce"):
        assert section in md
    assert "the suite ran on the CPU" in md or "on the CPU" in md
    assert f"--port {sshd.port}" in md


def test_warm_rerun_sends_almost_nothing(happy, sshd, workspace, tmp_path):
    assert happy.code == 0
    run = deploy(sshd.base_args() + CPU + ["--workspace", str(workspace), "--skip", "suite"], tmp_path)
    assert run.code == 0, run.out[-3000:]
    doc = run.report()
    assert doc["sync"]["method"] == "rsync" and doc["sync"]["bytes_sent"] < 20000
    steps = {s["name"]: s for s in doc["steps"]}
    assert "0 of" in steps["sync"]["detail"]
    assert "venv reused" in steps["install"]["detail"]
    assert doc["sync"]["content_hash"] == happy.report()["sync"]["content_hash"]


def test_closed_port_exits_3_within_connect_timeout(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    run = deploy(["--host", "127.0.0.1", "--port", str(port), "--connect-timeout", "3", "--known-hosts",
                  os.devnull, *CPU], tmp_path)
    assert run.code == 3, run.out
    assert time.monotonic() - t0 < 3 + 5
    doc = run.report()
    assert doc["verdict"] == "UNREACHABLE" and "cannot connect" in doc["error"]
    assert [s["status"] for s in doc["steps"][1:-1]] == ["skipped"] * 6


def test_unknown_host_key_refused_then_accepted_new(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    run = deploy(sshd.base_args(**{"--known-hosts": str(kh)}) + CPU + ALL_BUT_CONNECT, tmp_path / "r1")
    assert run.code == 3, run.out
    assert "unknown host key" in run.report()["error"]
    assert kh.read_text() == ""
    run = deploy(sshd.base_args(**{"--known-hosts": str(kh)}) + CPU + ALL_BUT_CONNECT + ["--accept-new-host-key"],
                 tmp_path / "r2")
    assert run.code == 0, run.out
    assert sshd.host_pub in kh.read_text() and f"[127.0.0.1]:{sshd.port}" in kh.read_text()
    run = deploy(sshd.base_args(**{"--known-hosts": str(kh)}) + CPU + ALL_BUT_CONNECT, tmp_path / "r3")
    assert run.code == 0, run.out                      # recorded: strict checking now passes


def test_changed_host_key_refused_even_with_accept_new(sshd, tmp_path):
    other = sshd.dir / "wrong_key.pub"                 # any other ed25519 key stands in for the old host key
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.read_text().split()[:2])}\n")
    run = deploy(sshd.base_args(**{"--known-hosts": str(kh)}) + CPU + ALL_BUT_CONNECT + ["--accept-new-host-key"],
                 tmp_path)
    assert run.code == 3, run.out
    assert "host key CHANGED" in run.report()["error"]
    assert run.report()["verdict"] == "REFUSED: host key"


def test_wrong_key_exits_3(sshd, tmp_path):
    run = deploy(sshd.base_args(**{"--identity": str(sshd.wrong_key)}) + CPU + ALL_BUT_CONNECT, tmp_path)
    assert run.code == 3, run.out
    assert run.report()["verdict"] == "REFUSED: authentication"
    assert "flashcore-deploy" not in run.out or "Traceback" not in run.out


def test_no_nvidia_smi_with_h100_required_exits_4(sshd, tmp_path):
    run = deploy(sshd.base_args() + ["--require-gpu", "H100", "--python", sys.executable], tmp_path)
    assert run.code == 4, run.out
    doc = run.report()
    assert doc["verdict"] == "GPU REQUIREMENT NOT MET" and "nvidia-smi not found" in doc["error"]
    assert {s["name"]: s["status"] for s in doc["steps"]}["gpu"] == "failed"
    assert "GPU REQUIREMENT NOT MET" in run.report_md().splitlines()[0]


def test_remote_suite_hang_killed_at_timeout_exits_5(sshd, workspace, tmp_path):
    script, pids = hanging_suite(tmp_path)
    t0 = time.monotonic()
    run = deploy(sshd.base_args() + CPU + ["--workspace", str(workspace), "--skip", "sync", "--skip", "install",
                                           "--timeout", "2", "--suite-command", script], tmp_path / "r")
    assert run.code == 5, run.out
    assert time.monotonic() - t0 < 30
    doc = run.report()
    assert "timed out after 2 s" in doc["error"]
    assert {s["name"]: s["status"] for s in doc["steps"]}["suite"] == "failed"
    assert "hanging" in run.out                        # streamed before the kill
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2
    time.sleep(0.5)
    assert not any(alive(p) for p in started), "orphaned remote process"


def test_local_deadline_kills_remote_group_over_new_channel(sshd, workspace, tmp_path):
    """The connection-side deadline: the remote `timeout` is far away (100 s); the local one (2 s) must end
    the command and kill its whole process group through a new channel."""
    from pipeline import commands
    from pipeline.settings import HostConfig
    from pipeline.ssh import SSHRemote

    script, pids = hanging_suite(tmp_path)
    cfg = HostConfig(name="t", address="127.0.0.1", port=sshd.port, user=os.environ.get("USER") or "root",
                     identities=(str(sshd.client_key),), known_hosts=(str(sshd.known_hosts),), gpu=None)
    lay = commands.layout(str(workspace))
    with SSHRemote(cfg) as remote:
        res = remote.run(commands.suite_command(lay["workspace"], script, 100, 5), timeout=2,
                         pidfile=lay["suite_pid"])
    assert res.timed_out
    started = [int(x) for x in pids.read_text().split()]
    time.sleep(0.5)
    assert not any(alive(p) for p in started), "orphaned remote process"


def test_tar_fallback_when_no_local_rsync(sshd, tmp_path, code_snapshot):
    """No rsync client here (PATH without it): the code goes as a tarball over SFTP; unchanged code then
    sends nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "sh"):
        (bin_dir / tool).symlink_to(__import__("shutil").which(tool))
    ws = tmp_path / "ws"
    env = {"PATH": str(bin_dir)}
    args = sshd.base_args() + CPU + ["--workspace", str(ws), "--skip", "install", "--skip", "suite"]
    first = deploy(args, tmp_path / "r1", env=env)
    assert first.code == 0, first.out
    doc = first.report()
    assert doc["sync"]["method"] == "tar" and doc["sync"]["bytes_sent"] > 1000
    assert (ws / "pipeline" / "steps.py").read_bytes() == (code_snapshot / "pipeline" / "steps.py").read_bytes()
    second = deploy(args, tmp_path / "r2", env=env)
    assert second.code == 0 and second.report()["sync"]["method"] == "unchanged"
    assert second.report()["sync"]["bytes_sent"] == 0
    assert (ws / ".flashcore" / "sync-hash").is_file()
    third = deploy(args, tmp_path / "r3")                      # rsync available again
    assert third.code == 0 and third.report()["sync"]["method"] == "rsync"
    assert not (ws / ".flashcore" / "sync-hash").exists()      # the tar path's hash no longer vouches for the tree


def test_sync_leaves_out_what_the_checkouts_git_ignores(sshd, tmp_path, code_snapshot):
    """Run from a checkout whose .gitignore ignores a dataset folder and whose .git/info/exclude a carried kit:
    neither reaches the host, by rsync or as the tarball (no rsync here); an untracked file git does not ignore
    does, and the content hash is the same both ways."""
    import shutil
    import subprocess

    checkout = tmp_path / "checkout"
    shutil.copytree(code_snapshot, checkout)
    for rel in ("datasets/shard0.bin", "kits/cuda-kit/tool.sh", "notes.txt"):
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text(rel)
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    with open(checkout / ".gitignore", "a") as f:
        f.write("datasets/\n")
    (checkout / ".git" / "info" / "exclude").write_text("/kits/\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "sh"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    hashes = set()
    for method, env in (("rsync", None), ("tar", {"PATH": str(bin_dir)})):
        ws = tmp_path / f"ws-{method}"
        run = deploy(sshd.base_args() + CPU + ["--workspace", str(ws), "--skip", "install", "--skip", "suite"],
                     tmp_path / f"r-{method}", env=env, cwd=checkout)
        assert run.code == 0, run.out
        sync = run.report()["sync"]
        assert sync["method"] == method and (ws / "notes.txt").read_text() == "notes.txt"
        assert (ws / "pipeline" / "steps.py").is_file() and (ws / ".gitignore").is_file()
        assert not (ws / "datasets").exists() and not (ws / "kits").exists()
        hashes.add(sync["content_hash"])
    assert len(hashes) == 1


def test_interrupt_kills_the_remote_suite_exit_130(sshd, tmp_path):
    """Ctrl-C mid-suite: the suite's process group is killed over a new channel, the report says interrupted."""
    import signal
    script, pids = hanging_suite(tmp_path)
    run = Background([*sshd.base_args(), *CPU, "--workspace", str(tmp_path / "ws"), "--skip", "sync", "--skip",
                      "install", "--timeout", "120", "--suite-command", script], tmp_path / "r")
    run.wait_for("hanging")
    before = sshd.commands.stat().st_size
    run.proc.send_signal(signal.SIGINT)
    assert run.finish().code == 130
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert doc["verdict"] == "INTERRUPTED" and doc["exit_code"] == 130
    assert "kg " in sshd.commands.read_text()[before:]                # killed by us, over a new channel
    time.sleep(0.5)
    assert not any(alive(p) for p in map(int, pids.read_text().split())), "orphaned remote process"


def test_inventory_group_runs_every_host_worst_exit_code(sshd, tmp_path):
    inv = tmp_path / "inventory.yaml"
    inv.write_text(f"""
defaults: {{user: {os.environ.get("USER") or "root"}, known_hosts: {sshd.known_hosts}, identity: {sshd.client_key},
           gpu: none, model: tiny, timeouts: {{connect: 3}}}}
hosts:
  good: {{address: 127.0.0.1, port: {sshd.port}}}
  closed: {{address: 127.0.0.1, port: {free_port()}}}
groups:
  both: [good, closed]
""")
    run = deploy(["--inventory", str(inv), "--target", "both", *ALL_BUT_CONNECT], tmp_path / "r")
    assert run.code == 3, run.out
    docs = {d["host"]: d for d in (json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json"))
            if d["schema"] == "flashcore.report/1"}                       # beside them: the fleet's summary
    assert docs["good"]["verdict"] == "PASSED (suite skipped)" and docs["closed"]["verdict"] == "UNREACHABLE"
    assert "--target good" in docs["good"]["reproduce"] and "--target both" not in docs["good"]["reproduce"]


def test_fab_validate_over_ssh(sshd, tmp_path, code_snapshot):
    """`fab -H user@IP:PORT -i KEY validate` from the repository root: the same run function, over SSH."""
    import subprocess
    fab = Path(sys.executable).parent / "fab"
    if not fab.exists():
        pytest.skip("fab (fabric) not installed in this environment")
    user = os.environ.get("USER") or "root"
    p = subprocess.run([str(fab), "-H", f"{user}@127.0.0.1:{sshd.port}", "-i", str(sshd.client_key), "validate",
                        "--known-hosts", str(sshd.known_hosts), "--require-gpu", "none", "--model", "tiny",
                        "--python", sys.executable, "--report-dir", str(tmp_path / "r"),
                        *[x for s in ("gpu", "sync", "install", "token", "suite") for x in ("--skip", s)]],
                       cwd=code_snapshot, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert doc["port"] == sshd.port and doc["local"] is False and doc["verdict"] == "PASSED (suite skipped)"
    assert f"-i {sshd.client_key}" in doc["reproduce"] and doc["reproduce"].startswith("fab -H ")


def test_offline_install_from_wheelhouse_over_ssh(sshd, tmp_path, code_snapshot):
    """A dependency the host lacks comes from --wheelhouse: pushed over SFTP, installed with --no-index into the
    workspace venv only; a re-run pushes nothing and reuses the venv. (A copy of the checkout whose pyproject
    names an extra dependency stands in for a host missing one.)"""
    import shutil
    import subprocess

    from tests.pipeline.test_pipeline_install_script import _wheel

    code = tmp_path / "code"
    shutil.copytree(code_snapshot, code)
    pyproject = code / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pytest-timeout>=2",', '"pytest-timeout>=2",\n    "fcdummy>=1.0",'))
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    _wheel(wh, "fcdummy", "1.0")
    ws = tmp_path / "ws"
    args = [sys.executable, "-m", "pipeline.cli", *sshd.base_args(), *CPU, "--workspace", str(ws),
            "--wheelhouse", str(wh), "--skip", "suite"]
    pushed = ws / ".flashcore" / "wheelhouse" / "fcdummy-1.0-py3-none-any.whl"
    runs, mtimes = [], []
    for i in range(2):
        p = subprocess.run([*args, "--report-dir", str(tmp_path / f"r{i}")], cwd=code, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        runs.append(json.loads(next((tmp_path / f"r{i}").glob("*.json")).read_text()))
        mtimes.append(pushed.stat().st_mtime_ns)
        time.sleep(0.05)
    assert mtimes[0] == mtimes[1]                                        # not pushed again
    install = [next(s for s in doc["steps"] if s["name"] == "install")["detail"] for doc in runs]
    assert "installed fcdummy>=1.0 from the wheelhouse" in install[0]
    assert install[1].startswith("venv reused")
    assert list((ws / ".venv").rglob("fcdummy/__init__.py"))           # in the workspace venv only
