"""What one job array of N tasks costs, on the single-node Slurm of tests/slurm/cluster.py (docs/SCALE.md).

Each task runs a trivial command instead of the suite: it copies a real parity document (the tiny preset's, from
tests/pipeline/fixtures/parity/) into its folder, so collection, transfer and reports move realistic sizes.
Measured through pipeline.slurm exactly as a run does (submit, one squeue per poll, collect, fetch_results, one
per-GPU report per task through report.write), then the alternatives it avoids: N separate sbatch jobs instead of
one array, and one squeue per job instead of one per poll; then the product end to end: `flashcore-deploy
--inventory X --target lab --local` (pipeline.cluster: the login node's steps, the array, a report per task, the
fleet summary, JUnit and history), timed by the lines it prints.

    .venv/bin/python benchmarks/bench_slurm_scale.py [--tasks 300] [--cpus 32] [--json out.json]

Run as root (the test cluster's daemons run as root); Slurm and munge from scripts/bootstrap.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import report, slurm  # noqa: E402
from pipeline.remote import LocalRemote  # noqa: E402
from tests.slurm.cluster import missing, start_cluster  # noqa: E402

PARITY_DOC = REPO / "tests" / "pipeline" / "fixtures" / "parity" / "pass_cpu_tiny.json"


class Timed(LocalRemote):
    """The real local runner, timing every command and counting its output, by program."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, float, int]] = []

    def run(self, command, *, timeout, **kw):
        res = super().run(command, timeout=timeout, **kw)
        program = next((w for w in ("sbatch", "squeue", "scancel", "find", "tar") if f"{w} " in command), "other")
        self.calls.append((program, res.duration_s, len(res.stdout)))
        return res

    def of(self, program: str) -> list[tuple[float, int]]:
        return [(d, n) for p, d, n in self.calls if p == program]


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "min": round(min(values), 4), "median": round(statistics.median(values), 4),
            "max": round(max(values), 4)} if values else {"n": 0}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def array_run(cluster, ws: Path, tasks: int) -> dict:
    cfg = slurm.SlurmConfig(workspace=str(ws), gpus=tasks, gpu="none", time="10", env=cluster.env, wall_s=1800)
    t0 = time.perf_counter()
    script = slurm.render_script(cfg, suite_command=f'cp {PARITY_DOC} "$task_dir/parity.json"')
    render_s = time.perf_counter() - t0
    runner = Timed()
    seen: list[slurm.Progress] = []
    run = slurm.run_array(runner, cfg, script, on_progress=seen.append)
    states = {s: sum(1 for r in run.records if r.state == s) for s in {r.state for r in run.records}}
    t0 = time.perf_counter()
    local = slurm.fetch_results(LocalRemote(), run, ws.parent / "fetched")
    fetch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reports = ws.parent / "reports"
    reports.mkdir()
    for i, res in enumerate(slurm.host_results(run, cfg, slurm.local_records(run.records, local))):
        report.write(res, reports, f"task{i}")
    report_s = time.perf_counter() - t0
    polls = runner.of("squeue")
    collect = runner.of("find")
    return {
        "tasks": tasks, "ended_by": run.ended_by, "states": states, "ok": len(run.passed),
        "script_bytes": len(script), "render_s": round(render_s, 4), "submit_s": run.submit_s,
        "wait_s": run.wait_s, "polls": run.polls, "poll_s": _stats([d for d, _ in polls]),
        "poll_bytes": _stats([float(n) for _, n in polls]),
        "progress": [[p.elapsed_s, p.pending, p.running, p.done] for p in seen],
        "collect_s": run.collect_s, "collect_bytes": collect[0][1] if collect else 0,
        "fetch_s": round(fetch_s, 3), "job_dir_bytes": _du(local),
        "files": sum(1 for p in local.rglob("*") if p.is_file()),
        "parity_json_bytes": PARITY_DOC.stat().st_size, "job_id": run.job_id, "reports_s": round(report_s, 3),
        "report_md_bytes": sum(p.stat().st_size for p in reports.glob("*.md")),
        "report_json_bytes": sum(p.stat().st_size for p in reports.glob("*.json")),
    }


def product_run(cluster, tmp: Path, tasks: int) -> dict:
    """The CLI on this machine as the login node, an inventory cluster of `tasks` CPU tasks (the same trivial
    command): the seconds from start to the array's submission, to its last task's end, to the fetched results,
    and to the exit (a report per task, the summary, history)."""
    import yaml

    inv = tmp / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"clusters": {"lab": {
        "workspace": str(tmp / "shared" / "cli-ws"), "gpus": tasks, "gpu": "none", "time": "10",
        "env": dict(cluster.env), "wall_s": 1800}}}))
    argv = [sys.executable, "-m", "pipeline.cli", "--inventory", str(inv), "--target", "lab", "--local",
            "--skip", "install", "--report-dir", str(tmp / "cli-reports"),
            "--suite-command", f'cp {PARITY_DOC} "$task_dir/parity.json"']
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            for key, text in (("submitted", "submitted job"), ("ended", f" done of {tasks} "),
                              ("fetched", "[lab] suite    ok"), ("login_report", "[lab] report")):
                if text in line and (key == "ended" or key not in marks):
                    marks[key] = round(time.monotonic() - t0, 2)
    total = round(time.monotonic() - t0, 2)
    summary = next((tmp / "cli-reports").glob("summary-*.json"))
    doc = json.loads(summary.read_text())
    return {"tasks": tasks, "exit_code": proc.returncode, "passed": doc["passed"], "seconds": {**marks, "exit": total},
            "task_reports": len(list((tmp / "cli-reports").glob("lab-*_*.md"))),
            "summary_md_bytes": summary.with_suffix(".md").stat().st_size,
            "summary_json_bytes": summary.stat().st_size,
            "junit_bytes": summary.with_suffix(".junit.xml").stat().st_size,
            "history_bytes": (tmp / "cli-reports" / "history.sqlite").stat().st_size}


def many_jobs(cluster, ws: Path, jobs: int) -> dict:
    """The alternative to one array: `jobs` separate sbatch calls, then one squeue per job per poll."""
    env = {**os.environ, **cluster.env}
    t0 = time.perf_counter()
    ids = []
    for _ in range(jobs):
        out = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--time=10", "--wrap", "true"], env=env,
                             capture_output=True, text=True, check=True).stdout
        ids.append(int(out.split(";")[0]))
    submit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for jid in ids:
        subprocess.run(["squeue", f"--jobs={jid}", "--noheader", "--states=all", "--Format=State:|,Reason:|"],
                       env=env, capture_output=True, text=True)
    per_task_poll_s = time.perf_counter() - t0
    return {"jobs": jobs, "submit_s": round(submit_s, 3), "per_job_submit_ms": round(1000 * submit_s / jobs, 2),
            "one_squeue_per_job_s": round(per_task_poll_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--cpus", type=int, default=32, help="CPUs the node declares (SlurmdParameters=config_overrides)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    if why := missing():
        sys.exit(f"bench_slurm_scale: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    cluster = start_cluster(tmp / "cluster", cpus=args.cpus, gpus=0, max_array_size=max(1001, args.tasks + 1))
    try:
        ws = tmp / "shared" / "ws"
        ws.mkdir(parents=True)
        figures = {"array": array_run(cluster, ws, args.tasks), "product": product_run(cluster, tmp, args.tasks),
                   "many_jobs": many_jobs(cluster, ws, args.tasks)}     # last: its jobs are left to the queue
        version = cluster.run("sinfo", "--version").stdout.strip()
    finally:
        cluster.stop()
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpus_real": os.cpu_count(), "cpus_declared": args.cpus, "slurm": version,
           "command": " ".join(sys.argv), **figures}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
