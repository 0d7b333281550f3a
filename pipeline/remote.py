"""The one I/O layer: a host reached over SSH (Fabric Connection / paramiko) or this machine (subprocess),
behind the same interface: run (timeout + streaming + stdin), put, get, put_bytes (through stdin), close.

Host keys are strict: known_hosts (the given file, or ~/.ssh/known_hosts + /etc/ssh/ssh_known_hosts); an
unknown key is refused unless accept_new (recorded, like OpenSSH's accept-new); a changed key is always refused.
"""

from __future__ import annotations

import codecs
import os
import select
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import commands
from pipeline.errors import AuthenticationError, HostKeyError, UnreachableError
from pipeline.inventory import HostConfig

OutputFn = Callable[[str], None]
KEEPALIVE_S = 15


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


class _Lines:
    """Incremental decoder that hands complete lines to a callback (the live stream)."""

    def __init__(self, fn: OutputFn | None):
        self.fn, self.buf, self.parts = fn, "", []
        self.dec = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> None:
        text = self.dec.decode(data)
        self.parts.append(text)
        if self.fn:
            self.buf += text
            *lines, self.buf = self.buf.split("\n")
            for line in lines:
                self.fn(line)

    def close(self) -> str:
        text = self.dec.decode(b"", final=True)
        self.parts.append(text)
        if self.fn and (self.buf + text):
            self.fn(self.buf + text)
        return "".join(self.parts)


class Remote:
    label: str = ""
    local: bool = False

    def run(self, command: str, *, timeout: float, stdin: bytes | None = None,
            on_output: OutputFn | None = None, pidfile: str | None = None) -> CommandResult:
        raise NotImplementedError

    def put(self, local_path: str, remote_path: str) -> None:
        raise NotImplementedError

    def get(self, remote_path: str, local_path: str) -> bool:
        raise NotImplementedError

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o600, timeout: float = 30) -> CommandResult:
        """Write `data` to `remote_path` through the command's stdin (never argv), created with `mode`."""
        return self.run(commands.write_stdin_to_file_command(remote_path, mode), timeout=timeout, stdin=data)

    def put_data(self, data: bytes, remote_path: str) -> None:
        raise NotImplementedError

    def rsync_target(self, workspace: str) -> tuple[str, str | None]:
        """(destination, ssh -e command or None) for a local rsync client."""
        raise NotImplementedError

    def rsync(self, argv: list[str], timeout: float) -> CommandResult:
        """Run the local rsync client (argv from `commands.rsync_argv`)."""
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return CommandResult(shlex.join(argv), 124, str(e.stdout or ""), str(e.stderr or ""),
                                 time.monotonic() - t0, True)
        return CommandResult(shlex.join(argv), p.returncode, p.stdout, p.stderr, time.monotonic() - t0)

    def close(self) -> None:
        pass

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- local backend


class LocalRemote(Remote):
    """This machine, through /bin/sh: the same commands the SSH backend runs, without SSH."""

    local = True

    def __init__(self, label: str = "local"):
        self.label = label

    def run(self, command, *, timeout, stdin=None, on_output=None, pidfile=None):
        t0 = time.monotonic()
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        out, err = _Lines(on_output), _Lines(on_output)
        readers = [threading.Thread(target=_pump, args=(proc.stdout, out), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, err), daemon=True)]
        for t in readers:
            t.start()
        try:
            if stdin:
                proc.stdin.write(stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = False
        try:
            proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill(proc, pidfile)
        except KeyboardInterrupt:
            self._kill(proc, pidfile)
            raise
        for t in readers:
            t.join(timeout=5)
        code = proc.returncode if proc.returncode is not None else -1
        return CommandResult(command, 124 if timed_out else code, out.close(), err.close(),
                             time.monotonic() - t0, timed_out)

    def _kill(self, proc: subprocess.Popen, pidfile: str | None) -> None:
        if pidfile:
            subprocess.run(["/bin/sh", "-c", commands.kill_group_command(pidfile, 1)], timeout=30)
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
        proc.wait()

    def put(self, local_path, remote_path):
        Path(remote_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, remote_path)

    def get(self, remote_path, local_path):
        if not Path(remote_path).is_file():
            return False
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote_path, local_path)
        return True

    def put_data(self, data, remote_path):
        Path(remote_path).parent.mkdir(parents=True, exist_ok=True)
        Path(remote_path).write_bytes(data)

    def rsync_target(self, workspace):
        return workspace, None


def _pump(stream, lines: _Lines) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        lines.feed(chunk)


# ------------------------------------------------------------------------------------------------ SSH backend


class _AcceptNew:
    """paramiko policy: record an unknown host key in the known_hosts file (OpenSSH's accept-new)."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class _Strict:
    def __init__(self, where: str):
        self.where = where

    def missing_host_key(self, client, hostname, key):
        raise HostKeyError(f"{hostname}: unknown host key ({key.get_name()} {_fingerprint(key)}), not in "
                           f"{self.where}; refusing (pass --accept-new-host-key to record it, or add it to "
                           "known_hosts)")


def _fingerprint(key) -> str:
    import base64
    import hashlib
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class SSHRemote(Remote):
    def __init__(self, cfg: HostConfig, connection):
        self.cfg, self.conn = cfg, connection
        self.label = cfg.label

    @classmethod
    def connect(cls, cfg: HostConfig) -> SSHRemote:
        return cls(cfg, _open_connection(cfg))

    def _transport(self):
        t = self.conn.transport
        if t is None or not t.is_active():
            raise UnreachableError(f"{self.label}: the SSH connection dropped")
        return t

    def run(self, command, *, timeout, stdin=None, on_output=None, pidfile=None):
        from paramiko.ssh_exception import SSHException

        t0 = time.monotonic()
        deadline = t0 + timeout
        out, err = _Lines(on_output), _Lines(on_output)
        timed_out = False
        chan = None
        try:
            chan = self._transport().open_session(timeout=self.cfg.connect_timeout)
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            while True:
                # short waits: paramiko's channel fd does not wake select() for an exit status without data
                select.select([chan], [], [], 0.01 if time.monotonic() - t0 < 2 else 0.1)
                while chan.recv_ready():
                    out.feed(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.feed(chan.recv_stderr(65536))
                if (chan.exit_status_ready() and chan.eof_received and not chan.recv_ready()
                        and not chan.recv_stderr_ready()):
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                self._transport()
            code = 124 if timed_out else chan.recv_exit_status()
        except KeyboardInterrupt:
            self._abort(chan, pidfile)
            raise
        except (SSHException, EOFError, OSError, UnreachableError) as e:
            if pidfile:  # the command may still run on the host: kill its group through a fresh connection
                self._abort(None, pidfile)
            raise UnreachableError(f"{self.label}: the SSH connection dropped ({type(e).__name__}: {e})") from e
        if timed_out:
            self._abort(chan, pidfile)
        else:
            chan.close()
        return CommandResult(command, code, out.close(), err.close(), time.monotonic() - t0, timed_out)

    def _abort(self, chan, pidfile: str | None) -> None:
        """Close the channel and kill the remote process group over a NEW channel (new connection if needed)."""
        if chan is not None:
            chan.close()
        if not pidfile:
            return
        kill = commands.kill_group_command(pidfile)
        try:
            self.run(kill, timeout=20)
            return
        except Exception:  # noqa: BLE001 - the old transport is unusable: try a fresh connection
            pass
        try:
            fresh = SSHRemote.connect(self.cfg)
            try:
                fresh.run(kill, timeout=20)
            finally:
                fresh.close()
        except Exception:  # noqa: BLE001 - best effort; the remote `timeout` still ends it
            pass

    def _sftp(self):
        try:
            return self.conn.sftp()
        except Exception as e:  # noqa: BLE001
            raise UnreachableError(f"{self.label}: SFTP unavailable ({e})") from e

    def put(self, local_path, remote_path):
        self._sftp().put(local_path, remote_path)

    def put_data(self, data, remote_path):
        import io
        self._sftp().putfo(io.BytesIO(data), remote_path)

    def get(self, remote_path, local_path):
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._sftp().get(remote_path, local_path)
            return True
        except FileNotFoundError:
            Path(local_path).unlink(missing_ok=True)
            return False
        except OSError as e:
            if getattr(e, "errno", None) == 2:
                Path(local_path).unlink(missing_ok=True)
                return False
            raise

    def rsync_target(self, workspace):
        cfg = self.cfg
        ssh = commands.ssh_command_for_rsync(
            cfg.port, _expand(cfg.identity), str(_known_hosts_path(cfg)) if cfg.known_hosts else None,
            cfg.connect_timeout)
        return commands.rsync_dest(cfg.user, cfg.address, workspace), ssh

    def close(self):
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


def _expand(path: str | None) -> str | None:
    return os.path.expanduser(path) if path else None


def _known_hosts_path(cfg: HostConfig) -> Path:
    return Path(os.path.expanduser(cfg.known_hosts or "~/.ssh/known_hosts"))


def _open_connection(cfg: HostConfig):
    from fabric import Connection
    from paramiko import SSHClient
    from paramiko.ssh_exception import (AuthenticationException, BadHostKeyException, NoValidConnectionsError,
                                        SSHException)

    client = SSHClient()
    kh = _known_hosts_path(cfg)
    if cfg.known_hosts:
        if kh.exists():
            client.load_host_keys(str(kh))
        elif not cfg.accept_new_host_key:
            raise HostKeyError(f"{cfg.label}: known_hosts file {kh} does not exist (strict host keys; "
                               "--accept-new-host-key creates it)")
    else:
        for system in (kh, Path("/etc/ssh/ssh_known_hosts")):
            if system.is_file():
                client.load_system_host_keys(str(system))
    client.set_missing_host_key_policy(_AcceptNew(kh) if cfg.accept_new_host_key else _Strict(str(kh)))
    identity = _expand(cfg.identity)
    if identity and not Path(identity).is_file():
        raise AuthenticationError(f"{cfg.label}: identity file {cfg.identity} not found")
    kwargs = {"banner_timeout": cfg.connect_timeout, "auth_timeout": cfg.connect_timeout,
              "look_for_keys": identity is None, "allow_agent": identity is None}
    if identity:
        kwargs["key_filename"] = [identity]
    conn = Connection(host=cfg.address, user=cfg.user, port=cfg.port, connect_timeout=cfg.connect_timeout,
                      connect_kwargs=kwargs)
    conn.client = client  # our host-key policy instead of Fabric's AutoAddPolicy
    where = f"{cfg.user}@{cfg.address}:{cfg.port}"
    try:
        conn.open()
    except HostKeyError:
        raise
    except BadHostKeyException as e:
        raise HostKeyError(f"{where}: host key CHANGED (server offers {_fingerprint(e.key)}, known_hosts {kh} "
                           "has another); refusing. If the host was rebuilt, remove the old entry: "
                           f"ssh-keygen -R '[{cfg.address}]:{cfg.port}' -f {kh}") from None
    except AuthenticationException as e:
        raise AuthenticationError(f"{where}: authentication failed "
                                  f"({'key ' + cfg.identity if cfg.identity else 'default keys/agent'}): {e}") from None
    except NoValidConnectionsError as e:
        reasons = "; ".join(sorted({os.strerror(x.errno) if x.errno else str(x) for x in e.errors.values()}))
        raise UnreachableError(f"{where}: cannot connect ({reasons})") from None
    except (TimeoutError, socket.timeout):
        raise UnreachableError(f"{where}: connection timed out after {cfg.connect_timeout:g} s") from None
    except socket.gaierror as e:
        raise UnreachableError(f"{where}: cannot resolve {cfg.address} ({e.strerror})") from None
    except (SSHException, EOFError, OSError) as e:
        raise UnreachableError(f"{where}: SSH failed ({type(e).__name__}: {e})") from None
    conn.transport.set_keepalive(KEEPALIVE_S)
    return conn


def connect(cfg: HostConfig) -> Remote:
    return LocalRemote() if cfg.local else SSHRemote.connect(cfg)
