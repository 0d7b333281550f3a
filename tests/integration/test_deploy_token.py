"""The token step against a local HTTP stand-in for the hub (HF_ENDPOINT): ok / no token / invalid token /
no access / hub unreachable, and a planted HF_TOKEN that must appear in no output, log, report, remote file or
remote command line (the sshd fixture records every command line it is asked to run)."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.harness import deploy, free_port

pytestmark = pytest.mark.integration
GOOD = "hf_PlantedSecretTokenWithAccess0123456789"
NO_ACCESS = "hf_PlantedSecretTokenNoAccess9876543210"
REPO_ID = "example-org/gated-model"


class _Hub(BaseHTTPRequestHandler):
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


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
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
