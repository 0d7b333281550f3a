"""pipeline.slurm's pure parts: the config, the rendered sbatch script, and the parsers, fed by real outputs of the
single-node Slurm (fixtures/slurm/: NAME.txt as captured by capture.py there, NAME.expected.json what must come of
it; a new case is a new pair of files). The executor itself is tested against the real Slurm in tests/slurm/."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline import commands, slurm

FIX = Path(__file__).parent / "fixtures" / "slurm"
SQUEUE_CASES = sorted(p.name.removesuffix(".expected.json") for p in FIX.glob("squeue-*.expected.json"))


def cfg(**kw) -> slurm.SlurmConfig:
    return slurm.SlurmConfig(**{"workspace": "/shared/ws", **kw})


@pytest.mark.parametrize("case", SQUEUE_CASES)
def test_squeue_fixture(case):
    exp = json.loads((FIX / f"{case}.expected.json").read_text())
    tasks = slurm.parse_squeue((FIX / f"{case}.txt").read_text(), exp["job"])
    got = {str(t): {"state": s.state, "reason": s.reason, "node": s.node, "exit_code": s.exit_code,
                    "signal": s.signal} for t, s in tasks.items()}
    assert got == exp["tasks"]
    p = slurm.progress(tasks, exp["total"], 0)
    assert (p.pending, p.running, p.done) == tuple(exp["progress"].values())
    assert slurm.parse_squeue((FIX / f"{case}.txt").read_text(), exp["job"] + 1) == {}, "another job's lines"


def test_exit_code_both_forms():
    # 22.05 prints the raw wait status (fixtures); 23.02+ prints "exit:signal" (src/squeue/print.c there)
    assert slurm.parse_exit_code("768") == (3, 0)
    assert slurm.parse_exit_code("15") == (None, 15)
    assert slurm.parse_exit_code("3:0") == (3, 0)
    assert slurm.parse_exit_code("0:9") == (0, 9)
    assert slurm.parse_exit_code("") == (None, None)


def test_sbatch_output():
    assert slurm.parse_sbatch((FIX / "sbatch-submit.txt").read_text()) == (1, "")
    assert slurm.parse_sbatch("@@sbatch=4242;gpucluster\n") == (4242, "gpucluster")   # --parsable on a federation
    with pytest.raises(slurm.SlurmError, match="no job id"):
        slurm.parse_sbatch("sbatch: error: Batch job submission failed: Invalid account\n")


def test_unknown_job_is_recognised():
    assert slurm.job_unknown((FIX / "squeue-unknown-job.txt").read_text())
    assert not slurm.job_unknown("squeue: error: Socket timed out on send/recv operation")


def test_records_name_every_task():
    """The mixed array collected at that moment: every task 0..7 has a record (6 and 7 were never listed)."""
    statuses = slurm.parse_squeue((FIX / "squeue-array-mixed.txt").read_text(), 6)
    facts = slurm.parse_facts((FIX / "facts.jsonl").read_text() + "not json\n")
    assert sorted(facts) == [0, 1, 2, 3, 4]
    recs = slurm.task_records(8, "/ws/slurm/6", statuses, facts)
    assert [r.task_id for r in recs] == list(range(8))
    done, failed, cancelled, _, _, pending, ghost, _ = recs
    assert (done.state, done.exit_code, done.ran, done.node) == ("COMPLETED", 0, True, "vm")
    assert (done.duration_s, failed.duration_s, cancelled.duration_s) == (0.0, 1.0, None)
    assert not done.ok and done.parity_json == "", "no parity.json: not ok"
    assert (failed.state, failed.exit_code) == ("FAILED", 3)
    assert (cancelled.state, cancelled.exit_code, cancelled.signal) == ("CANCELLED", None, 15)
    assert (pending.state, pending.reason, pending.ran, pending.started_at) == ("PENDING", "Resources", False, "")
    assert ghost.state == slurm.UNKNOWN and not ghost.ran
    assert failed.describe() == "task 1: FAILED (NonZeroExitCode) on vm, exit 3"
    assert cancelled.describe() == "task 2: CANCELLED on vm, signal 15"
    assert pending.describe() == "task 5: never ran: PENDING (Resources)"
    assert ghost.describe() == "task 6: UNKNOWN: Slurm never reported it"


def test_records_after_a_cancel_keep_the_state_it_interrupted():
    before = slurm.parse_squeue((FIX / "squeue-partition-down.txt").read_text(), 3)
    after = slurm.parse_squeue((FIX / "squeue-partition-down-cancelled.txt").read_text(), 3)
    (r, _) = slurm.task_records(2, "/ws/slurm/3", after, {}, at_cancel=before)
    assert (r.state, r.reason, r.state_at_cancel, r.ran) == ("CANCELLED", "PartitionDown", "PENDING", False)
    assert r.describe() == "task 0: never ran: PENDING when the pipeline cancelled the job, then CANCELLED " \
                           "(PartitionDown)"


def test_progress_line():
    statuses = slurm.parse_squeue((FIX / "squeue-array-mixed.txt").read_text(), 6)
    line = slurm.progress(statuses, 8, 42.4).line()
    assert line == "3 pending, 2 running, 3 done of 8 (CANCELLED 1, COMPLETED 1, FAILED 1) after 42 s"


def test_gpu_script():
    c = cfg(partition="gpu", account="proj-1", gpus=16, time="01:00:00", sbatch_options=["--qos=high", "--exclusive"],
            setup=["module load cuda/12.4"], env={"HF_HOME": "/shared/hf cache"}, max_parallel=8)
    text = slurm.render_script(c)
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=flashcore-validate", "#SBATCH --array=0-15%8", "#SBATCH --ntasks=1",
                      "#SBATCH --cpus-per-task=1", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu",
                      "#SBATCH --account=proj-1", "#SBATCH --time=01:00:00",
                      "#SBATCH --output=/shared/ws/slurm/%A/slurm-%a.out", "#SBATCH --no-requeue",
                      "#SBATCH --qos=high", "#SBATCH --exclusive"]
    argv = commands.pytest_argv("/shared/ws/.venv/bin/python", "default", "T/parity.json", "T/junit.xml", "cuda")
    assert shlex.join(argv).replace("T/", '"$task_dir"/') in text
    assert "export HF_HOME='/shared/hf cache'" in text and "module load cuda/12.4" in text
    assert "TRITON_INTERPRET" not in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_cpu_script_and_overrides():
    text = slurm.render_script(cfg(gpu="none", python="/opt/py/bin/python3", gpus=1), token_path="/shared/.tok")
    assert "--gres" not in text and "#SBATCH --array=0-0" in text
    assert "/opt/py/bin/python3 -m pytest" in text and "--parity-model tiny" in text and "--parity-device cpu" in text
    assert "export TRITON_INTERPRET=1" in text and "export HF_TOKEN_PATH=/shared/.tok" in text
    text = slurm.render_script(cfg(gpu_request="--gpus-per-task=1"), suite_command="exit 3")
    assert "#SBATCH --gpus-per-task=1" in text and '( exit 3 ) > "$task_dir/suite.log"' in text
    with pytest.raises(ValueError, match="absolute"):
        slurm.render_script(cfg(workspace="~/ws"))
    assert cfg(workspace="~/ws").with_home("/home/u").workspace == "/home/u/ws"


@pytest.mark.parametrize("field, value, message", [
    ("time", "30 minutes", "not a Slurm time limit"),
    ("sbatch_options", ["--array=0-3"], "--array is set by the pipeline"),
    ("sbatch_options", ["--output=/tmp/x"], "--output is set by the pipeline"),
    ("sbatch_options", ["qos=high"], "not an sbatch option"),
    ("gpu_request", "gpu:1", "--gres=gpu"),
    ("partition", "gpu; rm -rf /", "one word"),
    ("env", {"HF_TOKEN": "x"}, "looks like a secret"),
    ("gpus", 0, "greater than or equal to 1"),
    ("poll_max_s", 0.5, "poll_max_s must be >= poll_min_s"),
    ("nodes", 4, "Extra inputs are not permitted"),
])
def test_config_rejects(field, value, message):
    with pytest.raises(ValidationError, match=message):
        cfg(**{field: value})


def test_submit_command_holds_until_the_folder_exists():
    c = cfg(env={"SLURM_CONF": "/etc/slurm b/slurm.conf"})
    cmd = slurm.submit_command(c, "#!/bin/bash\necho 'quoted $HOME'\n")
    assert "<<'FLASHCORE_SBATCH_" in cmd and "echo 'quoted $HOME'" in cmd
    assert "env 'SLURM_CONF=/etc/slurm b/slurm.conf' sbatch --parsable --hold" in cmd
    assert cmd.index("mkdir -p /shared/ws/slurm/\"$jid\"") < cmd.index("scontrol release")
    assert slurm.squeue_command(c, 7).endswith(
        "squeue --jobs=7 --array --states=all --noheader "
        "--Format='ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,NodeList:|,exit_code:|,StartTime:|,EndTime:|'")


def test_task_reports_speak_like_ssh_runs(tmp_path):
    """Each task -> the HostRunResult an SSH run makes: the verdict in the same words, Slurm's state and reason
    where no results came, rendered by the same report template."""
    from pipeline import report

    statuses = slurm.parse_squeue((FIX / "squeue-array-mixed.txt").read_text(), 6)
    facts = slurm.parse_facts((FIX / "facts.jsonl").read_text())
    facts[0] = {**facts[0], "parity_json": True, "cuda_visible_devices": "3", "gpu_uuid": "GPU-0d1e",
                "gpu_name": "NVIDIA H100 80GB HBM3"}
    records = slurm.task_records(6, str(tmp_path), statuses, facts)
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "parity.json").write_text((FIX.parent / "parity" / "pass_cpu_tiny.json").read_text())
    run = slurm.ArrayRun(6, "", 6, str(tmp_path), str(tmp_path / "validate.sbatch"), ended_by="wall limit",
                         records=records)
    results = slurm.host_results(run, cfg(login="login1", gpus=6))
    verdicts = [(r.host, r.verdict, r.exit_code) for r in results]
    assert verdicts[0] == ("vm", "PASSED", 0)
    assert verdicts[1] == ("vm", "ERROR: FAILED (NonZeroExitCode)", 5)
    assert verdicts[2] == ("vm", "ERROR: CANCELLED", 5)
    assert verdicts[5] == ("flashcore-validate[5]", "NOT RUN: PENDING (Resources)", 5)
    assert [(g.index, g.uuid, g.name) for g in results[0].gpus] == [(3, "GPU-0d1e", "NVIDIA H100 80GB HBM3")]
    assert results[0].started_at == "2026-11-28T01:50:31+00:00" and results[5].gpus == []
    md = report.render_markdown(results[5])
    assert "NOT RUN: PENDING (Resources)" in md and "task 5: never ran: PENDING (Resources)" in md
    failing = json.loads((FIX.parent / "parity" / "fail_h100_synthetic.json").read_text())
    assert slurm.task_verdict(records[0], failing, "finished") == ("FAILED: parity", 1)


def test_the_documented_inventory_entry_is_valid():
    import yaml

    entry = slurm.SlurmConfig(**yaml.safe_load(slurm.SlurmConfig.__doc__.split("\n", 2)[2]))
    assert (entry.login, entry.gpus, entry.uses_gpu, entry.suite_model) == ("lab-login", 64, True, "default")


@pytest.mark.parametrize("record, parity, ended_by, signum, expected", [
    (dict(state="CANCELLED", reason="Priority", state_at_cancel="PENDING"), None, "cancelled", 15,
     ("INTERRUPTED: never ran (PENDING (Priority))", 143)),
    (dict(state="CANCELLED", state_at_cancel="RUNNING", ran=True), None, "cancelled", 2, ("INTERRUPTED", 130)),
    (dict(state="CANCELLED", state_at_cancel="RUNNING", ran=True), None, "interrupted", None, ("INTERRUPTED", 130)),
    (dict(state="CANCELLED", reason="Resources", state_at_cancel="PENDING"), None, "wall limit", None,
     ("NOT RUN: PENDING (Resources)", 5)),
    (dict(state="CANCELLED", state_at_cancel="RUNNING", ran=True), None, "wall limit", None, ("ERROR: CANCELLED", 5)),
    (dict(state="NODE_FAIL", reason="NodeDown", ran=True), None, "finished", None, ("ERROR: NODE_FAIL (NodeDown)", 5)),
    (dict(state="COMPLETED", exit_code=0, ran=True), None, "finished", None,
     ("ERROR: COMPLETED without parity results", 5)),
    (dict(state="COMPLETED", exit_code=0, ran=True), "pass_cpu_tiny", "finished", None, ("PASSED", 0)),
    # finished between the last poll and the cancel: what it says counts, not the interruption
    (dict(state="COMPLETED", exit_code=0, ran=True, state_at_cancel="RUNNING"), "pass_cpu_tiny", "cancelled", 15,
     ("PASSED", 0)),
    (dict(state="FAILED", exit_code=1, ran=True), "fail_h100_synthetic", "finished", None, ("FAILED: parity", 1)),
    (dict(state="FAILED", exit_code=1, ran=True), "model_not_loaded", "finished", None,
     ("ERROR: model not loaded", 5)),   # the kernels never ran: not a parity failure (exit 1 means only that)
    # one model's kernels disagree beside one that did not load: exit 1, as over SSH (suite.failed_beside_not_loaded)
    (dict(state="FAILED", exit_code=1, ran=True), "fail_one_not_loaded_synthetic", "finished", None,
     ("FAILED: parity", 1)),
])
def test_task_verdicts(record, parity, ended_by, signum, expected):
    doc = json.loads((FIX.parent / "parity" / f"{parity}.json").read_text()) if parity else None
    assert slurm.task_verdict(slurm.TaskRecord(task_id=0, **record), doc, ended_by, signum) == expected


def test_a_tasks_gpu_index_is_slurms_not_the_cgroups_renumbering():
    rec = slurm.TaskRecord(task_id=0, state="RUNNING", job_gpus="5", cuda_visible_devices="0")
    assert slurm.gpu_index(rec) == 5
    assert slurm.gpu_index(slurm.TaskRecord(task_id=0, state="RUNNING", cuda_visible_devices="3")) == 3
    assert slurm.gpu_index(slurm.TaskRecord(task_id=0, state="RUNNING", cuda_visible_devices="GPU-0d1e")) == 0


def test_a_gpu_name_the_entry_requires_is_checked_on_each_task(tmp_path):
    """`gpu: H100` as for SSH hosts: a task that ran on another GPU (or one nvidia-smi did not name) is GPU
    REQUIREMENT NOT MET, exit 4, whatever its suite said; `any` checks nothing."""
    def rec(name):
        return slurm.TaskRecord(task_id=2, state="COMPLETED", exit_code=0, ran=True, node="n7", gpu_name=name,
                                parity_json="x")
    assert slurm.wrong_gpu("h100", rec("NVIDIA H100 80GB HBM3")) == "" and slurm.wrong_gpu("any", rec("")) == ""
    assert slurm.wrong_gpu("H100", rec("NVIDIA A100-SXM4-80GB")) == \
        "task 2 ran on a NVIDIA A100-SXM4-80GB on n7, not a H100"
    assert "a GPU nvidia-smi did not name" in slurm.wrong_gpu("H100", rec(""))
    run = slurm.ArrayRun(9, "", 3, str(tmp_path), str(tmp_path / "validate.sbatch"))
    passing = json.loads((FIX.parent / "parity" / "pass_cpu_tiny.json").read_text())
    res = slurm.host_result(rec("NVIDIA A100-SXM4-80GB"), run, cfg(gpu="H100"), passing)
    assert (res.verdict, res.exit_code, res.steps[0].status) == ("GPU REQUIREMENT NOT MET", 4, "failed")
    assert slurm.host_result(rec("NVIDIA H100 PCIe"), run, cfg(gpu="H100"), passing).verdict == "PASSED"
