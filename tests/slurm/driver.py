"""What a caller of pipeline.slurm does, as a process the signal tests can interrupt:

    python tests/slurm/driver.py '{"config": {...SlurmConfig...}, "suite_command": "..."}'

SIGTERM sets the cancel event (cancel_on_signals); SIGINT stays Python's KeyboardInterrupt, installed here
explicitly: a process started from a non-interactive shell's background job inherits SIGINT ignored, and
Python then installs no handler (the test would see the signal do nothing). Prints one `@@progress P R D` line
per poll and `@@run {json}` at the end; exits 130 (interrupted), 143 (cancelled) or 0."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import slurm  # noqa: E402
from pipeline.remote import LocalRemote  # noqa: E402


def main() -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = json.loads(sys.argv[1])
    cfg = slurm.SlurmConfig(**spec["config"])
    script = slurm.render_script(cfg, suite_command=spec.get("suite_command"))
    event = threading.Event()
    with slurm.cancel_on_signals(event):
        run = slurm.run_array(LocalRemote(), cfg, script, cancel_event=event, on_progress=lambda p: print(
            f"@@progress {p.pending} {p.running} {p.done}", flush=True))
    doc = {"job_id": run.job_id, "ended_by": run.ended_by, "records": [dataclasses.asdict(r) for r in run.records]}
    print("@@run " + json.dumps(doc), flush=True)
    return {"interrupted": 130, "cancelled": 143}.get(run.ended_by, 0)


if __name__ == "__main__":
    sys.exit(main())
