"""Faults leave nothing behind, against the real loopback sshd: SIGINT / SIGTERM / SIGHUP mid-suite and Ctrl-C
mid-install (remote groups killed, token removed, report "interrupted"), a dropped connection (cleaned up over
a fresh one; without one, what may be left is named and the host's lock holder cleans up), two runs on one
workspace (the lock: busy with its own exit code, the first run untouched; a waiting run gets the lock), a host
without SFTP, and runs in threads sharing one cancellation."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.harness import (CODE, GOOD, REPO, REPO_ID, Background, alive, deploy, hanging_suite,
                                       kill_sshd, start_hub, start_sshd)

pytestmark = pytest.mark.integration
PASSING_DOC = REPO / "tests" / "pipeline" / "fixtures" / "parity" / "pass_cpu_tiny.json"
NO_SYNC = ["--skip", "sync", "--skip", "install"]


@pytest.fixture(scope="module")
def hub():
    url, server = start_hub()
    yield url
    server.shutdown()


def _args(sshd, ws: Path, *extra: str, model: str = "tiny") -> list[str]:
    return [*sshd.base_args(), "--require-gpu", "none", "--model", model, "--python", sys.executable,
            "--workspace", str(ws), *extra]


def _report(report_dir: Path) -> dict:
    files = sorted(report_dir.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def _all_dead(pids: list[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_mid_suite_kills_the_group_removes_the_token_reports_interrupted(sshd, hub, tmp_path, sig, code):
    """What cron, systemd and CI send: like Ctrl-C. A hub model, so that a token file is on the host."""
    script, pids = hanging_suite(tmp_path)
    ws = tmp_path / "ws"
    run = Background(_args(sshd, ws, *NO_SYNC, "--timeout", "120", "--suite-command", script, model=REPO_ID),
                     tmp_path / "r", env={"HF_TOKEN": GOOD, "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")})
    run.wait_for("hanging")
    token = ws / ".flashcore" / "hf_token"
    assert token.is_file() and (ws / ".flashcore" / "lock.owner").is_file()     # there is something to clean up
    run.proc.send_signal(sig)
    res = run.finish()
    assert res.code == code, res.out
    doc = _report(tmp_path / "r")
    assert doc["verdict"] == "INTERRUPTED" and doc["exit_code"] == code
    assert signal.Signals(sig).name in doc["error"] and "during suite" in doc["error"]
    assert {s["name"]: s["status"] for s in doc["steps"]}["suite"] == "failed"
    assert _all_dead(_pids(pids)), "a process of the suite's group survived"
    assert not token.exists() and not (ws / ".flashcore" / "lock.owner").exists()
    assert not (ws / ".flashcore" / "suite.pid").exists()
    assert f"{signal.Signals(sig).name}: stopping" in res.err and "Traceback" not in res.err
    assert res.err.strip().splitlines()[-1].startswith(f"flashcore-deploy: 127.0.0.1:{sshd.port}: INTERRUPTED: ")
    assert GOOD not in res.out


def test_ctrl_c_during_install_stops_the_remote_installer(sshd, tmp_path):
    """The host's python hangs while installing: Ctrl-C must stop it there too (its process group is killed)."""
    pids = tmp_path / "pids"
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\ncase \"$1\" in -c) exec {sys.executable} \"$@\";; esac\n"
                    f"echo $$ > {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n")
    slow.chmod(0o755)
    ws = tmp_path / "ws"
    run = Background([*sshd.base_args(), "--require-gpu", "none", "--model", "tiny", "--python", str(slow),
                      "--workspace", str(ws), "--skip", "sync"], tmp_path / "r")
    run.wait_for("install  ...")
    deadline = time.monotonic() + 30
    while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = _pids(pids)
    run.proc.send_signal(signal.SIGINT)
    res = run.finish()
    assert res.code == 130, res.out
    doc = _report(tmp_path / "r")
    assert doc["verdict"] == "INTERRUPTED" and "during install" in doc["error"]
    assert _all_dead(started), "the remote installer kept running"
    assert not (ws / ".flashcore" / "install.pid").exists()


def test_dropped_connection_reconnects_once_to_clean_up(sshd, hub, tmp_path):
    """The SSH connection dies mid-suite (its sshd processes are killed): exit 3, the report is written, and a
    fresh connection kills the suite's group and removes the token; no paramiko traceback on stderr."""
    script, pids = hanging_suite(tmp_path)
    ws = tmp_path / "ws"
    run = Background(_args(sshd, ws, *NO_SYNC, "--timeout", "120", "--suite-command", script, model=REPO_ID),
                     tmp_path / "r", env={"HF_TOKEN": GOOD, "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")})
    run.wait_for("hanging")
    before = sshd.commands.stat().st_size
    kill_sshd(sshd.dir)
    res = run.finish()
    assert res.code == 3, res.out
    doc = _report(tmp_path / "r")
    assert doc["verdict"] == "UNREACHABLE" and "connection dropped" in doc["error"]
    assert "reconnecting once to clean up" in res.out and doc["left_behind"] == []
    assert "kg " in sshd.commands.read_text()[before:]                  # the cleanup command, over a new connection
    assert _all_dead(_pids(pids)) and not (ws / ".flashcore" / "hf_token").exists()
    assert "Traceback" not in res.err and res.err.count("\n") == 1


def test_after_a_drop_no_command_or_transfer_opens_a_new_connection(sshd, tmp_path):
    """The run's one connection drops (its sshd processes killed; sshd itself still accepts): every later command,
    transfer and rsync of that run fails as UNREACHABLE instead of Fabric silently connecting again (the host's
    lock holder has cleaned up by then); nothing reaches the host until the cleanup reconnects, on purpose, once."""
    from pipeline.errors import UnreachableError
    from pipeline.settings import Flags, resolve
    from pipeline.ssh import SSHRemote

    (cfg,) = resolve(Flags(host="127.0.0.1", port=sshd.port, user=os.environ.get("USER") or "root",
                           identity=str(sshd.client_key), known_hosts=str(sshd.known_hosts), ssh_config="none"), REPO)
    remote = SSHRemote(cfg)
    try:
        assert remote.run("echo before-the-drop", timeout=10).stdout.strip() == "before-the-drop"
        assert remote.get(str(sshd.known_hosts), str(tmp_path / "k"))           # SFTP opened before the drop
        logins = sshd.log.read_text().count("Accepted publickey")
        kill_sshd(sshd.dir)
        deadline = time.monotonic() + 10
        while remote.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        attempts = {"run": lambda: remote.run("echo after-the-drop", timeout=10),
                    "get": lambda: remote.get(str(sshd.known_hosts), str(tmp_path / "k2")),
                    "put": lambda: remote.put(str(sshd.known_hosts), str(tmp_path / "put")),
                    "rsync": lambda: remote.rsync_target(str(tmp_path / "ws"))}
        for what, attempt in attempts.items():
            with pytest.raises(UnreachableError, match="connection dropped"):
                attempt()
        assert sshd.log.read_text().count("Accepted publickey") == logins, "a new connection was opened"
        assert "after-the-drop" not in sshd.commands.read_text() and not (tmp_path / "put").exists()
        fresh = remote.reconnect()                                               # the cleanup's way back
        try:
            assert fresh.run("echo cleanup", timeout=10).stdout.strip() == "cleanup"
        finally:
            fresh.close()
    finally:
        remote.close()


def test_a_drop_between_steps_fails_the_next_one_instead_of_running_it_on_a_new_connection(sshd, tmp_path):
    """The connection drops while this machine's rsync is starting (a wrapper that waits 2 s: no command of the
    run is on the connection then, so nothing notices at once): the next step that needs the host fails as
    UNREACHABLE, its command never reaches the host, the rest are skipped, and only the cleanup reconnects."""
    import shutil

    started = tmp_path / "rsync-started"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rsync").write_text(f'#!/bin/sh\ntouch {started}\nsleep 2\nexec {shutil.which("rsync")} "$@"\n')
    (bin_dir / "rsync").chmod(0o755)
    run = Background(_args(sshd, tmp_path / "ws", "--skip", "install", "--suite-command", "echo the-suite-ran"),
                     tmp_path / "r", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    deadline = time.monotonic() + 60
    while not started.exists() and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    before = sshd.commands.stat().st_size
    kill_sshd(sshd.dir)
    res = run.finish()
    assert res.code == 3, res.out
    doc = _report(tmp_path / "r")
    status = {s["name"]: s["status"] for s in doc["steps"]}
    failed = next(s for s in doc["steps"] if s["status"] == "failed")
    assert doc["verdict"] == "UNREACHABLE" and status["sync"] == "ok" and failed["name"] in ("token", "suite")
    assert "connection dropped" in failed["detail"] and "connection dropped" in doc["error"]
    assert "reconnecting once to clean up" in res.out
    assert "the-suite-ran" not in sshd.commands.read_text()[before:]


def test_dropped_connection_without_a_way_back_names_what_is_left(tmp_path, hub):
    """The host's sshd dies entirely (no reconnect): the output and the report say exactly what may be left; the
    lock holder on the host, seeing its connection close, kills the group and removes the token itself."""
    server, proc = start_sshd(tmp_path / "sshd")
    try:
        script, pids = hanging_suite(tmp_path)
        ws = tmp_path / "ws"
        run = Background(_args(server, ws, *NO_SYNC, "--timeout", "120", "--suite-command", script, model=REPO_ID),
                         tmp_path / "r", env={"HF_TOKEN": GOOD, "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")})
        run.wait_for("hanging")
        kill_sshd(server.dir, master_too=True)
        res = run.finish()
    finally:
        proc.kill()
        proc.wait()
    assert res.code == 3, res.out
    doc = _report(tmp_path / "r")
    left = " ".join(doc["left_behind"])
    assert f"{ws}/.flashcore/suite.pid" in left and f"{ws}/.flashcore/hf_token" in left
    assert "could not clean up on the host" in res.out and "Possibly left there" in res.out
    assert "Possibly left on the host" in next((tmp_path / "r").glob("*.md")).read_text()
    assert _all_dead(_pids(pids), within=10), "the lock holder did not kill the orphaned suite"
    assert not (ws / ".flashcore" / "hf_token").exists()


def test_second_run_on_a_busy_workspace_exits_6_and_leaves_the_first_alone(sshd, tmp_path):
    script, pids = hanging_suite(tmp_path)
    ws = tmp_path / "ws"
    first = Background(_args(sshd, ws, *NO_SYNC, "--timeout", "120", "--suite-command", script), tmp_path / "r1")
    first.wait_for("hanging")
    t0 = time.monotonic()
    second = deploy(_args(sshd, ws, "--skip", "suite", "--lock-timeout", "1"), tmp_path / "r2")
    assert second.code == 6, second.out
    assert 1 <= time.monotonic() - t0 < 30
    user = os.environ.get("USER") or "root"
    held_by = f"held by {user}@{socket.gethostname()}, pid {first.proc.pid}, since "
    assert held_by in second.err and second.err.count("\n") == 1
    doc = _report(tmp_path / "r2")
    assert doc["verdict"] == "BUSY" and doc["exit_code"] == 6 and held_by in doc["error"]
    assert all(alive(p) for p in _pids(pids)), "the busy run touched the first run's suite"
    first.proc.send_signal(signal.SIGINT)
    assert first.finish().code == 130
    assert _all_dead(_pids(pids))
    third = deploy(_args(sshd, ws, "--skip", "suite", "--skip", "sync", "--skip", "install", "--lock-timeout", "0"),
                   tmp_path / "r3")
    assert third.code == 0, third.out                                      # released: the next run gets it


def test_a_waiting_run_gets_the_lock_when_the_first_ends(sshd, tmp_path):
    ws = tmp_path / "ws"
    first = Background(_args(sshd, ws, *NO_SYNC, "--suite-command", "echo started; sleep 4"), tmp_path / "r1")
    first.wait_for("started")
    second = deploy(_args(sshd, ws, *NO_SYNC, "--skip", "suite", "--lock-timeout", "60"), tmp_path / "r2")
    assert second.code == 0, second.out
    assert "busy: held by" in second.out and "waiting up to 60 s" in second.out
    assert "locked after waiting" in {s["name"]: s for s in _report(tmp_path / "r2")["steps"]}["lock"]["detail"]
    assert first.finish().code == 5                   # its suite wrote no results: its own business, run to its end


def test_host_without_sftp_transfers_over_the_exec_channel(tmp_path, code_snapshot):
    """No `Subsystem sftp`: the tarball goes up and the results come back over the exec channel (no rsync here
    either, so the tar path is taken); a passing suite is reported as passed."""
    server, proc = start_sshd(tmp_path / "sshd", with_sftp=False)
    try:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("git", "sh"):
            (bin_dir / tool).symlink_to(__import__("shutil").which(tool))
        ws = tmp_path / "ws"
        run = deploy(_args(server, ws, "--skip", "install", "--suite-command",
                           f"cp {PASSING_DOC} \"$FLASHCORE_PARITY_JSON\"; echo '<testsuite/>' > \"$FLASHCORE_JUNIT\""),
                     tmp_path / "r", env={"PATH": str(bin_dir)})
    finally:
        proc.terminate()
        proc.wait()
    assert run.code == 0, run.out
    doc = _report(tmp_path / "r")
    assert doc["verdict"] == "PASSED" and doc["sync"]["method"] == "tar"
    assert any("no SFTP" in n for n in doc["notes"])
    assert (ws / "pipeline" / "steps.py").read_bytes() == (code_snapshot / "pipeline" / "steps.py").read_bytes()
    fetched = tmp_path / "r" / doc["artifacts"]["parity.json"]
    assert json.loads(fetched.read_text()) == json.loads(PASSING_DOC.read_text())


def test_runs_in_threads_share_one_cancellation(sshd, tmp_path):
    """run_host from several threads at once (what a fleet does): one workspace admits one run (the other is
    BUSY); one Cancel, set as the CLI's signal handler would, stops every active run and each cleans up."""
    from pipeline.remote import Cancel
    from pipeline.runner import RunOptions, run_host
    from pipeline.settings import Flags, resolve

    def cfg(ws, **kw):
        flags = Flags(host="127.0.0.1", port=sshd.port, user=os.environ.get("USER") or "root",
                      identity=str(sshd.client_key), known_hosts=str(sshd.known_hosts), require_gpu="none",
                      model="tiny", python=sys.executable, workspace=str(ws), ssh_config="none", **kw)
        return resolve(flags, CODE["root"])[0]

    def run_all(jobs, cancel):
        results = [None] * len(jobs)

        def one(i):
            config, suite = jobs[i]
            opts = RunOptions(skip=frozenset({"sync", "install"}), report_dir=str(tmp_path / f"r{i}"),
                              suite_command=suite, out=lambda line: None, code_root=CODE["root"], cancel=cancel)
            results[i] = run_host(config, opts)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        return threads, results

    passing = f"sleep 3; cp {PASSING_DOC} \"$FLASHCORE_PARITY_JSON\""
    shared = cfg(tmp_path / "shared", lock_timeout=0)
    threads, results = run_all([(shared, passing), (shared, passing)], Cancel())
    for t in threads:
        t.join(60)
    assert sorted(r.verdict for r in results) == ["BUSY", "PASSED"], [r.error for r in results]

    hangs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        hangs.append(hanging_suite(tmp_path / name))
    cancel = Cancel()
    threads, results = run_all([(cfg(tmp_path / "ws-a"), hangs[0][0]), (cfg(tmp_path / "ws-b"), hangs[1][0])], cancel)
    deadline = time.monotonic() + 60
    while not all(p.exists() and len(p.read_text().split()) == 2 for _, p in hangs) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = [pid for _, p in hangs for pid in _pids(p)]
    assert len(started) == 4 and all(alive(p) for p in started)
    cancel.set(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert [(r.verdict, r.exit_code) for r in results] == [("INTERRUPTED", 143)] * 2
    assert _all_dead(started)
    for ws in ("ws-a", "ws-b"):
        assert not (tmp_path / ws / ".flashcore" / "lock.owner").exists()
