"""Fixtures: a real OpenSSH sshd on 127.0.0.1 (free non-default port, key-only, its own host key and known_hosts)
started once per session, a frozen code snapshot every run syncs from, and a shared remote workspace. The helpers
the tests call (deploy, Run) live in harness.py: test modules must not import conftest (pytest loads it as its own
module, and a second import would be a second copy with its own state).

Skipped, with the reason, only when sshd is not installed (scripts/bootstrap.sh installs it in CI)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.integration.harness` importable however pytest was started
    sys.path.insert(0, str(REPO))

from tests.integration.harness import CODE, KEYGEN, SSHD, Sshd, start_sshd  # noqa: E402


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
    CODE["root"] = root
    return root


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """One remote workspace shared by the tests, so the venv is built once and reused (as on a real host)."""
    return tmp_path_factory.mktemp("remote") / "flashcore-workspace"
