"""Fixtures: a real single-node Slurm (tests/slurm/cluster.py) started once per session and stopped at its end,
workspaces on its "shared filesystem" (this machine's disk), a frozen copy of the checkout, and a real OpenSSH
sshd on loopback as the login node (tests/integration/harness.py). Skipped, with the reason, where they cannot
start: Slurm or munge not installed (scripts/bootstrap.sh installs them as root with apt), no sshd, or not root."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.slurm.cluster` importable however pytest was started
    sys.path.insert(0, str(REPO))

from tests.integration.harness import KEYGEN, SSHD, Sshd, start_sshd  # noqa: E402
from tests.slurm.cluster import Cluster, missing, start_cluster  # noqa: E402


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    why = missing()
    if why:
        pytest.skip(why)
    c = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()
    assert not c.leftovers(), "a process of the test cluster outlived it"


@pytest.fixture
def idle(cluster: Cluster) -> Cluster:
    """The cluster with no job left by an earlier test and its node idle."""
    assert not cluster.active_jobs(), f"jobs left running: {cluster.active_jobs()}"
    cluster.wait_node("idle")
    return cluster


@pytest.fixture(scope="session")
def checkout(tmp_path_factory) -> Path:
    """A frozen copy of the checkout (exactly the files the pipeline syncs): what the CLI runs from and syncs,
    untouched by other work in the checkout while the tests run."""
    from pipeline.local import collect_tree

    root = tmp_path_factory.mktemp("code") / "flashcore"
    for rel in collect_tree(REPO).files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    return root


@pytest.fixture(scope="session")
def login_sshd(tmp_path_factory) -> Sshd:
    """The login node over SSH: a real OpenSSH sshd on loopback in front of the cluster."""
    if not SSHD or not KEYGEN:
        pytest.skip("OpenSSH server not installed (scripts/bootstrap.sh installs openssh-server)")
    server, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture
def workspace(tmp_path) -> Path:
    """An empty workspace, for arrays whose tasks run a plain command instead of the suite."""
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws
