"""Fixtures: a real single-node Slurm (tests/slurm/cluster.py) started once per session and stopped at its end, and
workspaces on its "shared filesystem" (this machine's disk). Skipped, with the reason, where it cannot start: Slurm
or munge not installed (scripts/bootstrap.sh installs them as root with apt) or not root."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.slurm.cluster` importable however pytest was started
    sys.path.insert(0, str(REPO))

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
def code_workspace(tmp_path_factory) -> Path:
    """A workspace holding a frozen copy of the checkout (the files the pipeline syncs), as the login node's
    sync would leave it; the tasks run the parity suite from there."""
    from pipeline.local import collect_tree

    root = tmp_path_factory.mktemp("shared") / "flashcore-workspace"
    for rel in collect_tree(REPO).files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    return root


@pytest.fixture
def workspace(tmp_path) -> Path:
    """An empty workspace, for arrays whose tasks run a plain command instead of the suite."""
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws
