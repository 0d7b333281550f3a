"""Harness for the integration tests and benchmarks/bench_pipeline.py: `deploy()` runs the real CLI; `start_sshd()`
starts a real OpenSSH sshd on 127.0.0.1: a free
non-default port, key-only, its own host key, authorized key and known_hosts; every command line it is asked to
run is recorded in commands.log (a ForceCommand wrapper that then runs it with sh -c, as sshd would)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if Path(p).exists()), None)
KEYGEN = shutil.which("ssh-keygen")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    port: int
    dir: Path
    client_key: Path
    wrong_key: Path
    known_hosts: Path
    host_pub: str            # "ssh-ed25519 AAAA..."
    log: Path
    commands: Path           # every command line the pipeline ran on this "remote"

    def base_args(self, **over) -> list[str]:
        args = {"--host": "127.0.0.1", "--port": str(self.port), "--user": os.environ.get("USER") or "root",
                "--identity": str(self.client_key), "--known-hosts": str(self.known_hosts),
                "--connect-timeout": "5"}
        args.update({k: v for k, v in over.items() if v is not None})
        return [x for kv in args.items() for x in kv]


def _keygen(path: Path) -> None:
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def start_sshd(d: Path, with_sftp: bool = True, log_level: str = "VERBOSE",
               path_first: Path | None = None) -> tuple[Sshd, subprocess.Popen]:
    """Start sshd in `d` (keys, config, logs live there); returns when it accepts connections. A
    host without an SFTP subsystem (`with_sftp=False`: no `Subsystem sftp` line, sshd refuses the request).
    `path_first`: a folder put first on every session's PATH (a fake nvidia-smi: this box has no GPU)."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key", "wrong_key"):
        _keygen(d / name)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    log = d / "sshd.log"
    # Every command line the pipeline sends is recorded (ForceCommand wrapper -> commands.log) and then run
    # as sshd would (sh -c); the token test greps that log. SFTP requests go to the real sftp-server.
    sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                             "/usr/lib/ssh/sftp-server") if Path(p).exists()), "internal-sftp")
    wrapper = d / "logcmd.sh"
    wrapper.write_text(f"""#!/bin/sh
printf '%s\\n' "$SSH_ORIGINAL_COMMAND" >> {d}/commands.log
{f'export PATH="{path_first}:$PATH"' if path_first else ''}
case "$SSH_ORIGINAL_COMMAND" in
  *sftp-server|internal-sftp|sftp) exec {sftp if sftp != "internal-sftp" else "false"} ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
""")
    wrapper.chmod(0o755)
    (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {d}/sshd.pid
LogLevel {log_level}
MaxSessions 50
MaxStartups 50
ForceCommand {wrapper}
""" + (f"Subsystem sftp {sftp}\n" if with_sftp else ""))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-f", str(d / "sshd_config"), "-E", str(log)])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
    host_pub = " ".join((d / "host_key.pub").read_text().split()[:2])
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    return Sshd(port, d, d / "client_key", d / "wrong_key", d / "known_hosts", host_pub, log, d / "commands.log"), proc


@dataclass
class Run:
    code: int
    out: str                 # stdout + stderr
    seconds: float
    report_dir: Path
    err: str = ""            # stderr alone

    def report(self) -> dict:
        files = sorted(self.report_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        assert files, f"no report written in {self.report_dir}:\n{self.out}"
        return json.loads(files[-1].read_text())

    def report_md(self) -> str:
        files = sorted(self.report_dir.glob("*.md"), key=lambda p: p.stat().st_mtime)
        assert files, f"no Markdown report in {self.report_dir}"
        return files[-1].read_text()


CODE = {"root": REPO}  # set to the frozen snapshot by the code_snapshot fixture


def deploy(args: list[str], report_dir: Path, env: dict | None = None, timeout: float = 240,
           cwd: Path | None = None) -> Run:
    """Run the real CLI (`python -m pipeline.cli`, from the code snapshot) as a subprocess, output captured."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--report-dir", str(report_dir)],
                       cwd=cwd or CODE["root"], env=_env(env), capture_output=True, text=True, timeout=timeout)
    return Run(p.returncode, p.stdout + p.stderr, time.monotonic() - t0, report_dir, p.stderr)


def _env(env: dict | None) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    e.update(env or {})
    return e


class Background:
    """The real CLI running in the background (a subprocess of its own): wait for a line, signal it, finish."""

    def __init__(self, args: list[str], report_dir: Path, env: dict | None = None, cwd: Path | None = None):
        self.report_dir = report_dir
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args, "--report-dir", str(report_dir)],
                                     cwd=cwd or CODE["root"], env=_env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.err = ""
        self._seen = threading.Condition()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def _read_err(self) -> None:
        self.err = self.proc.stderr.read()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        with self._seen:
            ok = self._seen.wait_for(lambda: any(text in x for x in self.lines) or self.proc.poll() is not None,
                                     timeout)
        assert ok and any(text in x for x in self.lines), f"{text!r} never came:\n{''.join(self.lines)}{self.err}"

    def finish(self, timeout: float = 60) -> Run:
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)
        out = "".join(self.lines)
        return Run(code, out + self.err, 0.0, self.report_dir, self.err)


# A local HTTP stand-in for the Hugging Face hub (HF_ENDPOINT): whoami and auth-check for two planted tokens.
GOOD = "hf_PlantedSecretTokenWithAccess0123456789"
NO_ACCESS = "hf_PlantedSecretTokenNoAccess9876543210"
REPO_ID = "example-org/gated-model"


class Hub(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if self.path.startswith("/api/whoami-v2"):
            if token in (GOOD, NO_ACCESS):
                return self._send(200, {"type": "user", "name": "planted-user", "auth": {}})
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        if self.path.startswith(f"/api/models/{REPO_ID}/auth-check"):
            if token == GOOD:
                return self._send(200, {})
            return self._send(403, {"error": "gated"}, {"X-Error-Code": "GatedRepo",
                                                         "X-Error-Message": "Access to this repo is restricted"})
        return self._send(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})

    def _send(self, code, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass



def start_hub() -> tuple[str, ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def alive(pid: int) -> bool:
    """A process that runs (a zombie is dead for our purpose)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_sshd(sshd_dir: Path, master_too: bool = False) -> None:
    """Kill an sshd's per-connection processes (every connection drops), and its master too (no way back)."""
    master = int((sshd_dir / "sshd.pid").read_text())
    children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    assert children, "no per-connection sshd to kill"
    if master_too:
        os.kill(master, signal.SIGKILL)
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)


def hanging_suite(d: Path) -> tuple[str, Path]:
    """A suite command that records its pid and a child's, says "hanging", and waits (for a signal or a kill)."""
    pids = d / "pids"
    script = d / "hang.sh"
    script.write_text(f"#!/bin/sh\necho $$ > {pids}\nsleep 300 &\necho $! >> {pids}\necho hanging\nwait\n")
    script.chmod(0o755)
    return str(script), pids


def summary_links(report_dir: Path) -> list[Path]:
    """The host reports a fleet summary (the one summary-*.md in `report_dir`) links to, resolved as a browser or
    GitHub resolves them: relative to the summary file's own folder, whatever the run's working directory was."""
    (md,) = report_dir.glob("summary-*.md")
    links = re.findall(r"\[report\]\(([^)]+)\)", md.read_text())
    assert links and not any(Path(x).is_absolute() for x in links), links
    return [md.parent / x for x in links]
