"""The one I/O layer for commands: a host over SSH (`pipeline.ssh.SSHRemote`) or this machine (`LocalRemote`),
behind one interface: run (timeout, live output, stdin, cancellation), hold (a command that keeps running: the
workspace lock), put/get (SFTP, or the exec channel where a host has none), kill_group, close.

Commands run through invoke's runners (`invoke.runners.Local`, Fabric's `Remote`): they own the threads, the
streams, `warn`/`hide` and the timeout. What they lack is written here, and only that:
- stdin fed at once: invoke's stdin pump reads one character per 10 ms (it is built for an interactive
  terminal); a 7 KB script would take over a minute, so a script or a token is written in one go and closed;
- cancellation: a run observes its `Cancel` (set by the CLI's signal handler) while a command runs;
- the process-group kill: closing the channel (invoke's `kill`) leaves the remote command running, so a long
  command runs as its own process group whose id is in a pidfile, and a NEW command kills that group.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from invoke.exceptions import CommandTimedOut, Failure, ThreadException
from invoke.runners import Local

from pipeline import commands, parse
from pipeline.errors import Interrupted, PipelineError, StepError, UnreachableError, WallTimeout

OutputFn = Callable[[str], None]
POLL_S = 0.05


@dataclass
class CommandResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def output(self) -> str:
        return self.stdout + (("\n" + self.stderr) if self.stderr.strip() else "")


class Cancel:
    """Set once by the CLI's signal handler (SIGINT, SIGTERM, SIGHUP); every active run observes it.

    A fleet gives each host a `child()`: the parent's signal reaches every child, and `expire()` stops one host
    alone (its wall limit) with a WallTimeout instead of an interruption."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0
        self.reason = ""                      # set by expire(): why this run was stopped without a signal
        self._children: list[Cancel] = []
        self._lock = threading.Lock()

    def set(self, signum: int) -> None:
        with self._lock:
            if not self.event.is_set():
                self.signum = signum
                self.event.set()
            children = list(self._children)
        for c in children:
            c.set(signum)

    def expire(self, reason: str) -> None:
        with self._lock:
            if not self.event.is_set():
                self.reason = reason
                self.event.set()

    def child(self) -> Cancel:
        c = Cancel()
        with self._lock:
            self._children.append(c)
            signum = self.signum if self.event.is_set() else 0
        if signum:
            c.set(signum)
        return c

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)

    def error(self, where: str) -> PipelineError:
        from pipeline.errors import signal_name
        if self.reason and not self.signum:
            return WallTimeout(f"{self.reason}; stopped during {where}")
        return Interrupted(f"interrupted ({signal_name(self.signum)}) during {where}", self.signum)


class _Lines:
    """invoke's out_stream: hands complete lines to a callback (the live stream) as they arrive."""

    def __init__(self, fn: OutputFn | None):
        self.fn, self.buf = fn, ""

    def write(self, text: str) -> None:
        if self.fn:
            self.buf += text
            *lines, self.buf = self.buf.split("\n")
            for line in lines:
                self.fn(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fn and self.buf:
            self.fn(self.buf)
        self.buf = ""


class FeedStdinAtOnce:
    """Mixed into invoke's runners: the whole of `in_stream` (bytes) is written at once, then stdin is closed."""

    def handle_stdin(self, input_, output, echo=False):
        data = input_.read()
        if data:
            self._write_proc_stdin(data)
        self.close_proc_stdin()


class _LocalRunner(FeedStdinAtOnce, Local):
    """invoke's Local runner, each command in a session of its own: `kill` ends the whole command (invoke's
    kills only the shell, leaving its children holding the pipes open)."""

    def start(self, command: str, shell: str, env: dict) -> None:
        self.process = subprocess.Popen(command, shell=True, executable=shell, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.PIPE, start_new_session=True)

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _write_proc_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.process.stdin.fileno(), view):]
        except BrokenPipeError:
            pass


class Held:
    """A command kept running (the lock holder): `first` is its first marker line; `release()` ends it."""

    def __init__(self, runner, promise, lines: list[str]):
        self.runner, self.promise, self.lines = runner, promise, lines

    @property
    def running(self) -> bool:
        return not self.runner.process_is_finished

    def release(self, wait_s: float = 15) -> None:
        """Close its stdin (the holder then cleans up and exits, releasing the lock); kill it if it lingers."""
        try:
            self.runner.close_proc_stdin()
        except Exception:  # noqa: BLE001 - a dead connection: nothing to close
            pass
        deadline = time.monotonic() + wait_s
        while not self.runner.process_is_finished and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if not self.runner.process_is_finished:
            self.runner.kill()
        _join_quietly(self.promise)


class Remote:
    """Shared by both backends: the run loop over an invoke runner, holds, exec-channel transfers, group kill."""

    label = ""
    local = False

    def __init__(self, cancel: Cancel | None = None):
        self.cancel = cancel or Cancel()
        self.notes: list[str] = []            # what the backend had to work around (no SFTP ...)

    # -- backend hooks
    def _runner(self):
        raise NotImplementedError

    def _shell(self) -> dict:
        return {}

    def alive(self) -> bool:
        return True

    # -- commands
    def _start(self, command: str, *, timeout: float | None, stdin: bytes | None, keep_stdin: bool,
               on_output: OutputFn | None):
        runner = self._runner()
        out, err = _Lines(on_output), _Lines(on_output)
        promise = runner.run(command, asynchronous=True, hide=False, warn=True, pty=False, echo=False,
                             encoding="utf-8", timeout=timeout, out_stream=out, err_stream=err,
                             in_stream=False if keep_stdin else io.BytesIO(stdin or b""), **self._shell())
        return runner, promise, (out, err)

    def run(self, command: str, *, timeout: float, stdin: bytes | None = None, on_output: OutputFn | None = None,
            pidfile: str | None = None) -> CommandResult:
        """Run `command` to its end (or its timeout, or a cancellation). A command with a `pidfile` runs as its
        own process group (`commands.in_group`), which is killed over a new command when it must stop early."""
        if self.cancel.is_set():
            raise self.cancel.error("a command")
        t0 = time.monotonic()
        runner, promise, streams = self._start(command, timeout=timeout, stdin=stdin, keep_stdin=False,
                                               on_output=on_output)
        try:
            while not (runner.process_is_finished or runner.has_dead_threads):
                if self.cancel.wait(POLL_S):
                    self._stop(runner, promise, pidfile)
                    raise self.cancel.error("a command")
        except KeyboardInterrupt:          # no signal handler installed (a library caller): stop it all the same
            self._stop(runner, promise, pidfile)
            raise
        timed_out = False
        try:
            res = promise.join()
        except CommandTimedOut as e:
            res, timed_out = e.result, True
            self.kill_group(pidfile)
        except (ThreadException, Failure) as e:
            raise self._lost(f"command failed on our side ({type(e).__name__})") from None
        for s in streams:
            s.close()
        if not timed_out and res.exited == -1 and not self.alive():
            raise self._lost("the SSH connection dropped")
        return CommandResult(command, 124 if timed_out else res.exited, res.stdout, res.stderr,
                             time.monotonic() - t0, timed_out)

    def _stop(self, runner, promise, pidfile: str | None) -> None:
        """A command that must end now: its channel (or local session) closed, its process group killed."""
        runner.kill()
        try:
            self.kill_group(pidfile)
        except UnreachableError:           # the connection is gone too: the run's cleanup reconnects for it
            pass
        _join_quietly(promise)

    def _lost(self, why: str) -> UnreachableError:
        return UnreachableError(f"{self.label}: {why}")

    def hold(self, command: str, timeout: float) -> tuple[Held | None, list[str]]:
        """Start `command` with stdin left open and wait for its first `@@` marker line. Returns (the running
        command, its lines) when it is still running, else (None, its lines)."""
        lines: list[str] = []
        runner, promise, _ = self._start(command, timeout=None, stdin=None, keep_stdin=True, on_output=lines.append)
        deadline = time.monotonic() + timeout
        while not any(x.startswith("@@") for x in lines) and not runner.process_is_finished:
            if self.cancel.wait(POLL_S) or time.monotonic() > deadline:
                Held(runner, promise, lines).release(wait_s=0)
                if self.cancel.is_set():
                    raise self.cancel.error("the workspace lock")
                raise StepError(f"the lock command gave no answer within {timeout:g} s: {' '.join(lines)[-300:]}")
        if runner.process_is_finished:
            _join_quietly(promise)
            return None, lines
        return Held(runner, promise, lines), lines

    def kill_group(self, pidfile: str | None) -> None:
        """Kill the process group recorded in `pidfile` (TERM, then KILL) through a new command."""
        if not pidfile:
            return
        runner, promise, _ = self._start(commands.kill_group_command(pidfile), timeout=30, stdin=None,
                                         keep_stdin=False, on_output=None)
        _join_quietly(promise)

    # -- files
    def put(self, local_path: str, remote_path: str) -> None:
        self.put_bytes(Path(local_path).read_bytes(), remote_path)

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        """Over the exec channel: the bytes go through a command's stdin (never argv)."""
        res = self.run(commands.write_stdin_to_file_command(remote_path, mode), timeout=600, stdin=data)
        if not res.ok:
            raise StepError(f"cannot write {remote_path} on the host: {parse.brief(res.output)}")

    def get(self, remote_path: str, local_path: str) -> bool:
        """Over the exec channel: base64 of the file (binary-safe through a text stream). False: no such file."""
        res = self.run(commands.read_base64_command(remote_path), timeout=600)
        if res.exit_code == 3:
            return False
        if not res.ok:
            raise StepError(f"cannot read {remote_path} from the host: {parse.brief(res.output)}")
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        Path(local_path).write_bytes(base64.b64decode("".join(res.stdout.split())))
        return True

    def rsync_target(self, workspace: str) -> tuple[str, str | None]:
        """(destination, `-e` ssh command or None) for a local rsync client."""
        raise NotImplementedError

    def reconnect(self) -> Remote:
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _join_quietly(promise) -> None:
    try:
        promise.join()
    except Exception:  # noqa: BLE001 - a killed command's result is of no interest
        pass


class LocalRemote(Remote):
    """This machine, through /bin/sh and invoke's Local runner: the same commands the SSH backend runs."""

    local = True

    def __init__(self, cancel: Cancel | None = None, label: str = "local"):
        super().__init__(cancel)
        self.label = label

    def _runner(self):
        from invoke import Config, Context
        return _LocalRunner(Context(config=Config(lazy=True)))

    def _shell(self) -> dict:
        return {"shell": "/bin/sh"}

    def put(self, local_path, remote_path):
        Path(remote_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, remote_path)

    def get(self, remote_path, local_path):
        if not Path(remote_path).is_file():
            return False
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote_path, local_path)
        return True

    def rsync_target(self, workspace):
        return workspace, None
