"""`flashcore-deploy --inventory X --target CLUSTER` end to end against the real single-node Slurm (conftest.py):
the real CLI as a subprocess, from a frozen copy of the checkout, syncing and installing once into a workspace on
the "shared filesystem", then the job array, the per-task reports, the fleet summary, JUnit and history. The login
node is this machine (--local) or the loopback sshd. Tasks run the real tiny parity suite on the CPU in the first
test; the others run a short command instead (the hidden --suite-command, as the SSH integration tests do)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import GOOD, REPO_ID, Background, alive, deploy, start_hub, summary_links
from pipeline.inventory import parse_target_file
from tests.slurm.cluster import Cluster

PASS_DOC = "tests/pipeline/fixtures/parity/pass_cpu_tiny.json"       # paths in the synced workspace
FAIL_DOC = "tests/pipeline/fixtures/parity/fail_h100_synthetic.json"
SLEEPER = 'echo $$ > "$task_dir/pid"; sleep 120'


@pytest.fixture(scope="module")
def shared_ws(tmp_path_factory) -> Path:
    """One workspace for the module, as on a cluster: the venv is built by the first run and reused."""
    return tmp_path_factory.mktemp("shared") / "flashcore-workspace"


def inventory(path: Path, cluster: Cluster, ws: Path, hosts: dict | None = None, **entry) -> Path:
    base = {"executor": "slurm", "workspace": str(ws), "gpus": 2, "gpu": "none", "time": "10",
            "python": sys.executable, "env": dict(cluster.env), "poll_min_s": 0.5, "poll_max_s": 2,
            "settle_s": 30, "wall_s": 300}
    doc = {"clusters": {"lab": {**base, **entry}}, **({"hosts": hosts} if hosts else {})}
    path.write_text(yaml.safe_dump(doc))
    return path


def reports(report_dir: Path) -> dict[str, dict]:
    """The JSON of every report written: the login node's under "login", each task's under "<job>_<task>"."""
    out = {}
    for p in report_dir.glob("lab-*.json"):
        doc = json.loads(p.read_text())
        step = doc["steps"][0]["detail"] if doc["steps"] else ""
        out["login" if doc["host"] == "lab" else step.split(":")[0].removeprefix("Slurm job ")] = doc
    return out


def summary_doc(report_dir: Path) -> dict:
    (path,) = report_dir.glob("summary-*.json")
    return json.loads(path.read_text())


def test_local_login_runs_the_tiny_suite_as_an_array_into_reports_and_summary(idle, checkout, shared_ws, tmp_path):
    """On the login node (--local): lock, sync, install once, then two array tasks each run the real parity suite
    (tiny preset, Triton interpreter) on the cluster's node; one report per task, the summary, JUnit, history."""
    from flashcore.parity.results import ParityReport

    inv = inventory(tmp_path / "inv.yaml", idle, shared_ws)
    run = deploy(["--inventory", str(inv), "--target", "lab", "--local"], tmp_path / "r", cwd=checkout, timeout=600)
    assert run.code == 0, run.out[-4000:]
    seen = [tuple(map(int, m)) for m in re.findall(r"\[lab suite\] (\d+) pending, (\d+) running, (\d+) done of 2",
                                                     run.out)]
    assert seen[0][2] == 0 and max(r for _, r, _ in seen) >= 1 and seen[-1] == (0, 0, 2), seen

    docs = reports(tmp_path / "r")
    login = docs.pop("login")
    assert [s["name"] for s in login["steps"]] == ["connect", "lock", "sync", "install", "token", "suite", "report"]
    assert login["verdict"] == "PASSED" and "2 of 2 tasks completed with results" in login["steps"][5]["detail"]
    job = next(iter(docs)).split("_")[0]
    assert sorted(docs) == [f"{job}_0", f"{job}_1"]
    for doc in docs.values():
        assert (doc["host"], doc["verdict"], doc["exit_code"], doc["device"]) == (idle.node, "PASSED", 0, "cpu")
        assert doc["versions"]["torch"] and doc["versions"]["flashcore_content_hash"] == login["sync"]["content_hash"]
        parity = ParityReport.from_dict(json.loads((tmp_path / "r" / doc["artifacts"]["parity.json"]).read_text()))
        assert parity.passed and parity.model.preset == "tiny" and parity.environment.device == "cpu"
        assert {"junit.xml", "suite.log", "facts.json", "slurm.out", "report_md"} <= set(doc["artifacts"])
    md = (tmp_path / "r" / docs[f"{job}_1"]["artifacts"]["report_md"]).read_text()
    assert md.startswith(f"# flashcore validation — {idle.node}: PASSED") and f"Slurm job {job}_1" in md

    script = (shared_ws / "slurm" / job / "validate.sbatch").read_text()
    assert "--array=0-1" in script and "--parity-model tiny" in script and "--parity-device cpu" in script
    assert f"{shared_ws}/.venv/bin/python -m pytest" in script               # the venv installed once, shared
    s = summary_doc(tmp_path / "r")
    assert (s["exit_code"], s["gpus"], s["passed"], s["target"]) == (0, 2, 2, "lab")
    assert [row["label"] for row in s["rows"]] == [f"{idle.node} cpu"] * 2
    junit = next((tmp_path / "r").glob("summary-*.junit.xml")).read_text()
    assert 'tests="2" failures="0" errors="0"' in junit
    with sqlite3.connect(tmp_path / "r" / "history.sqlite") as db:
        assert db.execute("select host, status from results").fetchall() == [(idle.node, "passed")] * 2
    assert not idle.active_jobs() and not (shared_ws / ".flashcore" / "hf_token").exists()


def test_over_ssh_gpu_tasks_name_node_and_uuid_and_failures_and_the_token_leaks_nowhere(
        idle, checkout, shared_ws, login_sshd, tmp_path):
    """The login node over the loopback sshd; three GPU tasks on the two fake GPUs (the third waits for one), each
    GPU named by an nvidia-smi stand-in (no real GPU here); a hub model, so the token goes to the shared workspace
    (0600) for the tasks and is removed at the end. Task 0 passes, task 1 crashes, task 2's parity fails."""
    if idle.gpus < 2:
        pytest.skip("no fake GPU devices (mknod refused here)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\n# stand-in: answers the sbatch script\'s one query (-i N ...)\n'
                                        'printf "GPU-fake-%s-%s, NVIDIA Fake H100\\n" "$(hostname)" "$2"\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    hosts = {"login1": {"address": "127.0.0.1", "port": login_sshd.port, "user": os.environ.get("USER") or "root",
                        "identity": str(login_sshd.client_key), "known_hosts": str(login_sshd.known_hosts),
                        "python": sys.executable}}
    env = {**idle.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    inv = inventory(tmp_path / "inv.yaml", idle, shared_ws, hosts, login="login1", gpus=3, gpu="h100", env=env,
                    python=None, model=REPO_ID)
    suite = ('stat -c %a "$HF_TOKEN_PATH" > "$task_dir/token.mode"; case $SLURM_ARRAY_TASK_ID in '
             f'0) cp {PASS_DOC} "$task_dir/parity.json";; 1) exit 3;; 2) cp {FAIL_DOC} "$task_dir/parity.json"; '
             'exit 1;; esac')
    url, hub = start_hub()
    log_before = login_sshd.commands.stat().st_size if login_sshd.commands.exists() else 0
    try:
        run = deploy(["--inventory", str(inv), "--target", "lab", "--suite-command", suite], tmp_path / "r",
                     env={"HF_TOKEN": GOOD, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf")}, cwd=checkout)
    finally:
        hub.shutdown()
    assert run.code == 5, run.out[-4000:]          # the worst of 0, 5 and 1

    docs = reports(tmp_path / "r")
    login = docs.pop("login")
    assert login["address"] == "127.0.0.1" and login["port"] == login_sshd.port
    assert {s["name"]: s["status"] for s in login["steps"]}["token"] == "ok"
    by_task = {k.split("_")[1]: v for k, v in docs.items()}
    assert [(d["verdict"], d["exit_code"]) for _, d in sorted(by_task.items())] == [
        ("PASSED", 0), ("ERROR: FAILED (NonZeroExitCode)", 5), ("FAILED: parity", 1)]
    for d in by_task.values():
        (gpu,) = d["gpus"]
        assert d["host"] == idle.node and gpu["uuid"] == f"GPU-fake-{idle.node}-{gpu['index']}"
        assert gpu["name"] == "NVIDIA Fake H100" and gpu["index"] in (0, 1)
    s = summary_doc(tmp_path / "r")
    assert sorted(row["label"] for row in s["rows"]) == sorted(f"{idle.node} gpu{d['gpus'][0]['index']}"
                                                               for d in by_task.values())
    assert sorted(row["result"]["status"] for row in s["rows"]) == ["error", "failed", "passed"]
    assert all(row["result"]["gpu_uuid"].startswith("GPU-fake-") for row in s["rows"])
    md = next((tmp_path / "r").glob("summary-*.md")).read_text()
    assert all(f"| {idle.node} | {row['gpu']} |" in md for row in s["rows"]), md

    job_dir = shared_ws / "slurm" / login["steps"][-2]["detail"].split(":")[0].removeprefix("job ")
    assert {(job_dir / str(t) / "token.mode").read_text().strip() for t in range(3)} == {"600"}
    assert not (shared_ws / ".flashcore" / "hf_token").exists()                 # removed at the end
    sent = login_sshd.commands.read_text(errors="replace")[log_before:]
    assert sent.count('sbatch --parsable --hold "$f"') == 1 and "HF_TOKEN_PATH" in sent
    written = [run.out, sent, login_sshd.log.read_text(errors="replace")]
    written += [p.read_text(errors="replace") for p in (tmp_path / "r").rglob("*") if p.is_file()]
    written += [p.read_text(errors="replace") for p in job_dir.rglob("*") if p.is_file()]
    assert GOOD not in "\n".join(written)
    assert not idle.active_jobs()


def _seed_history(path: Path, node: str, doc: dict) -> None:
    """Earlier runs of the slot a CPU task on `node` validates: three passing runs at half of `doc`'s figures,
    then one at `doc`'s own (flagged against them): a task that reports `doc` is then the second flagged run in a
    row on every gated metric, a confirmed regression (pipeline/regression.py)."""
    from pipeline.gpu_result import GpuResult, parity_metrics
    from pipeline.history import HistoryStore
    from pipeline.regression import spec_for

    today = parity_metrics(doc)
    gated = {k: v for k, v in today.items() if (spec := spec_for(k)) and spec.gate}
    assert gated, today
    with HistoryStore(path) as store:
        for day, scale in ((1, 0.5), (2, 0.5), (3, 0.5), (4, 1.0)):
            started = f"2020-01-0{day}T02:00:00+00:00"
            store.record_run([GpuResult(node, None, gpu_name="cpu", status="passed", verdict="PASSED",
                                        started_at=started, metrics={k: v * scale for k, v in gated.items()})],
                             started_at=started, target="lab")


def test_a_cluster_run_is_judged_recorded_and_locked_like_a_fleet(idle, checkout, shared_ws, tmp_path):
    """As an SSH fleet: the history is the inventory's `history:`, each task is judged before its report is
    written (its confirmed regression at the top of its report and of the summary, exit 1 though the task
    passed), the run is recorded there, a second run of the same inventory stops at once (its lock, exit 6), and
    the summary's report links open from the summary's own folder."""
    history = tmp_path / "h" / "history.sqlite"
    _seed_history(history, idle.node, json.loads((checkout / PASS_DOC).read_text()))
    inv = inventory(tmp_path / "inv.yaml", idle, shared_ws, gpus=1)
    inv.write_text(inv.read_text() + f"history: {history}\n")
    bg = Background(["--inventory", str(inv), "--target", "lab", "--local", "--skip", "install", "--suite-command",
                     f'sleep 3; cp {PASS_DOC} "$task_dir/parity.json"'], tmp_path / "r", cwd=checkout)
    bg.wait_for("submitted job", timeout=120)
    second = deploy(["--inventory", str(inv), "--target", "lab", "--local", "--skip", "install"], tmp_path / "r2",
                    cwd=checkout)
    run = bg.finish(timeout=120)
    assert second.code == 6 and f"another run of {inv} is in progress" in second.err, second.out
    assert run.code == 1, run.out[-4000:]
    (task,) = [d for key, d in reports(tmp_path / "r").items() if key != "login"]
    assert task["verdict"] == "PASSED" and task["exit_code"] == 0 and task["regressions"]
    md = (tmp_path / "r" / task["artifacts"]["report_md"]).read_text()
    assert md.splitlines()[0].endswith("PASSED, REGRESSION") and md.index("Regression") < md.index("| scenario")
    s = summary_doc(tmp_path / "r")
    assert s["exit_code"] == 1 and s["regressions"] and s["history"] == str(history)
    assert re.search(rf"flashcore-deploy: lab \d+_0 on {idle.node}: REGRESSION: ", run.err), run.err
    with sqlite3.connect(history) as db:
        assert db.execute("select count(*) from results where host = ?", (idle.node,)).fetchone() == (5,)
    assert not (tmp_path / "r" / "history.sqlite").exists()
    (linked,) = summary_links(tmp_path / "r")
    assert linked.read_text() == md


def test_sigterm_cancels_the_array_and_the_reports_say_interrupted(idle, checkout, shared_ws, tmp_path):
    """SIGTERM to the CLI while both tasks run: scancel, every task's report INTERRUPTED, exit 143, nothing left
    in squeue and no task process alive."""
    inv = inventory(tmp_path / "inv.yaml", idle, shared_ws)
    bg = Background(["--inventory", str(inv), "--target", "lab", "--local", "--skip", "install",
                     "--suite-command", SLEEPER], tmp_path / "r", cwd=checkout)
    bg.wait_for("0 pending, 2 running", timeout=120)
    bg.proc.send_signal(signal.SIGTERM)
    run = bg.finish(timeout=120)
    assert run.code == 143, run.out[-4000:]
    docs = reports(tmp_path / "r")
    assert docs.pop("login")["verdict"] == "INTERRUPTED"
    assert [(d["verdict"], d["exit_code"]) for d in docs.values()] == [("INTERRUPTED", 143)] * 2
    assert all("was RUNNING when the pipeline cancelled the job" in d["error"] for d in docs.values())
    s = summary_doc(tmp_path / "r")
    assert s["exit_code"] == 143 and [row["result"]["status"] for row in s["rows"]] == ["interrupted"] * 2
    assert not idle.active_jobs()
    for key, d in docs.items():
        job, task = key.split("_")
        assert not alive(int((shared_ws / "slurm" / job / task / "pid").read_text()))


@pytest.mark.parametrize("cause", ["partition down", "node drained"])
def test_pending_past_the_wall_limit_is_cancelled_and_named_with_slurms_reason(idle, checkout, shared_ws, tmp_path,
                                                                              cause):
    """Tasks that never start (a partition that is down, the only node drained) pend until the wall limit
    (--timeout), which cancels them: each report says NOT RUN with Slurm's state and reason, exit 5."""
    entry = {"partition": "closed"} if cause == "partition down" else {"gpus": 1}
    inv = inventory(tmp_path / "inv.yaml", idle, shared_ws, **entry)
    if cause == "node drained":
        idle.run("scontrol", "update", f"nodename={idle.node}", "state=drain", "reason=flashcore test drain")
    try:
        run = deploy(["--inventory", str(inv), "--target", "lab", "--local", "--skip", "install", "--timeout", "3",
                      "--suite-command", "true"], tmp_path / "r", cwd=checkout)
    finally:
        if cause == "node drained":
            idle.run("scontrol", "update", f"nodename={idle.node}", "state=resume")
    assert run.code == 5, run.out[-4000:]
    docs = reports(tmp_path / "r")
    assert "wall limit" in docs.pop("login")["error"]
    for d in docs.values():
        assert d["verdict"].startswith("NOT RUN: PENDING (") and d["gpus"] == [] and d["exit_code"] == 5
        assert ("PartitionDown" if cause == "partition down" else "DRAINED") in d["verdict"], d["verdict"]
        assert "never ran: PENDING when the pipeline cancelled the job, then CANCELLED" in d["error"]
    s = summary_doc(tmp_path / "r")
    assert s["exit_code"] == 5 and {row["result"]["status"] for row in s["rows"]} == {"error"}
    junit = next((tmp_path / "r").glob("summary-*.junit.xml")).read_text()
    assert f'errors="{len(docs)}"' in junit and "NOT RUN: PENDING" in junit
    assert not idle.active_jobs()
    rerun = tmp_path / "r" / s["rerun_file"]                   # a target: the cluster, not its node
    assert s["rerun"] == ["lab"] and parse_target_file(rerun.read_text()) == ["lab"]
    listed = deploy(["--inventory", str(inv), "--target", f"@{rerun}", "--list-hosts"], tmp_path / "r3",
                    cwd=checkout)
    assert listed.code == 0 and listed.out.startswith("lab\tSlurm via this machine"), listed.out


def test_a_dropped_login_connection_cancels_the_job_over_a_new_one(idle, checkout, shared_ws, login_sshd, tmp_path):
    """The SSH connection to the login node dies while the tasks run (its sshd processes killed): the job is
    cancelled over a fresh connection, exit 3, the login node's report says UNREACHABLE, nothing left running."""
    hosts = {"login1": {"address": "127.0.0.1", "port": login_sshd.port, "user": os.environ.get("USER") or "root",
                        "identity": str(login_sshd.client_key), "known_hosts": str(login_sshd.known_hosts)}}
    inv = inventory(tmp_path / "inv.yaml", idle, shared_ws, hosts, login="login1")
    bg = Background(["--inventory", str(inv), "--target", "lab", "--skip", "install", "--suite-command", SLEEPER],
                    tmp_path / "r", cwd=checkout)
    bg.wait_for("0 pending, 2 running", timeout=120)
    master = int((login_sshd.dir / "sshd.pid").read_text())
    for pid in subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    run = bg.finish(timeout=120)
    assert run.code == 3, run.out[-4000:]
    job = re.search(r"submitted job (\d+)", run.out).group(1)
    assert f"the connection dropped: cancelled job {job} over a new one" in run.out
    (login,) = reports(tmp_path / "r").values()
    assert login["verdict"] == "UNREACHABLE" and "connection dropped" in login["error"]
    assert not idle.active_jobs()
    for task in (0, 1):
        assert not alive(int((shared_ws / "slurm" / job / str(task) / "pid").read_text()))
