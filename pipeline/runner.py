"""One host's run: the steps in order (each plan executed, its outputs concluded), cancellation, the cleanup, the
verdict and the report. `run_host(cfg, opts)` is the one entry point behind `flashcore-deploy` and `fab validate`.

No process-global state: everything lives in this run's `_Run`, so several runs go at once in threads (hosts or
GPUs of a fleet). Signals are the caller's: the CLI installs one handler that sets `opts.cancel`, which every
active run observes (between steps and while a command runs), then cleans up and reports "interrupted".

Whatever ends a run (success, failure, timeout, a signal, a dropped connection), it ends the same way:
    kill the process groups it started that may still run, remove the token file (one command; after a dropped
    connection through a fresh one, once; what could not be removed is named in the output and the report),
    release the workspace lock, close the connection, write the report.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import commands, local, parse, report
from pipeline.errors import Interrupted, PipelineError, StepError, signal_name, verdict_for
from pipeline.inventory import describe_gpu_requirement
from pipeline.remote import Cancel, LocalRemote, Remote
from pipeline.results import HostRunResult, StepResult
from pipeline.settings import HostConfig, describe
from pipeline.ssh import TARGET_ALIAS, open_remote, rsync_ssh_config
from pipeline.steps import (FORWARDED_ENV, STEPS, TINY, Call, Facts, Get, Here, Hold, HoldOutput, Outcome, Put,
                            PutTarball, Rsync, Run, Step)

LOCK_RETRY_S = 1.0


@dataclass
class RunOptions:
    skip: frozenset[str] = frozenset()
    wheelhouse: str | None = None
    report_dir: str = "reports"
    template: str | None = None
    suite_command: str | None = None    # testing aid: replaces the pytest invocation (see --suite-command)
    steps: tuple[Step, ...] = STEPS     # a Slurm cluster's login node runs others (pipeline.cluster)
    kill_after_s: float = 10.0
    reproduce: str = ""
    debug: bool = False
    out: Callable[[str], None] = print
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    code_root: Path = field(default_factory=local.find_code_root)
    cancel: Cancel = field(default_factory=Cancel)


def gather_here(cfg: HostConfig, opts: RunOptions, started: datetime) -> Here:
    """This machine's facts for the steps (pipeline.local: the code tree, revision, dependency spec, token)."""
    token, source = local.hf_token(opts.environ)
    root = opts.code_root
    return Here(tree=local.collect_tree(root), revision=local.git_revision(root),
                requirements=local.requirements(root), scripts=local.remote_scripts(),
                wheels=local.wheels(opts.wheelhouse), token=token, token_source=source,
                rsync=bool(shutil.which("rsync")) and (cfg.local or bool(shutil.which("ssh"))),
                environ={k: opts.environ[k] for k in FORWARDED_ENV if opts.environ.get(k)},
                owner=f"{_user()}@{socket.gethostname()}, pid {os.getpid()}, since "
                      f"{started.isoformat(timespec='seconds')}")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "host"


def reserve_stem(report_dir: Path, host: str, started: datetime) -> str:
    """<host>-<UTC time>, claimed by creating its .json exclusively: two runs of one host within a second (or in
    two threads) never share a report."""
    base = f"{_slug(host)}-{started.strftime('%Y%m%dT%H%M%SZ')}"
    report_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        stem = base if n == 1 else f"{base}-{n}"
        try:
            with open(report_dir / f"{stem}.json", "x"):
                return stem
        except FileExistsError:
            continue
    raise StepError(f"{report_dir}: no free report name for {base}")


class _Run:
    """One run's state: the connection, what it must undo, the lines it prints."""

    def __init__(self, cfg: HostConfig, opts: RunOptions):
        self.cfg, self.opts = cfg, opts
        self.label = cfg.name or cfg.label
        self.remote: Remote | None = None
        self.held = None
        self.pidfiles: list[str] = []          # process groups this run started and did not see end
        self.cleanup_files: list[str] = []     # files that must not outlive the run (the token)
        self.secrets: list[str] = []
        self.last: Run | None = None
        self.last_result = None
        self.art_dir: Path | None = None
        self.artifacts: dict[str, str] = {}
        self.left_behind: list[str] = []
        self.notes: list[str] = []

    def say(self, text: str) -> None:
        self.opts.out(parse.redact(text, self.secrets))

    # -- executing one operation
    def execute(self, op, facts: Facts):
        if isinstance(op, Run):
            self.last, self.last_result = op, None
            if op.pidfile and op.pidfile not in self.pidfiles:
                self.pidfiles.append(op.pidfile)
            if op.cleanup and op.cleanup not in self.cleanup_files:
                self.cleanup_files.append(op.cleanup)
            stream = (lambda line: self.say(f"[{self.label} suite] {line}")) if op.stream else None
            res = self.remote.run(op.command, timeout=op.timeout, stdin=op.stdin, on_output=stream,
                                  pidfile=op.pidfile)
            if op.pidfile and not res.timed_out:
                self.pidfiles.remove(op.pidfile)   # it ended (its wrapper removed the pidfile): nothing to kill
            self.last_result = res
            return res
        if isinstance(op, Rsync):
            dest, ssh = self.remote.rsync_target(op.workspace)
            argv = commands.rsync_argv(op.source, dest, ssh, prepare=op.prepare)
            res = LocalRemote(self.opts.cancel).run(shlex.join(argv), timeout=op.timeout)
            self.last_result = res
            return res
        if isinstance(op, PutTarball):
            blob = local.make_tarball(facts.here.tree)
            with tempfile.NamedTemporaryFile(suffix=".tar.gz") as tmp:
                tmp.write(blob)
                tmp.flush()
                self.remote.put(tmp.name, op.remote_path)
            return len(blob)
        if isinstance(op, Put):
            self.remote.put(op.local_path, op.remote_path)
            return None
        if isinstance(op, Get):
            return self._get(op)
        if isinstance(op, Hold):
            return self._hold(op)
        if isinstance(op, Call):
            self.art_dir.mkdir(parents=True, exist_ok=True)
            return op.fn(remote=self.remote, cancel=self.opts.cancel, say=self.say, art_dir=self.art_dir)
        raise TypeError(f"unknown operation {op!r}")

    def _artifact_path(self, name: str) -> Path:
        assert self.art_dir is not None
        self.art_dir.mkdir(parents=True, exist_ok=True)
        return self.art_dir / name

    def _get(self, op: Get) -> str | None:
        path = self._artifact_path(op.name)
        try:
            if not self.remote.get(op.remote_path, str(path)):
                return None
        except StepError:
            return None
        self.artifacts[op.name] = f"{self.art_dir.name}/{op.name}"
        return path.read_text(errors="replace")

    def _hold(self, op: Hold) -> HoldOutput:
        t0 = time.monotonic()
        told = False
        while True:
            held, lines = self.remote.hold(op.command, timeout=self.cfg.connect_timeout + 30)
            waited = time.monotonic() - t0
            if held is not None:
                self.held = held
                return HoldOutput(True, lines, waited)
            busy = next((x for x in lines if x.startswith("@@busy")), None)
            if busy is None or waited >= op.wait_s:
                return HoldOutput(False, lines, waited)
            if not told:
                self.say(f"[{self.label}] lock     busy: held by {busy.removeprefix('@@busy').strip()}; waiting up "
                         f"to {op.wait_s:g} s (--lock-timeout)")
                told = True
            if self.opts.cancel.wait(min(LOCK_RETRY_S, max(0.0, op.wait_s - waited))):
                raise self.opts.cancel.error("the wait for the workspace lock")

    def save_artifacts(self, artifacts: dict[str, str]) -> None:
        for name, text in artifacts.items():
            self._artifact_path(name).write_text(parse.redact(text, self.secrets))
            self.artifacts[name] = f"{self.art_dir.name}/{name}"

    # -- one step
    def do(self, step: Step, facts: Facts) -> Outcome:
        try:
            if step.name == "connect":
                self.remote = open_remote(self.cfg, self.opts.cancel)
            outputs = [self.execute(op, facts) for op in step.plan(facts)]
            outcome = step.conclude(facts, outputs)
        except Interrupted as e:              # raised where a command was stopped: say which step
            e = Interrupted(f"interrupted ({signal_name(e.signum)}) during {step.name}", e.signum)
            outcome = Outcome(self._failed(step.name, str(e)), error=e)
        except PipelineError as e:
            outcome = Outcome(self._failed(step.name, str(e)), error=e)
        except KeyboardInterrupt:              # no signal handler installed (a library caller): same as SIGINT
            e = Interrupted(f"interrupted (SIGINT) during {step.name}")
            outcome = Outcome(self._failed(step.name, str(e)), error=e)
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: reported, not lost
            err = StepError(f"{step.name}: unexpected {type(e).__name__}: {e}")
            outcome = Outcome(self._failed(step.name, str(err)), error=err)
            if self.opts.debug:
                import traceback
                traceback.print_exc(file=sys.stderr)
        facts.learn(outcome.learned)
        self.save_artifacts(outcome.artifacts)
        s = outcome.step
        s.detail, s.command, s.log_tail = (parse.redact(x, self.secrets) for x in (s.detail, s.command, s.log_tail))
        return outcome

    def _failed(self, name: str, detail: str) -> StepResult:
        res = self.last_result
        command = res.command if res else (self.last.command if self.last else "")
        return StepResult(name, "failed", detail=detail, command=command,
                          log_tail=parse.tail(res.output, 40) if res else "")

    # -- the end of every run
    def cleanup(self) -> None:
        """Kill what may still run, remove the token, release the lock, close. After a dropped connection:
        reconnect once for that; if even that fails, say exactly what may be left on the host."""
        remote = self.remote
        if remote is None:
            return
        remote.cancel = Cancel()               # the run is over: the cleanup runs even after a signal
        try:
            if not remote.alive():
                self.say(f"[{self.label}] cleanup  the connection is gone: reconnecting once to clean up")
                remote.close()
                remote = self.remote = remote.reconnect()
            if self.pidfiles or self.cleanup_files:
                res = remote.run(commands.cleanup_command(self.cleanup_files, self.pidfiles), timeout=60)
                if not res.ok:
                    raise StepError(f"the cleanup command failed (exit {res.exit_code}): {parse.brief(res.output)}")
        except PipelineError as e:
            self.left_behind = [f"the process group recorded in {p}, if it still runs" for p in self.pidfiles] + \
                [f"the token file {f}" for f in self.cleanup_files]
            what = "; ".join(self.left_behind) or "nothing this run started"
            msg = (f"could not clean up on the host ({e}). Possibly left there: {what}. The host's lock holder "
                   "kills and removes these itself when it sees this run's connection close.")
            self.notes.append(msg)
            self.say(f"[{self.label}] cleanup  {msg}")
        finally:
            if self.held is not None:
                self.held.release()
            remote.close()


def _result(cfg: HostConfig, opts: RunOptions, started: datetime) -> HostRunResult:
    return HostRunResult(host=cfg.name or cfg.label, address="localhost" if cfg.local else cfg.address,
                         port=0 if cfg.local else cfg.port, user=cfg.user, local=cfg.local, model=cfg.model,
                         require_gpu=describe_gpu_requirement(cfg.gpu),
                         started_at=started.isoformat(timespec="seconds"), reproduce=opts.reproduce)


def _run_steps(run: _Run, facts: Facts, result: HostRunResult) -> tuple[PipelineError | None, str]:
    """Every step in order; after a failure the rest are skipped. (error, the step that failed)."""
    error: PipelineError | None = None
    failed_step = ""
    for step in run.opts.steps:
        if error is not None:
            result.steps.append(StepResult(step.name, "skipped", detail=f"not run: {failed_step} failed"))
            continue
        if step.name in run.opts.skip:
            result.steps.append(StepResult(step.name, "skipped", detail="--skip " + step.name))
            run.say(f"[{run.label}] {step.name:8s} skipped (--skip)")
            continue
        if run.opts.cancel.is_set():
            error, failed_step = run.opts.cancel.error(step.name), step.name
            result.steps.append(StepResult(step.name, "failed", detail=str(error)))
            continue
        run.say(f"[{run.label}] {step.name:8s} ...")
        s0 = time.monotonic()
        outcome = run.do(step, facts)
        outcome.step.duration_s = round(time.monotonic() - s0, 3)
        result.steps.append(outcome.step)
        run.say(f"[{run.label}] {step.name:8s} {outcome.step.status} ({outcome.step.duration_s:.2f} s) "
                f"{outcome.step.detail}")
        if outcome.error is not None:
            error, failed_step = outcome.error, step.name
    return error, failed_step


def _gather(run: _Run, started: datetime) -> Facts:
    try:
        here = gather_here(run.cfg, run.opts, started)
    except (OSError, ValueError, KeyError) as e:
        raise StepError(f"cannot read the checkout {run.opts.code_root} ({type(e).__name__}: {e})") from None
    run.secrets = [here.token] if here.token else []
    return Facts(run.cfg, here, skip=frozenset(run.opts.skip), suite_command=run.opts.suite_command,
                 kill_after_s=run.opts.kill_after_s)


def run_host(cfg: HostConfig, opts: RunOptions) -> HostRunResult:
    """Validate one host: every step in order, the cleanup and the report always. Never raises PipelineError."""
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    result = _result(cfg, opts, started)
    run = _Run(cfg, opts)
    report_dir = Path(opts.report_dir)
    facts, stem = None, ""
    try:
        stem = reserve_stem(report_dir, result.host, started)
        run.art_dir = report_dir / stem
        facts = _gather(run, started)
        error, failed_step = _run_steps(run, facts, result)
    except (OSError, StepError) as e:       # the report folder or this checkout: before any step ran
        error, failed_step = (e if isinstance(e, StepError) else StepError(f"report folder {report_dir}: {e}"),
                              "checkout" if stem else "report")
        result.steps = [StepResult(s.name, "skipped", detail=f"not run: {failed_step} failed") for s in opts.steps]
    finally:
        run.cleanup()
    if facts is not None:
        result.model, result.device, result.workspace = facts.model, facts.device, facts.workspace
        result.gpus, result.versions, result.sync, result.parity = facts.gpus, facts.versions, facts.sync, facts.parity
        result.notes = facts.notes
    result.notes += (run.remote.notes if run.remote else []) + run.notes
    result.left_behind, result.artifacts = run.left_behind, dict(run.artifacts)
    result.verdict, result.exit_code = verdict_for(error, failed_step, "suite" in opts.skip)
    result.error = parse.redact(str(error), run.secrets) if error else ""
    result.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result.duration_s = round(time.monotonic() - t0, 3)
    if stem:
        report.write(result, report_dir, stem, opts.template, run.secrets)
        step = result.step("report")
        run.say(f"[{run.label}] report   {step.status}: {step.detail}")
    return result


# ------------------------------------------------------------------------------------------------- dry run


def assumed_facts(cfg: HostConfig, opts: RunOptions) -> Facts:
    """What --dry-run assumes the host would say (nothing connects): $HOME, every tool present, the GPU the
    requirement asks for."""
    here = gather_here(cfg, opts, datetime.now(timezone.utc))
    home = os.path.expanduser("~") if cfg.local else ("/root" if cfg.user == "root" else f"/home/{cfg.user}")
    facts = Facts(cfg, here, skip=frozenset(opts.skip), suite_command=opts.suite_command,
                  kill_after_s=opts.kill_after_s)
    facts.probe = {"home": home, "user": cfg.user, "python_path": cfg.python,
                   **{f"tool.{t}": t for t in commands.PROBE_TOOLS}}
    facts.lay = commands.layout(commands.expand_home(cfg.workspace, home))
    facts.device = "cuda" if cfg.gpu is not None else "cpu"
    if facts.device == "cpu" and not cfg.model_explicit:
        facts.model = TINY
    return facts


def describe_op(op, cfg: HostConfig, facts: Facts) -> list[str]:
    if isinstance(op, Run):
        return [f"$ {op.command}"] + ([f"    < stdin: {op.stdin_label}"] if op.stdin is not None else [])
    if isinstance(op, Rsync):
        if cfg.local:
            return ["(here) $ " + shlex.join(commands.rsync_argv(op.source, op.workspace, None, prepare=op.prepare))]
        argv = commands.rsync_argv(op.source, f"{TARGET_ALIAS}:{op.workspace}", "ssh -F SSH_CONFIG",
                                   prepare=op.prepare)
        return ["(here) $ " + shlex.join(argv), "    SSH_CONFIG, written for this run:",
                *("      " + x for x in rsync_ssh_config(cfg).splitlines())]
    if isinstance(op, PutTarball):
        return [f"put <gzipped tar of {len(facts.here.tree.files)} files> -> {op.remote_path}"]
    if isinstance(op, Put):
        return [f"put {op.local_path} -> {op.remote_path}"]
    if isinstance(op, Get):
        return [f"get {op.remote_path} -> REPORT_DIR/<host>-<UTC time>/{op.name}"]
    if isinstance(op, Hold):
        return [f"$ {op.command}", f"    (kept running until the run ends; retried for up to {op.wait_s:g} s while "
                                  "another run holds the lock)"]
    if isinstance(op, Call):
        return list(op.describe)
    return [repr(op)]


def plan_lines(cfg: HostConfig, opts: RunOptions) -> list[str]:
    """--dry-run: every step's exact commands for this host, from assumed facts; nothing runs."""
    facts = assumed_facts(cfg, opts)
    lines = [f"# {describe(cfg)}",
             f"# dry run: nothing runs. Assumed: $HOME={facts.probe['home']}, the tools present, the suite on "
             f"{facts.device} with {facts.model}"]
    for step in opts.steps:
        if step.name in opts.skip:
            lines.append(f"## {step.name}: skipped (--skip)")
            continue
        lines.append(f"## {step.name}")
        try:
            ops = step.plan(facts)
        except PipelineError as e:
            lines.append(f"would fail: {e}")
            continue
        lines += [x for op in ops for x in describe_op(op, cfg, facts)] or ["(nothing to run)"]
    return lines
