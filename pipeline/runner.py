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

import dataclasses
import getpass
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import commands, local, parse, report
from pipeline.catalogue import read_catalogue
from pipeline.errors import Interrupted, PipelineError, StepError, UnknownError, WallTimeout, verdict_for
from pipeline.inventory import describe_gpu_requirement
from pipeline.remote import Cancel, LocalRemote, Remote
from pipeline.results import GpuInfo, HostRunResult, StepResult
from pipeline.settings import HostConfig, describe
from pipeline.ssh import TARGET_ALIAS, open_remote, rsync_ssh_config
from pipeline.steps import (FORWARDED_ENV, STEPS, SUITE_FILES, TINY, Call, Facts, Get, Here, Hold, HoldOutput,
                            Outcome, Put, PutTarball, Rsync, Run, Step, SuiteTarget)

LOCK_RETRY_S = 1.0


@dataclass(frozen=True)
class RunEvent:
    """What a run is doing, for a live view (pipeline.fleet): `step` a step (or one GPU's suite, `tag` gpu0)
    starts; `end` it ended (`status`, `text` its detail); `line` a line of output (redacted, as printed);
    `done` the run ended (`text` the verdict, `status` the exit code)."""

    host: str
    kind: str
    step: str = ""
    tag: str = ""
    status: str = ""
    text: str = ""


class Checkout:
    """This machine's facts that no host changes: the code tree and its hash, revision, dependency spec, remote
    scripts, model catalogue, wheels and token (pipeline.local). Read once, by the first host that asks, and
    shared by every host of an execute (they run in threads): a fleet walks and hashes the checkout once, not once
    per host. A failure to read it is kept and raised to each host that asks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: tuple[dict | None, Exception | None] | None = None

    def get(self, opts: RunOptions) -> dict:
        with self._lock:
            if self._read is None:
                try:
                    self._read = (_read_checkout(opts), None)
                except (OSError, ValueError, KeyError) as e:
                    self._read = (None, e)
        facts, error = self._read
        if error is not None:
            raise error
        return facts


def _read_checkout(opts: RunOptions) -> dict:
    token, source = local.hf_token(opts.environ)
    root = opts.code_root
    return dict(tree=local.collect_tree(root), revision=local.git_revision(root),
                requirements=local.requirements(root), scripts=local.remote_scripts(),
                catalogue=read_catalogue(root), wheels=local.wheels(opts.wheelhouse), token=token,
                token_source=source, environ={k: opts.environ[k] for k in FORWARDED_ENV if opts.environ.get(k)})


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
    on_event: Callable[[RunEvent], None] | None = None
    # called with the finished result before its report is written: the history's judgement goes into it
    judge: Callable[[HostRunResult], None] | None = None
    checkout: Checkout = field(default_factory=Checkout)   # one instance for all hosts of an execute


def gather_here(cfg: HostConfig, opts: RunOptions, started: datetime) -> Here:
    """This machine's facts for the steps: the checkout's (read once per Checkout), whether rsync can reach
    this host, and this run as the workspace lock shows it."""
    rsync = bool(shutil.which("rsync")) and (cfg.local or bool(shutil.which("ssh")))
    owner = f"{_user()}@{socket.gethostname()}, pid {os.getpid()}, since {started.isoformat(timespec='seconds')}"
    return Here(**opts.checkout.get(opts), rsync=rsync, owner=owner)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


@dataclass
class _Track:
    """What one thread of a step last ran: a failed step names that command and its output."""

    last: Run | None = None
    result: object = None


class _Run:
    """One run's state: the connection, what it must undo, the lines it prints. The suites of several GPUs run in
    threads at once: what they share is guarded by locks."""

    def __init__(self, cfg: HostConfig, opts: RunOptions):
        self.cfg, self.opts = cfg, opts
        self.label = cfg.name or cfg.label
        self.remote: Remote | None = None
        self.held = None
        self.pidfiles: list[str] = []          # process groups this run started and did not see end
        self.cleanup_files: list[str] = []     # files that must not outlive the run (the token)
        self.secrets: list[str] = []
        self.art_dir: Path | None = None
        self.artifacts: dict[str, str] = {}
        self.left_behind: list[str] = []
        self.notes: list[str] = []
        self._state = threading.Lock()         # pidfiles, cleanup_files, artifacts
        self._files = threading.Lock()         # one transfer at a time over the connection (one SFTP client)

    def say(self, text: str, tag: str = "") -> None:
        line = parse.redact(text, self.secrets)
        self.opts.out(line)
        self.emit("line", tag=tag, text=line)

    def emit(self, kind: str, **kw: str) -> None:
        if self.opts.on_event is not None:
            self.opts.on_event(RunEvent(self.label, kind, **kw))

    # -- executing one operation
    def execute(self, op, facts: Facts, track: _Track):
        if isinstance(op, Run):
            track.last, track.result = op, None
            with self._state:
                if op.pidfile and op.pidfile not in self.pidfiles:
                    self.pidfiles.append(op.pidfile)
                if op.cleanup and op.cleanup not in self.cleanup_files:
                    self.cleanup_files.append(op.cleanup)
            tag = op.stream
            stream = (lambda line: self.say(f"[{self.label} {tag}] {line}", tag=tag)) if tag else None
            res = self.remote.run(op.command, timeout=op.timeout, stdin=op.stdin, on_output=stream,
                                  pidfile=op.pidfile)
            if op.pidfile and not res.timed_out:
                with self._state:
                    self.pidfiles.remove(op.pidfile)   # it ended (its wrapper removed the pidfile): nothing to kill
            track.result = res
            return res
        if isinstance(op, Rsync):
            dest, ssh = self.remote.rsync_target(op.workspace)
            with tempfile.NamedTemporaryFile(prefix="flashcore-excludes-") as excludes:
                excludes.write(commands.exclude_file_bytes(op.excludes))
                excludes.flush()
                argv = commands.rsync_argv(op.source, dest, ssh, prepare=op.prepare, exclude_from=excludes.name)
                res = LocalRemote(self.opts.cancel).run(shlex.join(argv), timeout=op.timeout)
            track.result = res
            return res
        if isinstance(op, PutTarball):
            blob = local.make_tarball(facts.here.tree)
            with tempfile.NamedTemporaryFile(suffix=".tar.gz") as tmp:
                tmp.write(blob)
                tmp.flush()
                with self._files:
                    self.remote.put(tmp.name, op.remote_path)
            return len(blob)
        if isinstance(op, Put):
            with self._files:
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
            with self._files:
                if not self.remote.get(op.remote_path, str(path)):
                    return None
        except StepError:
            return None
        with self._state:
            self.artifacts[op.name] = f"{self.art_dir.name}/{op.name}"
        text = path.read_text(errors="replace")
        clean = parse.redact(text, self.secrets)
        if clean != text:                      # a suite that printed the token: not into the reports
            path.write_text(clean)
        return clean

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

    def suite_artifacts(self, tag: str) -> dict[str, str]:
        """The files fetched for one suite (`gpu0/parity.json` ... or, without a tag, `parity.json` ...)."""
        prefix = f"{tag}/" if tag else ""
        return {name: self.artifacts[prefix + name] for name in SUITE_FILES if prefix + name in self.artifacts}

    # -- one step
    def do(self, step: Step, facts: Facts) -> Outcome:
        if step.targets is not None:
            outcome = self._do_targets(step, facts)
        else:
            def body(track: _Track) -> Outcome:
                if step.name == "connect":
                    self.remote = open_remote(self.cfg, self.opts.cancel,
                                              lambda text: self.say(f"[{self.label}] connect  {text}"))
                return self._plan_and_conclude(step, facts, track)
            outcome = self._attempt(step.name, body)
        facts.learn(outcome.learned)
        self.save_artifacts(outcome.artifacts)
        s = outcome.step
        s.detail, s.command, s.log_tail = (parse.redact(x, self.secrets) for x in (s.detail, s.command, s.log_tail))
        for run in facts.suites if step.targets is not None else ():
            run.error, run.command, run.log_tail = (parse.redact(x, self.secrets)
                                                    for x in (run.error, run.command, run.log_tail))
            run.artifacts = self.suite_artifacts(run.tag)
        return outcome

    def _attempt(self, name: str, body: Callable[[_Track], Outcome]) -> Outcome:
        """One step's (or one GPU's) plan executed and concluded; whatever it raises becomes its failed outcome."""
        track = _Track()
        try:
            return body(track)
        except (Interrupted, WallTimeout) as e:   # raised where a command was stopped: say which step
            e = self.opts.cancel.error(name) if self.opts.cancel.is_set() else e
            return Outcome(self._failed(name, str(e), track), error=e)
        except PipelineError as e:
            return Outcome(self._failed(name, str(e), track), error=e)
        except KeyboardInterrupt:              # no signal handler installed (a library caller): same as SIGINT
            e = Interrupted(f"interrupted (SIGINT) during {name}")
            return Outcome(self._failed(name, str(e), track), error=e)
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: this host's "unknown", not lost
            err = UnknownError(f"{name}: unexpected {type(e).__name__}: {e}")
            _debug_traceback(self.opts)
            return Outcome(self._failed(name, str(err), track), error=err)

    def _do_targets(self, step: Step, facts: Facts) -> Outcome:
        """A per-GPU step: each target's plan executed and concluded in a thread of its own, all at once, then
        combined into one outcome."""
        targets = step.targets(facts)
        results: list[tuple[SuiteTarget, Outcome] | None] = [None] * len(targets)

        def one(i: int, t: SuiteTarget) -> None:
            mine = dataclasses.replace(facts, target=t)
            tag = t.tag or step.name
            if len(targets) > 1:
                self.emit("step", step=step.name, tag=tag)
            t0 = time.monotonic()
            o = self._attempt(step.name, lambda track: self._plan_and_conclude(step, mine, track))
            o.step.duration_s = round(time.monotonic() - t0, 3)
            if len(targets) > 1:
                self.step_ended(step.name, o, tag)
            results[i] = (t, o)

        if len(targets) == 1:
            one(0, targets[0])
        else:
            threads = [threading.Thread(target=one, args=(i, t), name=f"{self.label} {t.tag}", daemon=True)
                       for i, t in enumerate(targets)]
            for th in threads:
                th.start()
            for th in threads:
                try:
                    th.join()
                except KeyboardInterrupt:      # a library caller without a signal handler: stop every GPU's suite
                    self.opts.cancel.set(signal.SIGINT)
                    th.join()
        return step.combine(facts, [r for r in results if r is not None])

    def _plan_and_conclude(self, step: Step, facts: Facts, track: _Track) -> Outcome:
        return step.conclude(facts, [self.execute(op, facts, track) for op in step.plan(facts)])

    def step_ended(self, name: str, outcome: Outcome, tag: str = "") -> None:
        """The end line and event of a step, or of one GPU's part of it (`tag`)."""
        s = outcome.step
        where = f"{name:8s} {tag}: " if tag else f"{name:8s} "
        self.say(f"[{self.label}] {where}{s.status} ({s.duration_s:.2f} s) {s.detail}", tag=tag)
        self.emit("end", step=name, tag=tag, status=s.status, text=s.detail)

    def _failed(self, name: str, detail: str, track: _Track) -> StepResult:
        res = track.result
        command = res.command if res else (track.last.command if track.last else "")
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
                         started_at=started.isoformat(timespec="seconds"), reproduce=opts.reproduce,
                         gpus_selected=list(cfg.gpus) if cfg.gpus is not None else None)


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
        run.emit("step", step=step.name)
        s0 = time.monotonic()
        outcome = run.do(step, facts)
        outcome.step.duration_s = round(time.monotonic() - s0, 3)
        result.steps.append(outcome.step)
        run.step_ended(step.name, outcome)
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
    """Validate one host: every step in order, the cleanup and the report always. Never raises: a bug shows as
    this host's UNKNOWN verdict (and the traceback with --debug)."""
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    result = _result(cfg, opts, started)
    run = _Run(cfg, opts)
    report_dir = Path(opts.report_dir)
    facts, stem = None, ""
    try:
        stem = report.reserve_stem(report_dir, result.host, started)
        run.art_dir = report_dir / stem
        facts = _gather(run, started)
        error, failed_step = _run_steps(run, facts, result)
    except (OSError, StepError) as e:       # the report folder or this checkout: before any step ran
        error, failed_step = (e if isinstance(e, StepError) else StepError(f"report folder {report_dir}: {e}"),
                              "checkout" if stem else "report")
        result.steps = [StepResult(s.name, "skipped", detail=f"not run: {failed_step} failed") for s in opts.steps]
    except Exception as e:  # noqa: BLE001 - a bug outside the steps: reported as this host's unknown state
        error, failed_step = UnknownError(f"unexpected {type(e).__name__}: {e}"), "runner"
        _debug_traceback(opts)
    finally:
        guarded(run.cleanup, run.notes, "the cleanup", run.secrets, run.opts)
    if facts is not None:
        result.model, result.device, result.workspace = facts.model, facts.device, facts.workspace
        result.gpus, result.versions, result.sync, result.parity = facts.gpus, facts.versions, facts.sync, facts.parity
        result.suites, result.notes = facts.suites, facts.notes
    result.notes += (run.remote.notes if run.remote else []) + run.notes
    result.left_behind, result.artifacts = run.left_behind, dict(run.artifacts)
    result.verdict, result.exit_code = verdict_for(error, failed_step, "suite" in opts.skip)
    result.error = parse.redact(str(error), run.secrets) if error else ""
    result.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result.duration_s = round(time.monotonic() - t0, 3)
    if opts.judge is not None:
        guarded(lambda: opts.judge(result), result.notes, "the history's judgement", run.secrets, opts)
    if stem:
        report.write(result, report_dir, stem, opts.template, run.secrets)
        step = result.step("report")
        run.say(f"[{run.label}] report   {step.status}: {step.detail}")
    run.emit("done", status=str(result.exit_code), text=result.verdict)
    return result


def unknown_result(cfg: HostConfig, opts: RunOptions, why: str) -> HostRunResult:
    """The result (and report) of a host whose run failed in a way it could not report itself (an exception out
    of run_host, a run that never ended): verdict UNKNOWN, what is known said."""
    started = datetime.now(timezone.utc)
    result = _result(cfg, opts, started)
    error = UnknownError(why)
    result.verdict, result.exit_code = verdict_for(error, "", False)
    result.error = str(error)
    result.notes = ["The state of this host is not known: see the run's output. Whatever it left running there, "
                    "the workspace lock's holder kills and removes when this run's connection closes."]
    result.finished_at = started.isoformat(timespec="seconds")
    try:
        stem = report.reserve_stem(Path(opts.report_dir), result.host, started)
        report.write(result, Path(opts.report_dir), stem, opts.template)
    except (OSError, StepError) as e:
        result.notes.append(f"its report could not be written ({e})")
    return result


def _debug_traceback(opts: RunOptions) -> None:
    if opts.debug:
        import traceback
        traceback.print_exc(file=sys.stderr)


def guarded(fn: Callable[[], None], notes: list[str], what: str, secrets: list[str], opts: RunOptions) -> None:
    """Run `fn`; an unexpected exception there is noted in the report (`notes`, `secrets` redacted), never lost
    and never raised (a host's cleanup and judgement, a Slurm task's judgement)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        notes.append(f"{what} failed unexpectedly ({type(e).__name__}: {parse.redact(str(e), secrets)})")
        _debug_traceback(opts)


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
    if facts.device == "cuda" and cfg.gpus:          # the GPUs --gpus names: one suite each
        facts.gpus = [GpuInfo(index=i, name="(assumed)") for i in cfg.gpus]
    return facts


def describe_op(op, cfg: HostConfig, facts: Facts) -> list[str]:
    if isinstance(op, Run):
        return [f"$ {op.command}"] + ([f"    < stdin: {op.stdin_label}"] if op.stdin is not None else [])
    if isinstance(op, Rsync):
        shown = 20
        listing = [f"    EXCLUDES, written for this run ({len(op.excludes)} patterns, NUL-separated):",
                   *(f"      {pat}" for pat in op.excludes[:shown])]
        listing += [f"      ... {len(op.excludes) - shown} more"] if len(op.excludes) > shown else []
        if cfg.local:
            return ["(here) $ " + shlex.join(commands.rsync_argv(op.source, op.workspace, None, prepare=op.prepare,
                                                                 exclude_from="EXCLUDES")), *listing]
        argv = commands.rsync_argv(op.source, f"{TARGET_ALIAS}:{op.workspace}", "ssh -F SSH_CONFIG",
                                   prepare=op.prepare, exclude_from="EXCLUDES")
        return ["(here) $ " + shlex.join(argv), *listing, "    SSH_CONFIG, written for this run:",
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
        targets = step.targets(facts) if step.targets else [None]
        for t in targets:
            mine = dataclasses.replace(facts, target=t)
            lines.append(f"## {step.name}" + (f" on GPU {t.index} (at once with the others)"
                                              if t is not None and t.index is not None and len(targets) > 1 else ""))
            try:
                ops = step.plan(mine)
            except PipelineError as e:
                lines.append(f"would fail: {e}")
                continue
            lines += [x for op in ops for x in describe_op(op, cfg, mine)] or ["(nothing to run)"]
    return lines
