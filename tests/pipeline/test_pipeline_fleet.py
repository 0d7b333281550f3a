"""The fleet without SSH: the scheduler (the bound, order, an exception as that host's UNKNOWN, a host ignoring its
wall limit given up while the others finish, a signal reaching every host), Cancel's children, the live and plain
views, transient connect failures tried again (auth never), the history's judgement at the top of a host report,
and the fleet's command line (--gpus, --parallel, --target @file, the inventory's history:/gpus:, its lock)."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import cli, fleet, ssh
from pipeline.errors import AuthenticationError, HostKeyError, Interrupted, UnreachableError, WallTimeout, verdict_for
from pipeline.remote import Cancel
from pipeline.results import HostRunResult
from pipeline.runner import RunEvent
from pipeline.schedule import inventory_lock
from pipeline.settings import Flags, HostConfig, resolve

REPO = Path(__file__).resolve().parents[2]


def _hosts(n: int) -> list[HostConfig]:
    return [HostConfig(name=f"h{i}", address="10.0.0.1") for i in range(n)]


def _res(cfg: HostConfig, verdict: str = "PASSED", code: int = 0, error: str = "") -> HostRunResult:
    return HostRunResult(host=cfg.name, address=cfg.address, port=22, user="root", local=False, model="tiny",
                         verdict=verdict, exit_code=code, error=error)


def _unknown(cfg: HostConfig, why: str) -> HostRunResult:
    return _res(cfg, "UNKNOWN", 5, why)


def test_the_bound_the_order_and_an_exception_as_that_hosts_unknown():
    running, peak, lock = [0], [0], threading.Lock()

    def run_one(cfg, cancel):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        if cfg.name == "h3":
            raise RuntimeError("a bug in one host's run")
        return _res(cfg)

    out = fleet.run_hosts(_hosts(7), run_one, parallel=3, cancel=Cancel(), wall=lambda c: 60, unknown=_unknown,
                          poll_s=0.02)
    assert [r.host for r in out] == [f"h{i}" for i in range(7)]
    assert peak[0] == 3
    assert [r.verdict for r in out].count("PASSED") == 6
    assert out[3].verdict == "UNKNOWN" and "RuntimeError" in out[3].error and "a bug" in out[3].error


def test_a_host_that_ignores_its_wall_limit_is_given_up_and_holds_no_one_up():
    stuck = threading.Event()
    seen: dict[str, Cancel] = {}

    def run_one(cfg, cancel):
        seen[cfg.name] = cancel
        if cfg.name == "h0":
            stuck.wait(30)                         # ignores its cancellation altogether
        else:
            time.sleep(0.3)
        return _res(cfg)

    t0 = time.monotonic()
    out = fleet.run_hosts(_hosts(3), run_one, parallel=3, cancel=Cancel(), wall=lambda c: 0.5, unknown=_unknown,
                          grace_s=0.5, poll_s=0.02)
    took = time.monotonic() - t0
    stuck.set()
    assert 0.9 <= took < 5
    assert out[0].verdict == "UNKNOWN" and "wall limit of 0.5 s" in out[0].error and "given up" in out[0].error
    assert [r.verdict for r in out[1:]] == ["PASSED", "PASSED"]
    assert seen["h0"].is_set() and isinstance(seen["h0"].error("suite"), WallTimeout)
    assert not seen["h1"].is_set()                  # the others were not stopped


def test_the_wall_limit_stops_a_host_through_its_cancel_as_timed_out():
    def run_one(cfg, cancel):
        if cancel.wait(10):
            e = cancel.error("suite")
            verdict, code = verdict_for(e, "suite", False)
            return _res(cfg, verdict, code, str(e))
        return _res(cfg)

    [r] = fleet.run_hosts(_hosts(1), run_one, parallel=1, cancel=Cancel(), wall=lambda c: 0.3, unknown=_unknown,
                          poll_s=0.02)
    assert (r.verdict, r.exit_code) == ("TIMED OUT", 5)
    assert "host wall limit of 0.3 s reached (--host-timeout); stopped during suite" == r.error


def test_a_signal_reaches_every_host_and_the_waiting_ones_start_at_once():
    parent = Cancel()

    def run_one(cfg, cancel):
        if cancel.wait(10):
            e = cancel.error("suite")
            return _res(cfg, e.verdict, e.exit_code, str(e))
        return _res(cfg)

    threading.Timer(0.3, parent.set, args=(signal.SIGTERM,)).start()
    t0 = time.monotonic()
    out = fleet.run_hosts(_hosts(4), run_one, parallel=1, cancel=parent, wall=lambda c: 60, unknown=_unknown,
                          poll_s=0.02)
    assert time.monotonic() - t0 < 3
    assert [(r.verdict, r.exit_code) for r in out] == [("INTERRUPTED", 143)] * 4


def test_cancel_children():
    parent = Cancel()
    a = parent.child()
    a.expire("host wall limit of 3 s reached")
    assert a.is_set() and not parent.is_set()
    assert isinstance(a.error("lock"), WallTimeout) and str(a.error("lock")).endswith("stopped during lock")
    b = parent.child()
    parent.set(signal.SIGINT)
    assert b.is_set() and isinstance(b.error("x"), Interrupted) and b.error("x").exit_code == 130
    assert isinstance(a.error("x"), WallTimeout)    # already stopped by its limit: it stays a timeout
    late = parent.child()
    assert late.is_set() and late.signum == signal.SIGINT


def test_live_view_rows_and_rendering():
    from rich.console import Console

    buf = io.StringIO()
    view = fleet.LiveView(["gpu-box", "lab-b"], console=Console(file=buf, force_terminal=True, width=160))
    for ev in (RunEvent("gpu-box", "step", step="connect"), RunEvent("gpu-box", "step", step="suite"),
               RunEvent("gpu-box", "step", step="suite", tag="gpu0"), RunEvent("gpu-box", "step", step="suite",
                                                                                   tag="gpu1"),
               RunEvent("gpu-box", "line", tag="gpu1", text="[gpu-box gpu1] test_parity_suite.py ...."),
               RunEvent("gpu-box", "end", step="suite", tag="gpu0", status="failed", text="parity failed"),
               RunEvent("lab-b", "step", step="connect"),
               RunEvent("lab-b", "done", status="3", text="UNREACHABLE")):
        view.event(ev)
    rows = view.table_rows(now=time.monotonic() + 65)
    assert [r[:3] for r in rows] == [["gpu-box", "", "suite"], ["", "gpu0", "suite (failed)"],
                                     ["", "gpu1", "suite"], ["lab-b", "", "done"]]
    assert rows[0][3].startswith("1:0") and rows[2][4].endswith("test_parity_suite.py ....")
    assert rows[3][4] == "UNREACHABLE"
    assert "[gpu-box gpu0] suite failed: parity failed" in buf.getvalue()    # above the table, as it happened
    view.console.print(view)
    text = buf.getvalue()
    assert "gpu1" in text and "elapsed" in text and "lab-b" in text


def test_plain_view_keeps_lines_whole_across_threads():
    out = io.StringIO()
    view = fleet.PlainView(out=out)
    threads = [threading.Thread(target=lambda i=i: [view.line(f"[h{i}] line {n} " + "x" * 50) for n in range(200)])
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1600 and all(ln.startswith("[h") and ln.endswith("x" * 50) for ln in lines)


def test_transient_connect_failures_are_tried_again_auth_never(monkeypatch):
    monkeypatch.setattr(ssh, "CONNECT_BACKOFF_S", (0.01, 0.02))
    cfg = HostConfig(name="h", address="10.0.0.1")
    calls, said = [], []

    def flaky(c):
        calls.append(1)
        if len(calls) < 3:
            raise UnreachableError("10.0.0.1:22: cannot connect (Connection refused)", transient=True)
        return "conn", []

    monkeypatch.setattr(ssh, "_connect_once", flaky)
    assert ssh.connect(cfg, Cancel(), said.append) == ("conn", []) and len(calls) == 3
    assert said[0].endswith("attempt 1 of 3, again in 0.01 s") and len(said) == 2

    for error in (AuthenticationError("auth failed"), HostKeyError("host key CHANGED"),
                  UnreachableError("cannot resolve the host name")):
        calls.clear()
        monkeypatch.setattr(ssh, "_connect_once", lambda c, e=error: (calls.append(1), (_ for _ in ()).throw(e)))
        with pytest.raises(type(error)):
            ssh.connect(cfg, Cancel())
        assert len(calls) == 1                                 # never tried again

    calls.clear()
    monkeypatch.setattr(ssh, "_connect_once", flaky)
    always = UnreachableError("refused", transient=True)
    monkeypatch.setattr(ssh, "_connect_once", lambda c: (calls.append(1), (_ for _ in ()).throw(always)))
    with pytest.raises(UnreachableError):
        ssh.connect(cfg, Cancel())
    assert len(calls) == 3                                     # bounded
    stop = Cancel()
    stop.set(signal.SIGINT)
    with pytest.raises(Interrupted):
        ssh.connect(cfg, stop)


def test_what_counts_as_transient():
    from paramiko.ssh_exception import AuthenticationException, NoValidConnectionsError, SSHException

    from pipeline.known_hosts import load_known_hosts
    cfg = HostConfig(name="h", address="10.0.0.1", known_hosts=())
    known = load_known_hosts(())

    def mapped(e):
        return ssh.map_exception(e, "root@10.0.0.1:22", cfg, known)
    refused = NoValidConnectionsError({("10.0.0.1", 22): ConnectionRefusedError(111, "refused")})
    assert mapped(refused).transient and mapped(TimeoutError()).transient and mapped(EOFError()).transient
    assert mapped(SSHException("Error reading SSH protocol banner")).transient
    assert mapped(SSHException("No existing session")).transient          # the handshake did not finish in time
    assert mapped(ConnectionResetError(104, "reset")).transient
    assert not isinstance(mapped(AuthenticationException("no")), UnreachableError)
    assert not mapped(SSHException("Incompatible ssh peer (no acceptable kex algorithm)")).transient
    unreach = NoValidConnectionsError({("10.0.0.1", 22): OSError(113, "No route to host")})
    assert not mapped(unreach).transient


# ------------------------------------------------------------------------------------------------ the command line


def _inventory(tmp_path: Path, extra: str = "") -> Path:
    inv = tmp_path / "inventory.yaml"
    inv.write_text(f"""
defaults: {{gpu: none, model: tiny}}
hosts:
  a: {{address: 127.0.0.1, port: 1}}
  b: {{address: 127.0.0.1, port: 2, gpus: [0, 2], timeouts: {{host: 60}}}}
  c: {{address: 127.0.0.1, port: 3}}
groups:
  ab: [a, b]
{extra}""")
    return inv


@pytest.mark.parametrize("argv, words", [
    (["--host", "h", "--gpus", "0,x"], "--gpus: '0,x' is not a list of GPU indices"),
    (["--host", "h", "--parallel", "0"], "--parallel: 0 must be at least 1"),
    (["--host", "h", "--host-timeout", "inf"], "--host-timeout"),
    (["--inventory", "{inv}", "--target", "@{tmp}/missing.txt"], "cannot read it"),
    (["--inventory", "{inv}", "--target", "@{tmp}/empty.txt"], "lists no host"),
    (["--inventory", "{inv}", "--target", "@{tmp}/unknown.txt"], "unknown target 'zz'"),
])
def test_fleet_flags_bad_input_exit_2(tmp_path, capsys, argv, words):
    inv = _inventory(tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "unknown.txt").write_text("a\nzz\n")
    argv = [x.format(inv=inv, tmp=tmp_path) for x in argv]
    assert cli.main([*argv, "--ssh-config", "none"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_target_file_and_inventory_fleet_keys(tmp_path, capsys):
    inv = _inventory(tmp_path, "history: /srv/flashcore/history.sqlite\n")
    rerun = tmp_path / "rerun.txt"
    rerun.write_text("# hosts that did not pass\nc\nab   # a group\na\n")
    assert cli.main(["--inventory", str(inv), "--target", f"@{rerun}", "--list-hosts", "--ssh-config", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split("\t")[0] for x in lines] == ["c", "a", "b"]           # file order, each once
    assert "(GPUs 0,2)" in next(x for x in lines if x.startswith("b\t"))
    flags = Flags(inventory=str(inv), target="ab", ssh_config="none")
    a, b = resolve(flags, REPO)
    assert flags.history == "/srv/flashcore/history.sqlite"              # the inventory's history:
    assert (a.gpus, a.host_timeout, b.gpus, b.host_timeout) == (None, None, (0, 2), 60.0)
    flags = Flags(inventory=str(inv), target="ab", ssh_config="none", history="/elsewhere.sqlite", gpus=(1,))
    a, b = resolve(flags, REPO)
    assert flags.history == "/elsewhere.sqlite" and a.gpus == b.gpus == (1,)   # flags win
    assert cli.is_fleet(Flags(target="ab"), [a, b]) and cli.is_fleet(Flags(target="@x"), [a])
    assert not cli.is_fleet(Flags(target="a"), [a]) and not cli.is_fleet(Flags(host="h"), [a])


def test_bad_fleet_keys_in_the_inventory_exit_2(tmp_path, capsys):
    for bad, words in (("  d: {address: h, gpus: [-1]}", "hosts.d.gpus: GPU indices are 0 or more"),
                       ("  d: {address: h, timeouts: {host: 0}}", "hosts.d.timeouts.host"),
                       ("  d: {address: h, gpus: []}", "hosts.d.gpus")):
        inv = tmp_path / "bad.yaml"
        inv.write_text(f"hosts:\n{bad}\n")
        assert cli.main(["--inventory", str(inv), "--target", "d", "--list-hosts"]) == 2
        assert words in capsys.readouterr().err


def test_a_second_run_of_one_inventory_stops_at_once_exit_6(tmp_path, capsys):
    inv = _inventory(tmp_path)
    with inventory_lock(inv):
        t0 = time.monotonic()
        code = cli.main(["--inventory", str(inv), "--target", "ab", "--report-dir", str(tmp_path / "r"),
                         "--ssh-config", "none"])
    assert code == 6 and time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert f"another run of {inv} is in progress (pid " in err and err.count("\n") == 1
    assert not list((tmp_path / "r").glob("*.json"))                    # no host was run


def test_a_single_host_run_is_judged_and_recorded_without_a_summary(tmp_path, capsys):
    """--local five times with a parity document whose error margin jumps on the last two: the history judges the
    last a regression; it is at the top of that report, on stderr, and the exit code is 1; no summary files."""
    src = json.loads((REPO / "tests" / "pipeline" / "fixtures" / "parity" / "pass_cpu_tiny.json").read_text())
    codes = []
    for night, margin in enumerate((0.50, 0.50, 0.50, 0.90, 0.90)):
        doc = json.loads(json.dumps(src))
        for s in doc["scenarios"]:
            if s["name"] == "batch_4":
                s["measured"] = {k: (margin if k.endswith("err_over_bound") else v) for k, v in s["measured"].items()}
        path = tmp_path / f"doc{night}.json"
        path.write_text(json.dumps(doc))
        codes.append(cli.main(["--local", "--workspace", str(tmp_path / "ws"), "--report-dir", str(tmp_path / "r"),
                               "--skip", "sync", "--skip", "install",
                               "--suite-command", f"cp {path} \"$FLASHCORE_PARITY_JSON\""]))
        time.sleep(1.01)                                  # start times are in seconds: "earlier" needs another
    assert codes == [0, 0, 0, 0, 1]                                      # 3 to learn, flagged twice: 1
    err = capsys.readouterr().err
    assert "flashcore-deploy: local: REGRESSION: cpu: tiny.err_bound.batch_4" in err
    last = max((tmp_path / "r").glob("local-*.md"))
    md = last.read_text()
    assert md.splitlines()[0] == "# flashcore validation — local: PASSED, REGRESSION"
    assert md.index("## Regressions") < md.index("## Host and GPU")
    assert "- **cpu: tiny.err_bound.batch_4 0.9 vs 0.5 (+80%" in md
    assert not list((tmp_path / "r").glob("summary-*"))
    from pipeline.history import HistoryStore
    with HistoryStore(tmp_path / "r" / "history.sqlite") as store:
        assert [r.status for r in store.results()] == ["passed"] * 5     # a regression is a judgement, not a fail


def test_the_checkout_is_read_once_for_the_whole_fleet(tmp_path, capsys, monkeypatch):
    # Every host needs the checkout's facts (tree and hash, revision, catalogue, token); none of them depends on
    # the host, so a fleet reads them once (here: the plans of three hosts, which gather them as a run does).
    from pipeline import local
    walks = []
    real = local.collect_tree
    monkeypatch.setattr(local, "collect_tree", lambda root: walks.append(root) or real(root))
    inv = tmp_path / "inventory.yaml"
    inv.write_text("defaults: {gpu: none, model: tiny}\nhosts:\n  a: {address: 10.0.0.1}\n  b: {address: 10.0.0.2}\n"
                   "  c: {address: 10.0.0.3}\n")
    assert cli.main(["--inventory", str(inv), "--target", "all", "--dry-run", "--ssh-config", "none"]) == 0
    assert capsys.readouterr().out.count("## connect") == 3
    assert len(walks) == 1
    # a real run: the options fleet.run_fleet makes for each host share one Checkout (the hosts are not run)
    made = []

    def run_fleet(hosts, make_opts, fo, cancel, view):
        made.extend(make_opts(cfg) for cfg in hosts)
        return [], SimpleNamespace(paths={}, exit_code=0)

    monkeypatch.setattr(fleet, "run_fleet", run_fleet)
    assert cli.main(["--inventory", str(inv), "--target", "all", "--ssh-config", "none",
                     "--report-dir", str(tmp_path / "r")]) == 0
    assert len(made) == 3 and made[0].checkout is made[1].checkout is made[2].checkout
    assert [o.reproduce for o in made] != [made[0].reproduce] * 3   # per-host options stay per host


def test_a_checkout_read_by_many_threads_at_once_is_read_once_and_its_failure_kept(monkeypatch):
    from pipeline import runner
    calls = []

    def slow_read(opts):
        calls.append(opts)
        time.sleep(0.1)
        if opts == "broken":
            raise OSError("checkout unreadable")
        return {"revision": "abc"}

    monkeypatch.setattr(runner, "_read_checkout", slow_read)
    shared, got = runner.Checkout(), []
    threads = [threading.Thread(target=lambda: got.append(shared.get("opts"))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [{"revision": "abc"}] * 5 and len(calls) == 1
    broken = runner.Checkout()
    for _ in range(2):
        with pytest.raises(OSError, match="unreadable"):
            broken.get("broken")
    assert len(calls) == 2
