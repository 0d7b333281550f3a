"""A real OpenSSH sshd on 127.0.0.1 (free non-default port, key-only, its own host key and known_hosts), started
once per session, and helpers to run the real `flashcore-deploy` against it as a subprocess.

Skipped, with the reason, only when sshd is not installed (scripts/bootstrap.sh installs it in CI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.loopback_sshd import KEYGEN, REPO, SSHD, Sshd, free_port, start_sshd  # noqa: F401


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Sshd:
    if not SSHD or not KEYGEN:
        pytest.skip("OpenSSH server not installed (scripts/bootstrap.sh installs openssh-server)")
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd fixture runs as root (sshd privilege separation)")
    server, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


@dataclass
class Run:
    code: int
    out: str
    seconds: float
    report_dir: Path

    def report(self) -> dict:
        import json
        files = sorted(self.report_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        assert files, f"no report written in {self.report_dir}:\n{self.out}"
        return json.loads(files[-1].read_text())

    def report_md(self) -> str:
        files = sorted(self.report_dir.glob("*.md"), key=lambda p: p.stat().st_mtime)
        assert files, f"no Markdown report in {self.report_dir}"
        return files[-1].read_text()


_CODE = {"root": REPO}


@pytest.fixture(scope="session", autouse=True)
def code_snapshot(tmp_path_factory) -> Path:
    """A frozen copy of the checkout (exactly the files the pipeline syncs) that every deploy() runs from: other
    work in the same checkout must not change what a test syncs between its runs."""
    import shutil

    from pipeline.local import collect_tree

    root = tmp_path_factory.mktemp("code")
    for rel in collect_tree(REPO).files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    _CODE["root"] = root
    return root


def deploy(args: list[str], report_dir: Path, env: dict | None = None, timeout: float = 240) -> Run:
    """Run the real CLI (`python -m pipeline.cli`, from the code snapshot) as a subprocess, output captured."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    e.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--report-dir", str(report_dir)],
                       cwd=_CODE["root"], env=e, capture_output=True, text=True, timeout=timeout)
    return Run(p.returncode, p.stdout + p.stderr, time.monotonic() - t0, report_dir)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """One remote workspace shared by the tests, so the venv is built once and reused (as on a real host)."""
    return tmp_path_factory.mktemp("remote") / "flashcore-workspace"
