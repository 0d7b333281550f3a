"""Pure command builders. The shell ones are also executed locally (sh), since a builder is only right if the
command it builds does what it says."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import commands as c


@pytest.mark.parametrize("path, is_dir, excluded", [
    (".git", True, True), (".venv", True, True), ("reports", True, True), (".gpuhost", True, True),
    ("flashcore/__pycache__", True, True), ("a/b/.pytest_cache", True, True), ("x.egg-info", True, True),
    ("flashcore/ops/k.pyc", False, True), (".flashcore", True, True),
    ("docs/reports", True, False),            # only the top-level reports/ is excluded
    ("flashcore/ops/prefill.py", False, False), ("tests/parity", True, False), ("pyproject.toml", False, False),
    ("reports", False, False),                # a FILE named reports is not the reports/ directory
])
def test_sync_excludes(path, is_dir, excluded):
    assert c.Excludes(c.SYNC_EXCLUDES)(path, is_dir) is excluded


def test_expand_home_and_layout():
    assert c.expand_home("~/ws", "/root") == "/root/ws"
    assert c.expand_home("ws", "/home/u/") == "/home/u/ws"
    assert c.expand_home("/abs", "/root") == "/abs"
    lay = c.layout("/root/ws/")
    assert lay["venv_python"] == "/root/ws/.venv/bin/python" and lay["token"] == "/root/ws/.flashcore/hf_token"
    assert [lay[f"{n}_pid"] for n in ("install", "token", "suite")] == \
        [f"/root/ws/.flashcore/{n}.pid" for n in ("install", "token", "suite")]


def test_rsync_argv():
    rs = c.rsync_argv("/src/", "flashcore-target:/root/ws", "ssh -F /tmp/x/config", prepare="mkdir -p /root/ws")
    assert "--rsync-path=mkdir -p /root/ws && rsync" in rs
    assert rs[0] == "rsync" and "--delete" in rs and rs[rs.index("-e") + 1] == "ssh -F /tmp/x/config"
    assert rs[-2:] == ["/src/", "flashcore-target:/root/ws/"]
    assert "--exclude=/.venv/" in rs and "--exclude=__pycache__/" in rs and "--exclude=/.git" in rs
    assert "-e" not in c.rsync_argv("/src", "/dst", None)


def test_probe_and_gpu_query_are_single_commands(tmp_path):
    ws = tmp_path / "my ws"
    (ws / ".flashcore" / "wheelhouse").mkdir(parents=True)
    (ws / ".flashcore" / "sync-hash").write_text("abc123")
    (ws / ".flashcore" / "wheelhouse" / "x-1.0-py3-none-any.whl").write_bytes(b"12345")
    probe = c.probe_command("/opt/torch/.venv/bin/python3", str(ws))
    out = subprocess.run(["sh", "-c", probe], capture_output=True, text=True).stdout
    assert "home=" in out and "python_version=" in out and "tool.rsync=" in out and "tool.flock=" in out
    assert "sync_hash=abc123" in out and "wheel.x-1.0-py3-none-any.whl=5" in out
    home = subprocess.run(["sh", "-c", c.probe_command("python3", "~/nowhere-x")], capture_output=True,
                          text=True, env={**os.environ, "HOME": str(tmp_path)}).stdout
    assert "sync_hash=\n" in home
    gpu = c.gpu_query_command()
    assert gpu.count("--query-gpu=") == 1 and "compute_cap" in gpu and "mig.mode.current" in gpu


def test_write_stdin_to_file_is_0600_and_content_never_in_the_command(tmp_path):
    path = tmp_path / "sub" / "secret"
    cmd = c.write_stdin_to_file_command(str(path), 0o600)
    subprocess.run(["sh", "-c", cmd], input=b"s3cr3t-value\n", check=True)
    assert path.read_bytes() == b"s3cr3t-value\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "s3cr3t" not in cmd


def test_python_script_command_passes_env_not_code():
    cmd = c.python_script_command("/v/bin/python", ["org/model"], {"HF_TOKEN_PATH": "/w/t", "B": "x y"})
    assert cmd == "env B='x y' HF_TOKEN_PATH=/w/t /v/bin/python - org/model"


def test_suite_command_runs_in_its_own_group_and_reports_the_exit_code(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    inner = "echo hello; echo \"pp=$PYTHONPATH\"; echo err >&2; exit 3"
    cmd = c.suite_command(str(ws), inner, 30, 2, {"PYTHONPATH": "/extra", "FOO": "bar baz"})
    p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "/host"})
    assert p.returncode == 3
    assert "hello" in p.stdout and "err" in p.stdout                     # stderr merged into the stream
    assert f"pp={ws}:/extra:/host" in p.stdout                             # workspace first, nothing lost
    lay = c.layout(str(ws))
    assert "hello" in open(f"{lay['results']}/suite.log").read()
    assert not os.path.exists(lay["suite_pid"])                           # removed when the group ended


def test_suite_command_remote_timeout_kills_the_group(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    marker = tmp_path / "child"
    inner = f"sleep 60 & echo $! > {marker}; wait"
    t0 = time.monotonic()
    p = subprocess.run(["sh", "-c", c.suite_command(str(ws), inner, 1, 1)], capture_output=True, text=True)
    assert p.returncode == 124 and time.monotonic() - t0 < 10
    child = int(marker.read_text())
    time.sleep(0.3)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"


def test_kill_group_command_kills_by_pidfile(tmp_path):
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(["sh", "-c", f"echo $$ > {pidfile}; sleep 60 & wait"], start_new_session=True)
    for _ in range(50):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    subprocess.run(["sh", "-c", c.kill_group_command(str(pidfile))], check=True, timeout=10)
    assert proc.wait(timeout=5) != 0
    assert not pidfile.exists()
    subprocess.run(["sh", "-c", c.kill_group_command(str(tmp_path / "missing"))], check=True, timeout=5)


def test_pytest_argv_is_the_suite_contract():
    argv = c.pytest_argv("/w/.venv/bin/python", "tiny", "/r/p.json", "/r/j.xml", "cpu")
    assert argv[:4] == ["/w/.venv/bin/python", "-m", "pytest", "tests/parity/test_parity_suite.py"]
    for flag, value in (("--parity-model", "tiny"), ("--parity-json", "/r/p.json"), ("--junitxml", "/r/j.xml"),
                        ("--parity-device", "cpu")):
        assert argv[argv.index(flag) + 1] == value
    assert "--parity-device" not in c.pytest_argv("p", "tiny", "a", "b", None)


def test_untar_replaces_the_previous_tarball_files(tmp_path):
    import io
    import tarfile

    def tarball(files: dict) -> Path:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, text in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text.encode()))
        path = tmp_path / "upload.tar.gz"
        path.write_bytes(buf.getvalue())
        return path

    ws = tmp_path / "ws"
    lay = c.layout(str(ws))
    for files, h in (({"a.py": "1", "pkg/b.py": "2"}, "h1"), ({"a.py": "3"}, "h2")):
        cmd = c.untar_command(str(tarball(files)), str(ws), lay["sync_hash"], h)
        subprocess.run(["sh", "-c", cmd], check=True)
    assert (ws / "a.py").read_text() == "3"
    assert not (ws / "pkg" / "b.py").exists()            # deleted here, deleted there
    assert open(lay["sync_hash"]).read() == "h2"
