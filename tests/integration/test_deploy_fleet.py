"""Fleets against several real sshds on loopback: every host at once within --parallel; hosts that are down,
silent (a listening socket that never speaks), dropped mid-suite (their sshd killed), failing, or past their wall
limit are each named with the step that broke while the rest pass, and nothing is left running; SIGINT / SIGTERM
mid-fleet; a planted HF token in no output; two hosts running the real tiny suite into the history; a multi-GPU
host validating each GPU with a suite of its own at once; `fab -H a,b validate` at once; `fab nightly`.

The suites are the `--suite-command` testing aid (a script whose behaviour each host picks through its inventory
`env:`) where the real suite is not the point; `test_two_hosts_run_the_real_tiny_suite...` runs the real one."""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import (CODE, GOOD, REPO, REPO_ID, Background, alive, deploy, free_port, kill_sshd,
                                       start_hub, start_sshd, summary_links)

pytestmark = pytest.mark.integration
USER = os.environ.get("USER") or "root"
PASS_DOC = REPO / "tests" / "pipeline" / "fixtures" / "parity" / "pass_cpu_tiny.json"
FAIL_DOC = REPO / "tests" / "pipeline" / "fixtures" / "parity" / "fail_h100_synthetic.json"
NO_SYNC = ["--skip", "sync", "--skip", "install"]


def fake_suite(d: Path) -> str:
    """The suite stand-in: FAKE_SUITE=pass (a second, then the passing document), fail (the failing document,
    exit 1), hang (its pids in d/$FAKE_NAME.pids, "hanging", then waits for a signal or a kill), leak (prints the
    token file it was given, as a careless library might, then passes)."""
    script = d / "suite.sh"
    script.write_text(f"""#!/bin/sh
case "$FAKE_SUITE" in
  fail) cp {FAIL_DOC} "$FLASHCORE_PARITY_JSON"; echo failing; exit 1;;
  hang) echo $$ > {d}/$FAKE_NAME.pids; sleep 300 & echo $! >> {d}/$FAKE_NAME.pids; echo hanging; wait;;
  leak) echo "token: $(cat "$HF_TOKEN_PATH")"; cp {PASS_DOC} "$FLASHCORE_PARITY_JSON";;
  *) sleep 1; cp {PASS_DOC} "$FLASHCORE_PARITY_JSON"; echo passed;;
esac
""")
    script.chmod(0o755)
    return str(script)


def write_inventory(path: Path, hosts: dict, group: str = "fleet", **defaults) -> Path:
    """An inventory (JSON is YAML) of `hosts`, all in `group`."""
    doc = {"defaults": {"user": USER, "gpu": "none", "model": "tiny", "python": sys.executable,
                        "timeouts": {"connect": 2}, **defaults},
           "hosts": hosts, "groups": {group: list(hosts)}}
    path.write_text(json.dumps(doc))
    return path


def on(sshd, ws: Path, **kw) -> dict:
    """An inventory host entry on `sshd` with its own workspace."""
    return {"address": "127.0.0.1", "port": sshd.port, "identity": str(sshd.client_key),
            "known_hosts": str(sshd.known_hosts), "workspace": str(ws), **kw}


def reports(report_dir: Path) -> dict[str, dict]:
    """The host reports by host (the summary's JSON has another schema)."""
    docs = (json.loads(p.read_text()) for p in report_dir.glob("*.json"))
    return {d["host"]: d for d in docs if d.get("schema") == "flashcore.report/1"}


def summary(report_dir: Path) -> dict:
    [path] = report_dir.glob("summary-*.json")
    return json.loads(path.read_text())


def pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def all_dead(found: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while any(alive(p) for p in found) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(p) for p in found)


def nothing_runs_under(prefix: Path, within: float = 10.0) -> list[str]:
    """Command lines of processes that still mention `prefix` (a workspace: its lock holder or suite)."""
    deadline = time.monotonic() + within
    while True:
        out = subprocess.run(["pgrep", "-af", str(prefix)], capture_output=True, text=True).stdout.splitlines()
        left = [x for x in out if "pgrep" not in x]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def wait_until(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_broken_hosts_are_named_the_rest_pass_nothing_is_left(sshd, tmp_path):
    """Seven hosts at once: two pass; one is down (closed port), one accepts TCP and never speaks, one has its sshd
    killed mid-suite, one's suite fails, one runs past its wall limit (`timeouts: {host: 8}`). The summary names
    each broken one with the step that broke; the passing ones are not held up; nothing runs afterwards."""
    suite = fake_suite(tmp_path)
    dropped, dropped_proc = start_sshd(tmp_path / "sshd-dropped")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)                          # the kernel accepts the TCP connection; nobody ever answers
    ws = tmp_path / "ws"
    hosts = {
        "ok-a": on(sshd, ws / "a"), "ok-b": on(sshd, ws / "b"),
        "down": {"address": "127.0.0.1", "port": free_port()},
        "silent": {"address": "127.0.0.1", "port": silent.getsockname()[1]},
        "dropped": on(dropped, ws / "dropped", env={"FAKE_SUITE": "hang", "FAKE_NAME": "dropped"}),
        "failing": on(sshd, ws / "failing", env={"FAKE_SUITE": "fail"}),
        "slow": on(sshd, ws / "slow", env={"FAKE_SUITE": "hang", "FAKE_NAME": "slow"}, timeouts={"host": 8}),
    }
    inv = write_inventory(tmp_path / "inventory.yaml", hosts, known_hosts=str(sshd.known_hosts))
    try:
        t0 = time.monotonic()
        run = Background(["--inventory", str(inv), "--target", "fleet", "--parallel", "8", *NO_SYNC,
                          "--suite-command", suite], tmp_path / "r")
        run.wait_for("[dropped suite] hanging")
        kill_sshd(dropped.dir, master_too=True)              # no way back: the host's lock holder cleans up
        res = run.finish(timeout=120)
        took = time.monotonic() - t0
    finally:
        silent.close()
        dropped_proc.kill()
        dropped_proc.wait()
    assert res.code == 5, res.out                             # the worst: the wall limit's TIMED OUT (5)
    docs = reports(tmp_path / "r")
    assert {h: d["verdict"] for h, d in docs.items()} == {
        "ok-a": "PASSED", "ok-b": "PASSED", "down": "UNREACHABLE", "silent": "UNREACHABLE",
        "dropped": "UNREACHABLE", "failing": "FAILED: parity", "slow": "TIMED OUT"}
    assert "no SSH banner" in docs["silent"]["error"] and "cannot connect" in docs["down"]["error"]
    assert "connection dropped" in docs["dropped"]["error"] and "wall limit of 8 s" in docs["slow"]["error"]
    for host in ("down", "silent"):                          # transient failures were tried again, twice
        assert [x for x in res.out.splitlines() if x.startswith(f"[{host}] connect") and "attempt" in x and
                "again in" in x][-1].count("attempt 2 of 3") == 1, res.out
    assert all(docs[h]["duration_s"] < 20 for h in ("ok-a", "ok-b")), "the passing hosts were held up"
    assert took < 90
    s = summary(tmp_path / "r")
    broke = {row["result"]["host"]: (row["result"]["status"], row["result"]["failed_step"]) for row in s["rows"]}
    assert broke == {"ok-a": ("passed", ""), "ok-b": ("passed", ""), "down": ("unreachable", "connect"),
                     "silent": ("unreachable", "connect"), "dropped": ("unreachable", "suite"),
                     "failing": ("failed", "suite"), "slow": ("error", "suite")}
    md = next((tmp_path / "r").glob("summary-*.md")).read_text()
    for host, step in (("down", "connect"), ("silent", "connect"), ("dropped", "suite"), ("failing", "suite")):
        assert any(line.startswith(f"| {host} |") and f"| {step} |" in line for line in md.splitlines()), host
    assert sorted(s["rerun"]) == ["down", "dropped", "failing", "silent", "slow"]
    assert "<testsuites" in next((tmp_path / "r").glob("summary-*.junit.xml")).read_text()
    # nothing left running on any host: the suites' groups, the lock holders
    assert all_dead(pids(tmp_path / "dropped.pids") + pids(tmp_path / "slow.pids"))
    assert nothing_runs_under(ws) == []
    assert not list(ws.rglob("*.pid")) and not list(ws.rglob("lock.owner"))
    # the summary's rerun file is a target: exactly the broken hosts
    rerun = tmp_path / "r" / s["rerun_file"]
    listed = deploy(["--inventory", str(inv), "--target", f"@{rerun}", "--list-hosts"], tmp_path / "r2")
    assert listed.code == 0 and sorted(x.split("\t")[0] for x in listed.out.splitlines()) == sorted(s["rerun"])


def test_the_summary_links_each_host_report_from_its_own_folder(sshd, tmp_path):
    """The report links of summary-*.md open relative to the summary file's folder (reports are named relative to
    it, and named at all though each host is judged before its report is written), the run started elsewhere."""
    suite = fake_suite(tmp_path)
    hosts = {h: on(sshd, tmp_path / f"ws-{h}", env={"FAKE_SUITE": h}) for h in ("pass", "fail")}
    inv = write_inventory(tmp_path / "inventory.yaml", hosts)
    run = deploy(["--inventory", str(inv), "--target", "fleet", *NO_SYNC, "--suite-command", suite], tmp_path / "r")
    assert run.code == 1, run.out
    heads = sorted(p.read_text().splitlines()[0] for p in summary_links(tmp_path / "r"))
    assert heads == ["# flashcore validation — fail: FAILED: parity", "# flashcore validation — pass: PASSED"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_fleet_every_host_reports_interrupted(sshd, tmp_path, sig, code):
    """Three hosts, two at a time, both suites hanging: Ctrl-C (130) or SIGTERM (143) stops them, every host's
    report says INTERRUPTED (the third, never started, too), the summary is written, nothing is left."""
    suite = fake_suite(tmp_path)
    ws = tmp_path / "ws"
    hosts = {f"h{i}": on(sshd, ws / str(i), env={"FAKE_SUITE": "hang", "FAKE_NAME": f"h{i}"}) for i in range(3)}
    inv = write_inventory(tmp_path / "inventory.yaml", hosts)
    run = Background(["--inventory", str(inv), "--target", "fleet", "--parallel", "2", *NO_SYNC,
                      "--suite-command", suite], tmp_path / "r")
    wait_until(lambda: sum(len(pids(tmp_path / f"h{i}.pids")) == 2 for i in range(3)) == 2, what="two suites")
    started = [p for i in range(3) for p in pids(tmp_path / f"h{i}.pids")]
    run.proc.send_signal(sig)
    res = run.finish(timeout=60)
    assert res.code == code, res.out
    docs = reports(tmp_path / "r")
    assert sorted(docs) == ["h0", "h1", "h2"]
    assert {d["verdict"] for d in docs.values()} == {"INTERRUPTED"}
    assert {d["exit_code"] for d in docs.values()} == {code}
    assert sorted(d["error"].rsplit(" ", 1)[-1] for d in docs.values()) == ["connect", "suite", "suite"]
    assert {row["result"]["status"] for row in summary(tmp_path / "r")["rows"]} == {"interrupted"}
    assert all_dead(started) and nothing_runs_under(ws) == []
    assert "Traceback" not in res.out


def test_a_planted_token_appears_in_no_output_of_a_fleet(sshd, tmp_path):
    """A hub model on two hosts, the token from HF_TOKEN, and a suite that prints the token file it is given:
    stdout, stderr, every report, fetched log, summary and the history, and every command line the hosts were
    sent, are free of it; the token file is gone from both hosts."""
    url, server = start_hub()
    try:
        suite = fake_suite(tmp_path)
        ws = tmp_path / "ws"
        hosts = {h: on(sshd, ws / h, env={"FAKE_SUITE": "leak"}) for h in ("a", "b")}
        inv = write_inventory(tmp_path / "inventory.yaml", hosts, model=REPO_ID)
        before = sshd.commands.stat().st_size
        run = deploy(["--inventory", str(inv), "--target", "fleet", *NO_SYNC, "--suite-command", suite],
                     tmp_path / "r", env={"HF_TOKEN": GOOD, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf")})
    finally:
        server.shutdown()
    assert run.code == 0, run.out
    assert "token: ***" in run.out                                      # it was printed, and redacted
    assert {d["verdict"] for d in reports(tmp_path / "r").values()} == {"PASSED"}
    written = [p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()]
    assert any(b"history" in p.name.encode() for p in (tmp_path / "r").iterdir())
    assert not any(GOOD.encode() in b for b in written)
    assert GOOD not in run.out and GOOD not in sshd.commands.read_text(errors="replace")[before:]
    assert not list(ws.rglob("hf_token"))


def test_two_hosts_run_the_real_tiny_suite_into_the_history(sshd, workspace, tmp_path):
    """The real parity suite (tiny preset, CPU) on two hosts at once: both pass, the history has a record per
    host, the summary a row per host, and `flashcore-deploy history` reads it back and draws the trend."""
    hosts = {"tiny-a": on(sshd, workspace), "tiny-b": on(sshd, tmp_path / "ws-b")}
    inv = write_inventory(tmp_path / "inventory.yaml", hosts)
    history = tmp_path / "h" / "history.sqlite"
    run = deploy(["--inventory", str(inv), "--target", "fleet", "--parallel", "2", "--timeout", "600",
                  "--history", str(history)], tmp_path / "r", timeout=900)
    assert run.code == 0, run.out[-4000:]
    docs = reports(tmp_path / "r")
    assert {h: (d["verdict"], d["parity"]["passed"]) for h, d in docs.items()} == \
        {"tiny-a": ("PASSED", True), "tiny-b": ("PASSED", True)}
    a, b = (docs[h] for h in ("tiny-a", "tiny-b"))
    assert a["started_at"] <= b["finished_at"] and b["started_at"] <= a["finished_at"]   # at once
    assert [row["gpu"] for row in summary(tmp_path / "r")["rows"]] == ["cpu", "cpu"]
    from pipeline.history import HistoryStore
    with HistoryStore(history) as store:
        assert store.hosts() == ["tiny-a", "tiny-b"]
        assert {r.status for r in store.results()} == {"passed"}
        assert any(m.startswith("tiny.err_bound.") for m in store.metric_names())   # the model first
    view = subprocess.run([sys.executable, "-m", "pipeline.cli", "history", "--history", str(history), "--metric",
                           "tiny.err_bound.batch_4", "--plot", str(tmp_path / "trend.png")], cwd=CODE["root"],
                          capture_output=True, text=True, timeout=120)
    assert view.returncode == 0, view.stdout + view.stderr
    assert "tiny-a" in view.stdout and "tiny-b" in view.stdout and (tmp_path / "trend.png").stat().st_size > 1000


FAKE_GPUS = 3


def fake_nvidia_smi(d: Path, busy_index: int = 1) -> Path:
    """THE ONE MOCK: this box has no GPU, so an `nvidia-smi` first on the sshd session's PATH reports three H100s
    (GPU 1 with a process on it) in exactly the formats `commands.gpu_query_command` asks for."""
    bin_dir = d / "fake-bin"
    bin_dir.mkdir(parents=True)
    gpus = "".join(f"echo '{i}, NVIDIA H100 80GB HBM3, GPU-fake{i}-0000-4000-8000-00000000000{i}, 9.0, 81559, 1, "
                   f"550.90.07, 0, Disabled'; " for i in range(FAKE_GPUS))
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"""#!/bin/sh
case "$*" in
  *--query-gpu=*) {gpus};;
  *--query-compute-apps=*) echo 'GPU-fake{busy_index}-0000-4000-8000-00000000000{busy_index}, 4242, python, 30000';;
  *) echo 'NVIDIA-SMI 550.90.07   Driver Version: 550.90.07   CUDA Version: 12.4';;
esac
""")
    tool.chmod(0o755)
    return bin_dir


def recording_suite(d: Path) -> tuple[str, Path]:
    """A suite stand-in that logs when it starts and ends, its pid, CUDA_VISIBLE_DEVICES and results path."""
    log = d / "suites.log"
    script = d / "gpu-suite.sh"
    script.write_text(f"""#!/bin/sh
echo "start $(date +%s.%N) $$ $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER $FLASHCORE_PARITY_JSON" >> {log}
echo "suite on GPU $CUDA_VISIBLE_DEVICES"
sleep 2
cp {PASS_DOC} "$FLASHCORE_PARITY_JSON"
echo "end $(date +%s.%N) $$ $CUDA_VISIBLE_DEVICES" >> {log}
""")
    script.chmod(0o755)
    return str(script), log


def test_each_gpu_of_a_host_runs_its_own_suite_at_once(tmp_path):
    """A 3-GPU host (the fake nvidia-smi above; no GPU here): one suite process per GPU, pinned with distinct
    CUDA_VISIBLE_DEVICES, each with its own results folder, at the same time; the report has a row per GPU
    (index and UUID) and names the busy one; `--gpus 0,2` runs two and names GPU 1 not validated; the history
    keeps a record per GPU."""
    server, proc = start_sshd(tmp_path / "sshd", path_first=fake_nvidia_smi(tmp_path))
    try:
        suite, log = recording_suite(tmp_path)
        args = [*server.base_args(), "--python", sys.executable, "--workspace", str(tmp_path / "ws"), *NO_SYNC,
                "--suite-command", suite]
        run = deploy(args, tmp_path / "r")
        first = log.read_text().splitlines()
        log.unlink()
        some = deploy([*args, "--gpus", "0,2"], tmp_path / "r2")
        second = log.read_text().splitlines()
    finally:
        proc.terminate()
        proc.wait()
    assert run.code == 0, run.out
    starts = [x.split() for x in first if x.startswith("start")]
    ends = [x.split() for x in first if x.startswith("end")]
    assert len(starts) == len(ends) == FAKE_GPUS
    assert sorted(s[3] for s in starts) == ["0", "1", "2"]                          # CUDA_VISIBLE_DEVICES
    assert {s[4] for s in starts} == {"PCI_BUS_ID"} and len({s[2] for s in starts}) == FAKE_GPUS   # own pids
    assert sorted(s[5] for s in starts) == [f"{tmp_path}/ws/.flashcore/results/gpu{i}/parity.json"
                                            for i in range(FAKE_GPUS)]
    assert max(float(s[1]) for s in starts) < min(float(e[1]) for e in ends), "the suites did not overlap"
    doc = run.report()
    assert doc["verdict"] == "PASSED" and doc["parity"] is None
    assert [(s["gpu_index"], s["cuda_visible_devices"], s["status"]) for s in doc["suites"]] == \
        [(i, str(i), "ok") for i in range(FAKE_GPUS)]
    assert all(s["artifacts"]["parity.json"].endswith(f"/gpu{s['gpu_index']}/parity.json") for s in doc["suites"])
    assert "pid 4242 python" in doc["suites"][1]["busy"]
    md = run.report_md()
    assert "## Per GPU" in md and md.count("## Parity — GPU") == FAKE_GPUS
    for i in range(FAKE_GPUS):
        assert f"| {i} | GPU-fake{i}-0000-4000-8000-00000000000{i} | NVIDIA H100 80GB HBM3 | PASSED |" in md
    assert f"[127.0.0.1:{server.port} gpu1] suite on GPU 1" in run.out               # output tagged per GPU
    end = rf"^\[127\.0\.0\.1:{server.port}\] suite    "                         # each GPU's end line, then the step's
    for i in range(FAKE_GPUS):
        assert re.search(end + rf"gpu{i}: ok \(\d+\.\d\d s\) ", run.out, re.M), run.out
    assert re.search(end + r"ok \(\d+\.\d\d s\) ", run.out, re.M), run.out
    assert some.code == 0, some.out
    assert sorted(x.split()[3] for x in second if x.startswith("start")) == ["0", "2"]
    md2 = some.report_md()
    assert "Selected with `--gpus 0,2`; not validated: GPU 1." in md2
    from pipeline.history import HistoryStore
    with HistoryStore(tmp_path / "r2" / "history.sqlite") as store:
        rows = store.db.execute("SELECT gpu_index, gpu_uuid, status, note FROM results ORDER BY gpu_index").fetchall()
    assert [(r[0], r[2]) for r in rows] == [(0, "passed"), (1, "not run"), (2, "passed")]
    assert rows[1][1] == "GPU-fake1-0000-4000-8000-000000000001" and "not selected (--gpus 0,2)" in rows[1][3]


def test_fab_hosts_run_at_once(sshd, tmp_path, code_snapshot):
    """`fab -H a,b validate`: the hosts' runs overlap (a python that takes 2 s to answer the probe logs when),
    and the fleet's summary is written beside their reports."""
    fab = Path(sys.executable).parent / "fab"
    if not fab.exists():
        pytest.skip("fab (fabric) not installed in this environment")
    log = tmp_path / "probe.log"
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\necho \"start $(date +%s.%N)\" >> {log}\nsleep 2\necho \"end $(date +%s.%N)\" "
                    f">> {log}\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_pub}\n[localhost]:{sshd.port} {sshd.host_pub}\n")
    only_connect = [x for s in ("gpu", "sync", "install", "token", "suite") for x in ("--skip", s)]
    p = subprocess.run([str(fab), "-H", f"{USER}@127.0.0.1:{sshd.port},{USER}@localhost:{sshd.port}", "-i",
                        str(sshd.client_key), "validate", "--known-hosts", str(kh), "--require-gpu", "none",
                        "--python", str(slow), "--workspace", str(tmp_path / "ws"), "--report-dir",
                        str(tmp_path / "r"), *only_connect], cwd=code_snapshot, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(reports(tmp_path / "r")) == [f"127.0.0.1:{sshd.port}", f"localhost:{sshd.port}"]
    stamps = [x.split() for x in log.read_text().splitlines()]
    starts, ends = [float(t) for w, t in stamps if w == "start"], [float(t) for w, t in stamps if w == "end"]
    assert len(starts) == 2 and max(starts) < min(ends), "the two hosts ran one after the other"
    assert len(summary(tmp_path / "r")["rows"]) == 2


def test_fab_nightly_runs_the_inventorys_target_with_its_summary(sshd, tmp_path, code_snapshot):
    fab = Path(sys.executable).parent / "fab"
    if not fab.exists():
        pytest.skip("fab (fabric) not installed in this environment")
    hosts = {h: on(sshd, tmp_path / "ws" / h) for h in ("n1", "n2")}
    inv = write_inventory(tmp_path / "inventory.yaml", hosts, group="nightly")
    skip = [x for s in ("gpu", "sync", "install", "token", "suite") for x in ("--skip", s)]
    p = subprocess.run([str(fab), "nightly", "--inventory", str(inv), "--target", "nightly", "--parallel", "2",
                        "--report-dir", str(tmp_path / "r"), *skip], cwd=code_snapshot, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert {h: d["verdict"] for h, d in reports(tmp_path / "r").items()} == \
        {"n1": "PASSED (suite skipped)", "n2": "PASSED (suite skipped)"}
    assert summary(tmp_path / "r")["target"] == "nightly" and (tmp_path / "r" / "history.sqlite").is_file()
