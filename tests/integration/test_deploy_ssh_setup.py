"""The user's SSH setup honoured as OpenSSH and Fabric do, against real sshds: known_hosts with hashed names,
`@cert-authority` and `@revoked` lines; key, known_hosts and workspace paths with spaces and quotes (for rsync's
ssh too); ~/.ssh/config (HostName, User, Port, IdentityFile, UserKnownHostsFile, ProxyJump for the connection and
for rsync); `fab -H a,b validate` running every host and keeping the gateway; fab's help, --list-hosts, --dry-run,
--version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import KEYGEN, deploy, free_port, start_sshd

pytestmark = pytest.mark.integration
CPU = ["--require-gpu", "none", "--model", "tiny", "--python", sys.executable]
ONLY_CONNECT = [x for s in ("gpu", "sync", "install", "token", "suite") for x in ("--skip", s)]
USER = os.environ.get("USER") or "root"
FAB = Path(sys.executable).parent / "fab"


@pytest.fixture(scope="module")
def jump(tmp_path_factory):
    """A second sshd, the jump host (LogLevel DEBUG1: it logs each direct-tcpip channel it forwards)."""
    server, proc = start_sshd(tmp_path_factory.mktemp("jump"), log_level="DEBUG1")
    yield server
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def _report(report_dir: Path) -> dict:
    files = sorted(report_dir.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_hashed_names_and_cert_authority_lines_are_read(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(f"# a comment\n@cert-authority *.example.org {sshd.host_pub}\n"
                  f"[127.0.0.1]:{sshd.port} {sshd.host_pub}\n")
    subprocess.run([KEYGEN, "-H", "-f", str(kh)], check=True, capture_output=True)
    assert "|1|" in kh.read_text() and f"[127.0.0.1]:{sshd.port}" not in kh.read_text()   # really hashed
    run = deploy(sshd.base_args(**{"--known-hosts": str(kh)}) + CPU + ONLY_CONNECT, tmp_path / "r")
    assert run.code == 0, run.out


def test_revoked_host_key_is_refused_even_with_accept_new(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(f"@revoked * {sshd.host_pub}\n[127.0.0.1]:{sshd.port} {sshd.host_pub}\n")
    before = kh.read_text()
    run = deploy(sshd.base_args(**{"--known-hosts": str(kh)}) + CPU + ONLY_CONNECT + ["--accept-new-host-key"],
                 tmp_path / "r")
    assert run.code == 3, run.out
    doc = _report(tmp_path / "r")
    assert doc["verdict"] == "REFUSED: host key" and "is REVOKED" in doc["error"] and f"{kh}:1" in doc["error"]
    assert kh.read_text() == before and run.err.count("\n") == 1


def test_paths_with_spaces_and_quotes_work_for_rsync_too(sshd, tmp_path):
    odd = tmp_path / "dir with space" / "it's \"here\""
    odd.mkdir(parents=True)
    key, kh = odd / "client key", odd / "known hosts"
    shutil.copy(sshd.client_key, key)
    shutil.copy(sshd.known_hosts, kh)
    ws = tmp_path / "work space" / "it's"
    run = deploy(sshd.base_args(**{"--identity": str(key), "--known-hosts": str(kh)}) + CPU +
                 ["--workspace", str(ws), "--skip", "install", "--skip", "suite"], tmp_path / "r")
    assert run.code == 0, run.out
    assert _report(tmp_path / "r")["sync"]["method"] == "rsync"
    assert (ws / "pipeline" / "steps.py").is_file()


def _home_with_ssh_config(tmp_path: Path, text: str) -> Path:
    home = tmp_path / "home dir"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(text)
    return home


def test_ssh_config_hostname_user_port_identity_known_hosts(sshd, tmp_path):
    home = _home_with_ssh_config(tmp_path, f"""
Host gpu-box
  HostName 127.0.0.1
  User {USER}
  Port {sshd.port}
  IdentityFile {sshd.client_key}
  UserKnownHostsFile "{sshd.known_hosts}"
""")
    run = deploy(["--host", "gpu-box", *CPU, *ONLY_CONNECT], tmp_path / "r", env={"HOME": str(home)})
    assert run.code == 0, run.out
    doc = _report(tmp_path / "r")
    assert (doc["host"], doc["address"], doc["port"], doc["user"]) == ("gpu-box", "127.0.0.1", sshd.port, USER)
    # a flag beats ssh_config: the wrong key given on the command line is the one tried
    run = deploy(["--host", "gpu-box", "--identity", str(sshd.wrong_key), *CPU, *ONLY_CONNECT], tmp_path / "r2",
                 env={"HOME": str(home)})
    assert run.code == 3 and _report(tmp_path / "r2")["verdict"] == "REFUSED: authentication"


def _jump_config(sshd, jump, tmp_path: Path) -> Path:
    kh = tmp_path / "known hosts"
    kh.write_text(sshd.known_hosts.read_text() + jump.known_hosts.read_text())
    return _home_with_ssh_config(tmp_path, f"""
Host jumpbox
  HostName 127.0.0.1
  Port {jump.port}
  User {USER}
  IdentityFile {jump.client_key}
  UserKnownHostsFile "{kh}"
Host behind
  HostName 127.0.0.1
  Port {sshd.port}
  User {USER}
  IdentityFile {sshd.client_key}
  UserKnownHostsFile "{kh}"
  ProxyJump jumpbox
""")


def _forwarded(jump) -> int:
    return jump.log.read_text().count("new direct-tcpip")


def test_proxy_jump_for_the_connection_and_for_rsync(sshd, jump, tmp_path):
    home = _jump_config(sshd, jump, tmp_path)
    before = _forwarded(jump)
    run = deploy(["--host", "behind", *CPU, "--workspace", str(tmp_path / "ws"), "--skip", "install",
                  "--skip", "suite"], tmp_path / "r", env={"HOME": str(home)})
    assert run.code == 0, run.out
    doc = _report(tmp_path / "r")
    assert f"via {USER}@127.0.0.1:{jump.port}" in doc["steps"][0]["detail"]
    assert doc["sync"]["method"] == "rsync" and (tmp_path / "ws" / "pipeline" / "steps.py").is_file()
    assert _forwarded(jump) - before == 2          # the pipeline's own connection, and rsync's ssh


def test_fab_runs_every_host_and_keeps_the_gateway(sshd, jump, tmp_path, code_snapshot):
    """`fab -H behind,127.0.0.1:CLOSED validate`: the first goes through its ProxyJump, the second is
    unreachable, both are reported, the exit code is the worst (3) and comes after both."""
    if not FAB.exists():
        pytest.skip("fab (fabric) not installed in this environment")
    home = _jump_config(sshd, jump, tmp_path)
    closed = free_port()
    before = _forwarded(jump)
    p = subprocess.run([str(FAB), "-H", f"127.0.0.1:{closed},behind", "validate", "--require-gpu", "none",
                        "--model", "tiny", "--python", sys.executable, "--report-dir", str(tmp_path / "r"),
                        "--connect-timeout", "3", *ONLY_CONNECT], cwd=code_snapshot, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "HOME": str(home)})
    assert p.returncode == 3, p.stdout + p.stderr
    docs = {d["host"]: d for d in (json.loads(f.read_text()) for f in (tmp_path / "r").glob("*.json"))
            if d["schema"] == "flashcore.report/1"}                       # beside them: the fleet's summary
    assert docs[f"127.0.0.1:{closed}"]["verdict"] == "UNREACHABLE"
    assert docs["behind"]["verdict"] == "PASSED (suite skipped)" and _forwarded(jump) - before == 1
    assert "via" in docs["behind"]["steps"][0]["detail"] and docs["behind"]["reproduce"].startswith("fab -H behind ")


def test_fab_help_list_hosts_dry_run_version(sshd, tmp_path, code_snapshot):
    if not FAB.exists():
        pytest.skip("fab (fabric) not installed in this environment")

    def fab(*args):
        return subprocess.run([str(FAB), *args], cwd=code_snapshot, capture_output=True, text=True, timeout=60)
    for flag in ("-h", "--help"):
        p = fab("validate", flag)
        assert p.returncode == 0 and "--wheelhouse" in p.stdout and "--lock-timeout" in p.stdout
    p = fab("validate", "--version")
    assert p.returncode == 0 and p.stdout.startswith("flashcore-deploy 0.1.0")
    host = f"{USER}@127.0.0.1:{sshd.port}"
    p = fab("-H", host, "-i", str(sshd.client_key), "validate", "--list-hosts", "--known-hosts",
            str(sshd.known_hosts))
    assert p.returncode == 0 and p.stdout.startswith(f"127.0.0.1:{sshd.port}\t{USER}@127.0.0.1:{sshd.port}")
    p = fab("-H", host, "-i", str(sshd.client_key), "validate", "--dry-run", "--known-hosts", str(sshd.known_hosts),
            "--report-dir", str(tmp_path / "r"))
    assert p.returncode == 0 and "## suite" in p.stdout and f"IdentityFile \"{sshd.client_key}\"" in p.stdout
    assert not (tmp_path / "r").exists()
