"""Everything SSH: known_hosts, the host-key policy, connecting (Fabric Connection over paramiko, through ProxyJump
hops), the exception map, rsync's ssh settings, and `SSHRemote` (commands through Fabric's runner).

Host keys are strict, as OpenSSH's StrictHostKeyChecking=yes: a key must be in known_hosts (the given files, or
~/.ssh/known_hosts + /etc/ssh/ssh_known_hosts; read by `pipeline.known_hosts`); an unknown key is refused unless
accept-new (then recorded in the first file); a changed key is always refused; a key marked `@revoked` is refused
even if listed.
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from fabric import Connection
from fabric.runners import Remote as FabricRemote
from paramiko import MissingHostKeyPolicy

from pipeline.errors import AuthenticationError, ConnectError, HostKeyError, UnreachableError
from pipeline.known_hosts import KnownHosts, fingerprint, load_known_hosts
from pipeline.remote import Cancel, FeedStdinAtOnce, LocalRemote, Remote
from pipeline.settings import HostConfig

KEEPALIVE_S = 15
CONNECT_BACKOFF_S = (1.0, 2.0)             # transient failures: tried again after 1 s, then 2 s (3 attempts)
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT}
TARGET_ALIAS = "flashcore-target"          # the names rsync's ssh knows the hosts by (its own config file)
HOP_ALIAS = "flashcore-hop-{}"


_append_lock = threading.Lock()


class _Policy(MissingHostKeyPolicy):
    """paramiko's MissingHostKeyPolicy: refuse (strict) or record (accept-new); a revoked key is always refused."""

    def __init__(self, known: KnownHosts, accept_new: bool):
        self.known, self.accept_new = known, accept_new

    def missing_host_key(self, client, hostname, key):
        self.known.refuse_if_revoked(hostname, key)
        if not self.accept_new:
            raise HostKeyError(f"{hostname}: unknown host key ({key.get_name()} {fingerprint(key)}), not in "
                               f"{' or '.join(self.known.files)}; refusing (pass --accept-new-host-key to "
                               "record it, or add it to known_hosts)")
        client.get_host_keys().add(hostname, key.get_name(), key)
        path = Path(self.known.files[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        with _append_lock, path.open("a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


# ------------------------------------------------------------------------------------------------- connect


def _where(user: str, address: str, port: int, via: str = "") -> str:
    return f"{user}@{address}:{port}" + (f" (via {via})" if via else "")


def _known_name(cfg: HostConfig) -> str:
    """The host as known_hosts names it."""
    return cfg.address if cfg.port == 22 else f"[{cfg.address}]:{cfg.port}"


def map_exception(e: BaseException, where: str, cfg: HostConfig, known: KnownHosts) -> ConnectError:
    """The exception map: whatever paramiko / sockets raise while connecting -> one ConnectError line."""
    from paramiko.ssh_exception import (AuthenticationException, BadHostKeyException, ChannelException,
                                        NoValidConnectionsError, SSHException)

    if isinstance(e, ConnectError):
        return e
    if isinstance(e, BadHostKeyException):
        try:
            known.refuse_if_revoked(where, e.key)
        except HostKeyError as revoked:
            return revoked
        return HostKeyError(f"{where}: host key CHANGED (server offers {fingerprint(e.key)}, known_hosts "
                            f"{known.files[0]} has another); refusing. If the host was rebuilt, remove the old "
                            f"entry: ssh-keygen -R '{_known_name(cfg)}' -f {known.files[0]}")
    if isinstance(e, AuthenticationException):
        keys = "key " + ", ".join(cfg.identities) if cfg.identities else "default keys/agent"
        return AuthenticationError(f"{where}: authentication failed ({keys}): {e}")
    if isinstance(e, NoValidConnectionsError):
        reasons = "; ".join(sorted({os.strerror(x.errno) if x.errno else str(x) for x in e.errors.values()}))
        transient = all(x.errno in _TRANSIENT_ERRNOS for x in e.errors.values())
        return UnreachableError(f"{where}: cannot connect ({reasons})", transient)
    if isinstance(e, (TimeoutError, socket.timeout)):
        return UnreachableError(f"{where}: connection timed out after {cfg.connect_timeout:g} s", True)
    if isinstance(e, socket.gaierror):
        return UnreachableError(f"{where}: cannot resolve the host name ({e.strerror})")
    if isinstance(e, ChannelException):
        return UnreachableError(f"{where}: the jump host could not open a channel to it ({e})", True)
    if isinstance(e, SSHException) and ("protocol banner" in str(e) or "No existing session" in str(e)):
        # TCP accepted, no SSH banner (or no finished handshake: paramiko's "No existing session") in time
        return UnreachableError(f"{where}: no SSH banner or handshake within {cfg.connect_timeout:g} s ({e})", True)
    if isinstance(e, (EOFError, ConnectionResetError, ConnectionAbortedError)):   # closed during the handshake
        return UnreachableError(f"{where}: the connection was reset ({type(e).__name__}: {e})", True)
    if isinstance(e, (SSHException, OSError)):
        return UnreachableError(f"{where}: SSH failed ({type(e).__name__}: {e})")
    return UnreachableError(f"{where}: {type(e).__name__}: {e}")


class _OpenedOnce(Connection):
    """Fabric's Connection, opened once. Fabric calls `open()` before every command and SFTP session and, when the
    transport has died, silently connects again: the next command would run on a new connection after the host's
    lock holder, seeing the old one close, removed the token, killed the run's process groups and released the
    lock. So once the connection has dropped, `open()` raises; only the runner's cleanup connects again, on purpose
    and once (`SSHRemote.reconnect`: a new Connection)."""

    def open(self):
        if self.transport is not None and not self.transport.active:
            raise UnreachableError(f"{self.user}@{self.host}:{self.port}: the SSH connection dropped (not "
                                   "reopened: the host's lock holder has cleaned up after it)")
        return super().open()


def _connection(address: str, port: int, user: str, identities: tuple[str, ...], cfg: HostConfig,
                known: KnownHosts, gateway=None):
    from fabric import Config
    from paramiko import SSHClient, SSHConfig

    client = SSHClient()
    known.into(client.get_host_keys())
    client.set_missing_host_key_policy(_Policy(known, cfg.accept_new_host_key))
    kwargs = {"banner_timeout": cfg.connect_timeout, "auth_timeout": cfg.connect_timeout,
              "look_for_keys": not identities, "allow_agent": not identities}
    if identities:
        kwargs["key_filename"] = list(identities)
    # settings.py has applied ssh_config already: Fabric must not read it again (an empty SSHConfig says so)
    conn = _OpenedOnce(host=address, user=user, port=port, connect_timeout=cfg.connect_timeout,
                       connect_kwargs=kwargs, gateway=gateway, config=Config(ssh_config=SSHConfig(), lazy=True))
    conn.client = client  # our host-key policy instead of Fabric's AutoAddPolicy
    return conn


def connect(cfg: HostConfig, cancel: Cancel, say: Callable[[str], None] | None = None) -> tuple[object, list]:
    """(the target's open Fabric Connection, the open hop Connections), or a ConnectError. A transient failure
    (refused, reset, timed out, no banner) is tried again after each CONNECT_BACKOFF_S delay; authentication and
    host-key failures never are. `cancel` cuts the wait short; `say` tells of each retry."""
    for attempt, delay in enumerate((*CONNECT_BACKOFF_S, None), start=1):
        try:
            return _connect_once(cfg)
        except UnreachableError as e:
            if delay is None or not e.transient:
                raise
            if say:
                say(f"{e}; attempt {attempt} of {len(CONNECT_BACKOFF_S) + 1}, again in {delay:g} s")
            if cancel.wait(delay):
                raise cancel.error("connect") from None
    raise AssertionError("unreachable")


def _connect_once(cfg: HostConfig) -> tuple[object, list]:
    known = load_known_hosts(cfg.known_hosts)
    hops, gateway, via = [], None, ""
    try:
        for hop in cfg.jumps:
            conn = _connection(hop.address, hop.port, hop.user, hop.identities or cfg.identities, cfg, known, gateway)
            where = _where(hop.user, hop.address, hop.port, via)
            _open(conn, where, cfg, known)
            hops.append(conn)
            gateway, via = conn, hop.spec()
        conn = _connection(cfg.address, cfg.port, cfg.user, cfg.identities, cfg, known, gateway)
        _open(conn, _where(cfg.user, cfg.address, cfg.port, via), cfg, known)
    except ConnectError:
        for h in reversed(hops):
            h.close()
        raise
    return conn, hops


def _open(conn, where: str, cfg: HostConfig, known: KnownHosts) -> None:
    try:
        conn.open()
    except Exception as e:  # noqa: BLE001 - every failure becomes one line (the exception map)
        conn.close()
        raise map_exception(e, where, cfg, known) from None
    conn.transport.set_keepalive(KEEPALIVE_S)


# ------------------------------------------------------------------------------------------ rsync's ssh


def _quote(value: str, tokens: bool = False) -> str:
    """An ssh_config argument: double-quoted, `"` and `\\` escaped (OpenSSH's argv_split), `%` doubled where
    the option expands %-tokens."""
    if tokens:
        value = value.replace("%", "%%")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _host_block(alias: str, address: str, port: int, user: str, identities: tuple[str, ...]) -> list[str]:
    lines = [f"Host {alias}", f"  HostName {address}", f"  Port {port}", f"  User {_quote(user)}"]
    lines += [f"  IdentityFile {_quote(k, tokens=True)}" for k in identities]
    if identities:
        lines.append("  IdentitiesOnly yes")
    return lines


def rsync_ssh_config(cfg: HostConfig) -> str:
    """An ssh_config file for rsync's ssh (`ssh -F FILE`): the same host, port, user, keys, known_hosts
    strictness and ProxyJump hops as the pipeline's own connection, and nothing from ~/.ssh/config (settings.py
    has applied it). Paths are quoted in the file, so spaces and quotes in them survive (on rsync's `-e` they
    would be split)."""
    lines: list[str] = []
    jump_aliases = [HOP_ALIAS.format(i) for i in range(len(cfg.jumps))]
    lines += _host_block(TARGET_ALIAS, cfg.address, cfg.port, cfg.user, cfg.identities)
    if jump_aliases:
        lines.append(f"  ProxyJump {','.join(jump_aliases)}")
    for alias, hop in zip(jump_aliases, cfg.jumps):
        lines += _host_block(alias, hop.address, hop.port, hop.user, hop.identities or cfg.identities)
    lines += ["Host *", "  BatchMode yes", "  StrictHostKeyChecking yes",
              "  UserKnownHostsFile " + " ".join(_quote(f, tokens=True) for f in cfg.known_hosts),
              "  GlobalKnownHostsFile /dev/null", f"  ConnectTimeout {max(1, int(cfg.connect_timeout))}",
              "  ServerAliveInterval 15", "  ServerAliveCountMax 4", "  LogLevel ERROR"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- SSHRemote


class _SSHRunner(FeedStdinAtOnce, FabricRemote):
    pass


class SSHRemote(Remote):
    """A host over SSH: commands through Fabric's Remote runner, files over SFTP or, on a host without an SFTP
    subsystem, over the exec channel (`cat` in, base64 out: what Ansible does there). One connection for the whole
    run: once it drops, every command and transfer raises UnreachableError (never a silent new connection:
    `_OpenedOnce`); the runner's cleanup then reconnects once, for the cleanup alone."""

    def __init__(self, cfg: HostConfig, cancel: Cancel | None = None, say: Callable[[str], None] | None = None):
        super().__init__(cancel)
        self.cfg, self.label, self.say = cfg, cfg.name or cfg.label, say
        self.conn, self.hops = connect(cfg, self.cancel, say)
        self._sftp_ok: bool | None = None
        self._ssh_dir: str | None = None

    def _runner(self):
        return _SSHRunner(context=self.conn, inline_env=True)

    def alive(self) -> bool:
        t = self.conn.transport
        return t is not None and t.is_active()

    @contextmanager
    def _dropped_as_unreachable(self, always: bool = False):
        """What paramiko raises when the connection is gone (or, `always`, any of its failures here), and
        `_OpenedOnce`'s refusal, as this host's UnreachableError."""
        from paramiko.ssh_exception import SSHException
        try:
            yield
        except UnreachableError:
            raise self._lost("the SSH connection dropped") from None
        except (SSHException, EOFError, OSError) as e:
            if not always and self.alive():
                raise
            raise self._lost(f"the SSH connection dropped ({type(e).__name__}: {e})") from None

    def _start(self, command, **kw):
        with self._dropped_as_unreachable(always=True):
            return super()._start(command, **kw)

    def _sftp(self):
        if self._sftp_ok is False:
            return None
        try:
            sftp = self.conn.sftp()
            self._sftp_ok = True
            return sftp
        except Exception as e:  # noqa: BLE001 - no SFTP subsystem: the exec channel does the transfers
            if not self.alive():
                raise self._lost("the SSH connection dropped") from None
            self._sftp_ok = False
            self.notes.append(f"The host offers no SFTP ({type(e).__name__}: {e}): files were transferred over "
                              "the exec channel (cat / base64).")
            return None

    def put(self, local_path, remote_path):
        sftp = self._sftp()
        if sftp is None:
            return super().put(local_path, remote_path)
        with self._dropped_as_unreachable():
            sftp.put(local_path, remote_path)

    def get(self, remote_path, local_path):
        sftp = self._sftp()
        if sftp is None:
            return super().get(remote_path, local_path)
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._dropped_as_unreachable():
                sftp.get(remote_path, local_path)
            return True
        except FileNotFoundError:
            Path(local_path).unlink(missing_ok=True)
            return False

    def rsync_target(self, workspace):
        with self._dropped_as_unreachable():
            self.conn.open()                   # rsync's own ssh must not start after this run's connection dropped
        if self._ssh_dir is None:
            self._ssh_dir = tempfile.mkdtemp(prefix="flashcore-ssh-", dir="/tmp")   # a path without spaces:
            Path(self._ssh_dir, "config").write_text(rsync_ssh_config(self.cfg))   # ssh -J passes it unquoted
        return f"{TARGET_ALIAS}:{workspace}", shlex.join(["ssh", "-F", f"{self._ssh_dir}/config"])

    def reconnect(self) -> SSHRemote:
        """A fresh connection with the same settings (after a dropped one), for the cleanup."""
        self.close()
        return SSHRemote(self.cfg, Cancel(), self.say)

    def close(self):
        for c in (self.conn, *reversed(self.hops)):
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        if self._ssh_dir:
            import shutil
            shutil.rmtree(self._ssh_dir, ignore_errors=True)
            self._ssh_dir = None


def open_remote(cfg: HostConfig, cancel: Cancel, say: Callable[[str], None] | None = None) -> Remote:
    """The host's Remote: this machine for --local, else an SSH connection (or a ConnectError)."""
    return LocalRemote(cancel) if cfg.local else SSHRemote(cfg, cancel, say)

