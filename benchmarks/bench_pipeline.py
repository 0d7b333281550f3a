"""Pipeline overhead: a cold run and warm re-runs of flashcore-deploy against a loopback sshd, suite skipped.

Everything but the suite is overhead: connect, GPU probe, sync, venv/install check, token, report. Cold = a fresh
remote workspace (full sync, venv built, full import check); warm = the same workspace, unchanged code (rsync
sends ~nothing, the venv's dependency spec is unchanged so only installed versions are re-read). Target: warm
<= 3 s. Runs the real CLI as a subprocess (interpreter start-up and imports included).

    .venv/bin/python benchmarks/bench_pipeline.py [--warm-runs 5] [--json out.json]

Needs OpenSSH's sshd (run as root: the loopback sshd uses privilege separation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.harness import start_sshd  # noqa: E402


def one_run(sshd, workspace: Path, reports: Path) -> dict:
    argv = [sys.executable, "-m", "pipeline.cli", *sshd.base_args(), "--require-gpu", "none", "--model", "tiny",
            "--python", sys.executable, "--workspace", str(workspace), "--skip", "suite",
            "--report-dir", str(reports)]
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"run failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    doc = json.loads(max(reports.glob("*.json"), key=lambda f: f.stat().st_mtime).read_text())
    return {"wall_s": round(wall, 3), "steps": {s["name"]: s["duration_s"] for s in doc["steps"]},
            "sync": doc["sync"], "install": next(s["detail"] for s in doc["steps"] if s["name"] == "install")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm-runs", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        tmp = Path(tmp)
        sshd, proc = start_sshd(tmp / "sshd")
        try:
            ws = tmp / "remote" / "flashcore-workspace"
            cold = one_run(sshd, ws, tmp / "r-cold")
            warm = [one_run(sshd, ws, tmp / f"r-warm{i}") for i in range(a.warm_runs)]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    med = statistics.median(w["wall_s"] for w in warm)
    steps = list(cold["steps"])
    print(f"flashcore-deploy overhead against a loopback sshd (suite skipped), {platform.node()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{'':14s}{'wall s':>8s}" + "".join(f"{s:>9s}" for s in steps) + "   sync")
    rows = [("cold", cold)] + [(f"warm {i + 1}", w) for i, w in enumerate(warm)]
    for label, r in rows:
        print(f"{label:14s}{r['wall_s']:8.2f}" + "".join(f"{r['steps'].get(s, 0):9.2f}" for s in steps)
              + f"   {r['sync']['method']}, {r['sync']['bytes_sent']} B sent")
    print(f"warm median: {med:.2f} s (target <= 3 s): {'OK' if med <= 3 else 'MISSED'}")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "cold": cold, "warm": warm,
            "warm_median_s": med}, indent=2) + "\n")


if __name__ == "__main__":
    main()
