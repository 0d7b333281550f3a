"""The token step against a local HTTP stand-in for the hub (HF_ENDPOINT): ok / no token / invalid token /
no access / hub unreachable, and a planted HF_TOKEN that must appear in no output, log, report, remote file or
remote command line (the sshd fixture records every command line it is asked to run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.integration.harness import GOOD, NO_ACCESS, REPO_ID, deploy, free_port, start_hub

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hub():
    url, server = start_hub()
    yield url
    server.shutdown()


def _run(sshd, workspace, tmp_path, env):
    args = sshd.base_args() + ["--require-gpu", "none", "--model", REPO_ID, "--python", sys.executable,
                               "--workspace", str(workspace), "--skip", "suite"]
    return deploy(args, tmp_path, env={"HF_HOME": str(tmp_path / "hf-home"), **env})


def _everything_written(run, workspace: Path) -> str:
    texts = [run.out]
    texts += [p.read_text(errors="replace") for p in run.report_dir.rglob("*") if p.is_file()]
    texts += [p.read_text(errors="replace") for p in (workspace / ".flashcore").rglob("*") if p.is_file()]
    return "\n".join(texts)


def test_token_ok_and_never_leaks(sshd, workspace, tmp_path, hub):
    log_before = sshd.commands.stat().st_size
    run = _run(sshd, workspace, tmp_path, {"HF_TOKEN": GOOD, "HF_ENDPOINT": hub})
    assert run.code == 0, run.out[-3000:]
    step = {s["name"]: s for s in run.report()["steps"]}["token"]
    assert step["status"] == "ok" and "planted-user" in step["detail"] and "$HF_TOKEN" in step["detail"]
    assert GOOD not in _everything_written(run, workspace)
    command_lines = sshd.commands.read_text(errors="replace")[log_before:]
    assert "HF_TOKEN_PATH" in command_lines   # the commands ARE recorded, so the next line means something
    assert GOOD not in command_lines
    assert GOOD not in sshd.log.read_text(errors="replace")
    assert not (workspace / ".flashcore" / "hf_token").exists()   # removed after the run


@pytest.mark.parametrize("case, env, words", [
    ("no token", {}, "no HF token"),
    ("invalid", {"HF_TOKEN": "hf_NotARealTokenAtAll000000000"}, "invalid token"),
    ("no access", {"HF_TOKEN": NO_ACCESS}, "no access"),
    ("unreachable", {"HF_TOKEN": GOOD, "HF_ENDPOINT": "http://127.0.0.1:{closed}"}, "hub unreachable"),
])
def test_token_failures_are_distinguished(sshd, workspace, tmp_path, hub, case, env, words):
    env = {"HF_ENDPOINT": hub, **{k: v.format(closed=free_port()) for k, v in env.items()}}
    run = _run(sshd, workspace, tmp_path, env)
    assert run.code == 5, run.out[-3000:]
    doc = run.report()
    assert doc["verdict"] == "ERROR: token step failed"
    assert words in doc["error"], doc["error"]
    for secret in (GOOD, NO_ACCESS, "hf_NotARealTokenAtAll000000000"):
        assert secret not in _everything_written(run, workspace)
