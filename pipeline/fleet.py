"""Many hosts at once: a bound on how many run together, a wall limit per host, one verdict per host whatever
happens, output that says which host it is about (a live view on a terminal, plain lines otherwise), and the
history and summary at the end.

    run_fleet(hosts, make_opts, options, cancel, view)   every host through `runner.run_host`, then
                                                         `summary.finish_fleet`: the exit code
    run_hosts(hosts, run_one, ...)                       the scheduler alone: threads, the bound, wall limits
    PlainView / LiveView                                 where the lines and the progress go

Each host runs in a thread of its own (`runner.run_host` keeps no global state) with its own `Cancel`, a child of
the one the CLI's signal handler sets: Ctrl-C or SIGTERM reaches every host; the host's wall limit (`--host-timeout`,
the inventory's `timeouts: {host: ...}`, else `steps.host_deadline`: the sum of its steps' own limits) stops that
host alone, which then cleans up and reports "TIMED OUT". A host whose run does not end even `grace_s` after its
wall limit (something that ignores cancellation) is given up: its verdict is UNKNOWN, its thread is left behind (a
daemon: it ends with the process) and the fleet goes on. An exception out of a host's run is that host's UNKNOWN,
never the fleet's crash.

Other executors (pipeline/slurm.py) produce HostRunResults too and hand them to the same end:
`summary.finish_fleet(results, report_dir, history=..., target=...)` records the history and writes the summary;
calling a `summary.Judge(history)` on each result before writing its report puts the regressions at its top.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from pipeline import errors
from pipeline.history import default_path
from pipeline.remote import Cancel
from pipeline.results import HostRunResult
from pipeline.runner import RunEvent, RunOptions, run_host, unknown_result
from pipeline.settings import DEFAULT_PARALLEL, HostConfig
from pipeline.steps import host_deadline
from pipeline.summary import FleetOutcome, Judge, finish_fleet

GRACE_S = 120.0          # after its wall limit, how long a host's cleanup may take before it is given up
POLL_S = 0.2


@dataclass
class FleetOptions:
    report_dir: str = "reports"
    history: Path | None = None        # None: REPORT_DIR/history.sqlite
    parallel: int = DEFAULT_PARALLEL
    target: str = ""                   # what the summary and the history call this run
    summary: bool = True               # write the summary files (a single host's run: the history only)
    template: str | None = None        # the summary's own template (None: templates/summary.md.j2)
    grace_s: float = GRACE_S


def wall_limit(cfg: HostConfig, opts: RunOptions) -> float:
    return cfg.host_timeout or host_deadline(cfg, opts.kill_after_s)


# ------------------------------------------------------------------------------------------------- the scheduler


@dataclass
class _Job:
    index: int
    cfg: HostConfig
    cancel: Cancel
    deadline: float
    limit: float
    result: HostRunResult | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def run_hosts(hosts: Sequence[HostConfig], run_one: Callable[[HostConfig, Cancel], HostRunResult], *,
              parallel: int, cancel: Cancel, wall: Callable[[HostConfig], float],
              unknown: Callable[[HostConfig, str], HostRunResult], grace_s: float = GRACE_S,
              poll_s: float = POLL_S) -> list[HostRunResult]:
    """Every host through `run_one(cfg, its cancel)`, at most `parallel` at once, in the hosts' order. One host's
    failure, exception or hang never stops or holds up the others past its own wall limit (+ `grace_s`)."""
    pending = deque(enumerate(hosts))
    active: list[_Job] = []
    results: list[HostRunResult | None] = [None] * len(hosts)
    wake = threading.Event()

    def body(job: _Job) -> None:
        try:
            job.result = run_one(job.cfg, job.cancel)
        except BaseException as e:  # noqa: BLE001 - a bug in one host's run: that host's UNKNOWN verdict
            job.error = e
        finally:
            job.done.set()
            wake.set()

    while pending or active:
        room = len(pending) if cancel.is_set() else parallel - len(active)   # interrupted: report the rest now
        while pending and room > 0:
            i, cfg = pending.popleft()
            limit = wall(cfg)
            job = _Job(i, cfg, cancel.child(), time.monotonic() + limit, limit)
            threading.Thread(target=body, args=(job,), name=f"host {cfg.name or cfg.label}", daemon=True).start()
            active.append(job)
            room -= 1
        try:
            wake.wait(poll_s)
        except KeyboardInterrupt:              # a library caller without a signal handler: stop every host
            cancel.set(signal.SIGINT)
        wake.clear()
        now = time.monotonic()
        for job in list(active):
            if job.done.is_set():
                results[job.index] = job.result if job.result is not None else unknown(
                    job.cfg, f"unexpected {type(job.error).__name__} out of the run: {job.error}")
            elif now >= job.deadline + grace_s:
                results[job.index] = unknown(
                    job.cfg, f"the run did not end within its wall limit of {job.limit:g} s and {grace_s:g} s "
                             "more for its cleanup; given up (its process groups and token are removed on the host "
                             "by the workspace lock's holder when this process exits)")
            else:
                if now >= job.deadline and not job.cancel.is_set():
                    job.cancel.expire(f"host wall limit of {job.limit:g} s reached (--host-timeout)")
                continue
            active.remove(job)
    return [r for r in results if r is not None]


# ------------------------------------------------------------------------------------------------------- views


class PlainView:
    """Plain lines (cron, CI, a pipe): every line as the run says it, `[host ...]` first, whole lines only."""

    live = False

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._lock = threading.Lock()

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def line(self, text: str) -> None:
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()

    def note(self, text: str) -> None:
        """A line that stays (a host finished): stdout, as every line here."""
        self.line(text)

    def error(self, text: str) -> None:
        with self._lock:
            self.err.write(text + "\n")
            self.err.flush()

    def event(self, ev: RunEvent) -> None:
        pass


@dataclass
class Row:
    host: str
    tag: str = ""                     # "" the host, "gpu0" one GPU's suite
    step: str = "waiting"
    status: str = ""
    started: float | None = None      # when the host (or the GPU's suite) started
    last: str = ""                    # its last line of output
    verdict: str = ""
    ended: float | None = None


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class LiveView(PlainView):
    """On a terminal: a live table (rich), one line per host and per GPU: its current step, elapsed time, last line
    of output; above it, one line per host as it finishes and per failed step. The suites' full output is in each
    report's suite.log."""

    live = True

    def __init__(self, hosts: Sequence[str], console=None):
        from rich.console import Console
        super().__init__()
        self.console = console or Console()
        self.rows: dict[tuple[str, str], Row] = {(h, ""): Row(h) for h in hosts}
        self._live = None

    def __enter__(self) -> LiveView:
        from rich.live import Live
        self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def line(self, text: str) -> None:
        pass                                   # the runs' lines reach the rows through events

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)   # above the live table

    error = note

    def event(self, ev: RunEvent) -> None:
        now = time.monotonic()
        with self._lock:
            row = self.rows.setdefault((ev.host, ev.tag if ev.tag not in ("", "suite") else ""),
                                       Row(ev.host, ev.tag if ev.tag != "suite" else ""))
            host = self.rows[(ev.host, "")]
            if host.started is None:
                host.started = now
            if ev.kind == "step":
                row.step, row.status = ev.step, "running"
                row.started = row.started or now
            elif ev.kind == "end":
                row.status = ev.status
                if ev.status == "failed":
                    self.note(f"[{ev.host}{' ' + ev.tag if ev.tag else ''}] {ev.step} failed: {ev.text}")
                if row.tag:
                    row.ended = now
            elif ev.kind == "line" and ev.text:
                row.last = ev.text
            elif ev.kind == "done":
                host.verdict, host.ended, host.step = ev.text, now, "done"

    def table_rows(self, now: float | None = None) -> list[list[str]]:
        """[host, GPU, step, elapsed, last line or verdict] per row (pure over the state: the tests read it)."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            rows = sorted(self.rows.values(), key=lambda r: (list(self.rows).index((r.host, "")), r.tag))
            for r in rows:
                elapsed = "" if r.started is None else _elapsed((r.ended or now) - r.started)
                step = r.step + (f" ({r.status})" if r.status in ("failed", "ok") and r.tag else "")
                out.append([r.host if not r.tag else "", r.tag, step, elapsed, r.verdict or r.last[-100:]])
        return out

    def __rich__(self):
        from rich.table import Table
        table = Table("host", "GPU", "step", "elapsed", "last", box=None, pad_edge=False, expand=False)
        for row in self.table_rows():
            table.add_row(*row)
        return table


# ------------------------------------------------------------------------------------------------- the fleet


def run_fleet(hosts: Sequence[HostConfig], make_opts: Callable[[HostConfig], RunOptions], fo: FleetOptions,
              cancel: Cancel, view: PlainView) -> tuple[list[HostRunResult], FleetOutcome]:
    """Every host (at most `fo.parallel` at once), each judged against the history before its report is written,
    then the history recorded and the summary written: (the hosts' results, the fleet's outcome)."""
    started = datetime.now(timezone.utc)
    judge = Judge(fo.history or default_path(fo.report_dir))

    def opts_for(cfg: HostConfig, host_cancel: Cancel | None = None) -> RunOptions:
        return dataclasses.replace(make_opts(cfg), cancel=host_cancel or cancel, out=view.line,
                                   on_event=view.event, judge=judge)

    def run_one(cfg: HostConfig, host_cancel: Cancel) -> HostRunResult:
        res = run_host(cfg, opts_for(cfg, host_cancel))
        _finished(view, res, fo.report_dir)
        return res

    def unknown(cfg: HostConfig, why: str) -> HostRunResult:
        res = unknown_result(cfg, opts_for(cfg), why)
        _finished(view, res, fo.report_dir)
        return res

    with view:
        results = run_hosts(hosts, run_one, parallel=fo.parallel, cancel=cancel, unknown=unknown,
                            wall=lambda cfg: wall_limit(cfg, make_opts(cfg)), grace_s=fo.grace_s)
    outcome = finish_fleet(results, fo.report_dir, history=judge.path, target=fo.target,
                           started_at=started.isoformat(), template=fo.template, judge=judge, summary=fo.summary)
    return results, outcome


def finished_lines(res: HostRunResult, report_dir: str, name: str = "") -> tuple[str, str]:
    """(the line for stdout as a host ends, the one for stderr when it failed or regressed, else ''):
    `VERDICT: NAME (exit N) report PATH` and `flashcore-deploy: NAME: VERDICT: why`. `name`: default the host."""
    name = name or res.host
    report = Path(report_dir) / res.artifacts["report_md"] if res.artifacts.get("report_md") else "-"
    regressed = f", {len(res.regressions)} regression(s)" if res.regressions else ""
    err = (f"flashcore-deploy: {name}: {res.verdict}: {res.error}" if res.exit_code else
           f"flashcore-deploy: {name}: REGRESSION: {res.regressions[0]}" if res.regressions else "")
    return f"{res.verdict}: {name} (exit {res.exit_code}{regressed}) report {report}", err


def _finished(view: PlainView, res: HostRunResult, report_dir: str) -> None:
    out, err = finished_lines(res, report_dir)
    view.note(out)
    if err:
        view.error(err)


def fleet_exit_code(exit_code: int, cancel: Cancel) -> int:
    """A fleet's (or a cluster's) exit code, with the signal that stopped it (128 + its number) where one did."""
    return errors.overall_exit_code([exit_code] + ([128 + cancel.signum] if cancel.signum else []))
