"""pipeline.slurm against a real single-node Slurm (conftest.py): the rendered script submitted with sbatch, polled with
squeue, cancelled with scancel, its tasks' files collected. Arrays run a plain command instead of the suite (seconds);
the real tiny parity suite runs in an array through the CLI (test_cluster_cli.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import slurm
from pipeline.remote import LocalRemote
from tests.integration.harness import alive
from tests.slurm.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "driver.py"
# the task's shell writes its pid, then sleeps in a child: both must be gone after a cancel
SLEEPER = 'echo $$ > "$task_dir/pid"; sleep 120'


def config(cluster: Cluster, ws: Path, **kw) -> slurm.SlurmConfig:
    base = dict(workspace=str(ws), gpus=2, gpu="none", time="5", env=cluster.env, wall_s=60, poll_min_s=0.3,
                poll_max_s=1.0, settle_s=30)
    return slurm.SlurmConfig(**{**base, **kw})


class Recorder(LocalRemote):
    """The real local runner, keeping the time and command of every call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[float, str]] = []

    def run(self, command, *, timeout, **kw):
        self.calls.append((time.monotonic(), command))
        return super().run(command, timeout=timeout, **kw)

    def times(self, program: str) -> list[float]:
        """When `program` was the command run (after the `env K=V` prefix)."""
        return [t for t, c in self.calls if re.match(rf"^(env (\S+=\S+ )+)?{program} ", c)]


def test_gpu_tasks_get_their_own_gres_and_a_failing_task_is_named(idle, workspace):
    """--gres=gpu:1 per task on the fake GPUs: Slurm gives each task another CUDA_VISIBLE_DEVICES; task 1 fails."""
    if idle.gpus < 2:
        pytest.skip("no fake GPU devices (mknod refused here)")
    cfg = config(idle, workspace, gpu="any")
    cmd = 'echo "{}" > "$task_dir/parity.json"; sleep 1; [ "$SLURM_ARRAY_TASK_ID" != 1 ] || exit 3'
    run = slurm.run_array(LocalRemote(), cfg, slurm.render_script(cfg, suite_command=cmd))

    ok, bad = run.records
    assert "#SBATCH --gres=gpu:1" in Path(run.script_path).read_text()
    assert (ok.state, ok.exit_code, ok.ok) == ("COMPLETED", 0, True)
    assert (bad.state, bad.reason, bad.exit_code, bad.ok) == ("FAILED", "NonZeroExitCode", 3, False)
    assert sorted([ok.cuda_visible_devices, bad.cuda_visible_devices]) == ["0", "1"]
    assert bad.describe() == f"task 1: FAILED (NonZeroExitCode) on {idle.node}, exit 3"


def test_a_task_cancelled_mid_run(idle, workspace):
    """scancel of one array task while it runs: that task CANCELLED (signal 15, its processes gone), the other
    completes; the array's end is still `finished`."""
    cfg = config(idle, workspace)
    cmd = '[ "$SLURM_ARRAY_TASK_ID" = 0 ] && { sleep 3; exit 0; }; ' + SLEEPER
    submitted: list[slurm.ArrayRun] = []
    cancelled: list[int] = []

    def on_progress(p: slurm.Progress) -> None:
        pid = Path(submitted[0].job_dir, "1", "pid")
        if not cancelled and p.running and pid.exists() and pid.read_text().strip():
            idle.run("scancel", f"{submitted[0].job_id}_1")
            cancelled.append(int(pid.read_text()))

    run = slurm.run_array(LocalRemote(), cfg, slurm.render_script(cfg, suite_command=cmd),
                          on_submit=submitted.append, on_progress=on_progress)
    assert cancelled, "task 1 never seen running"
    done, killed = run.records
    assert run.ended_by == "finished" and (done.state, done.exit_code) == ("COMPLETED", 0)
    assert (killed.state, killed.signal, killed.exit_code, killed.ran) == ("CANCELLED", 15, None, True)
    assert not alive(cancelled[0])


def test_pending_past_the_wall_limit_is_cancelled_and_named(idle, workspace):
    """A partition that is DOWN: the tasks pend until the wall limit, which cancels them; each record says it never
    ran, with Slurm's reason. One squeue per poll, at growing intervals."""
    cfg = config(idle, workspace, partition="closed", wall_s=4, poll_min_s=0.5, poll_max_s=1.2)
    runner = Recorder()
    run = slurm.run_array(runner, cfg, slurm.render_script(cfg, suite_command="true"))

    assert run.ended_by == "wall limit"
    for r in run.records:
        assert (r.state, r.reason, r.state_at_cancel, r.ran) == ("CANCELLED", "PartitionDown", "PENDING", False)
    assert run.records[1].describe() == ("task 1: never ran: PENDING when the pipeline cancelled the job, then "
                                         "CANCELLED (PartitionDown)")
    assert len(runner.times("scancel")) == 1 and not idle.active_jobs()
    polls = runner.times("squeue")
    gaps = [b - a for a, b in zip(polls, polls[1:])]
    assert run.polls == len(polls) and 4 <= len(polls) <= 12, gaps
    assert gaps[0] >= 0.45 and max(gaps) < 1.2 + 1.0 and gaps[2] > gaps[0], gaps


def test_a_drained_node_leaves_the_array_pending_with_slurms_reason(idle, workspace):
    idle.run("scontrol", "update", f"nodename={idle.node}", "state=drain", "reason=flashcore test drain")
    try:
        cfg = config(idle, workspace, gpus=1, wall_s=3)
        run = slurm.run_array(LocalRemote(), cfg, slurm.render_script(cfg, suite_command="true"))
    finally:
        idle.run("scontrol", "update", f"nodename={idle.node}", "state=resume")
    (r,) = run.records
    assert run.ended_by == "wall limit" and not r.ran and r.state_at_cancel == "PENDING"
    assert "DRAINED" in r.reason, r.reason


def test_submission_refused_by_slurm_says_why(idle, workspace):
    cfg = config(idle, workspace, partition="nosuchpartition")
    with pytest.raises(slurm.SlurmError, match=r"sbatch failed \(exit 1\).*[Ii]nvalid partition"):
        slurm.run_array(LocalRemote(), cfg, slurm.render_script(cfg, suite_command="true"))
    assert not idle.active_jobs()
    assert not list((workspace / "slurm").glob("submit.*")), "the unsubmitted script was left behind"


def test_cancel_event_from_another_thread(idle, workspace):
    cfg = config(idle, workspace, gpus=1)
    event = threading.Event()
    run = slurm.run_array(LocalRemote(), cfg, slurm.render_script(cfg, suite_command=SLEEPER), cancel_event=event,
                          on_progress=lambda p: p.running and threading.Timer(0.5, event.set).start())
    (r,) = run.records
    assert run.ended_by == "cancelled" and (r.state, r.state_at_cancel, r.ran) == ("CANCELLED", "RUNNING", True)
    assert not alive(int(Path(r.task_dir, "pid").read_text()))


@pytest.mark.parametrize("sig, ended_by, code", [(signal.SIGTERM, "cancelled", 143),
                                                 (signal.SIGINT, "interrupted", 130)])
def test_a_signal_cancels_the_job_and_the_records_still_come(idle, workspace, sig, ended_by, code):
    """SIGTERM (through cancel_on_signals) or Ctrl-C (KeyboardInterrupt) while the array runs: scancel, then every
    task's record, then the exit code; no task process is left."""
    cfg = config(idle, workspace)
    spec = {"config": cfg.model_dump(), "suite_command": SLEEPER}
    proc = subprocess.Popen([sys.executable, str(DRIVER), json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("@@progress") and line.split()[2] == "2":
            time.sleep(0.5)   # both tasks have started their shell
            proc.send_signal(sig)
            break
    out = proc.communicate(timeout=60)[0]
    doc = json.loads(next(x for x in out.splitlines() if x.startswith("@@run "))[6:])
    assert proc.returncode == code and doc["ended_by"] == ended_by, "".join(lines) + out
    assert [(r["state"], r["state_at_cancel"]) for r in doc["records"]] == [("CANCELLED", "RUNNING")] * 2
    assert not idle.active_jobs()
    for r in doc["records"]:
        assert not alive(int(Path(r["task_dir"], "pid").read_text()))
