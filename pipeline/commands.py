"""Pure builders of the shell commands the steps run (no I/O here: every function returns a string or argv).

Remote layout under the workspace WS (absolute, resolved from the probe's $HOME):
    WS/                 the synced code (flashcore, tests, pyproject ...), imported from here via PYTHONPATH
    WS/.venv/           the --system-site-packages venv built on the host's python (+ a .pth naming its site)
    WS/.flashcore/      runtime files: lock (+ lock.owner), hf_token (0600), results/ (parity.json, junit.xml,
                        suite.log; on a GPU host one folder per GPU: results/gpu0/ ...), *.pid (the process group
                        of a running install, token check or suite; suite-gpu0.pid ... one per GPU)
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
from collections.abc import Mapping, Sequence

q = shlex.quote

# Root-anchored (leading "/") or any depth; a trailing "/" matches directories only (rsync semantics). Excluded
# paths in the workspace are also kept from rsync's --delete: the venv, runtime files, Slurm jobs' folders (slurm/).
SYNC_EXCLUDES = (
    "/.git", "/.venv/", "/venv/", "/reports/", "/.gpuhost/", "/.tmp/", "/.whl/", "/build/", "/dist/",
    "/.flashcore/", "/slurm/", "/.benchmarks/", "__pycache__/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/",
    "*.egg-info/", "*.pyc", "*.pyo", ".DS_Store",
)
GPU_QUERY_FIELDS = (
    "index", "name", "uuid", "compute_cap", "memory.total", "memory.used", "driver_version",
    "ecc.errors.uncorrected.volatile.total", "mig.mode.current",
)
APP_QUERY_FIELDS = ("gpu_uuid", "pid", "process_name", "used_memory")
PROBE_TOOLS = ("rsync", "timeout", "setsid", "tar", "flock", "base64", "nvidia-smi")
RESULT_MARKER = "@@result "
SUITE_TEST = "tests/parity/test_parity_suite.py"


class Excludes:
    """Exclude patterns compiled once, matched as rsync matches them: an anchored pattern ("/a/b") matches the
    whole path from the synced root, its `*` and `?` never crossing a "/"; any other matches the last name at any
    depth (no "**", no unanchored "a/b": none is used); a trailing "/" matches directories only. Anchored patterns
    without wildcard characters (git's ignored paths, by the thousand in some checkouts) are one set lookup."""

    def __init__(self, patterns: Sequence[str]):
        self.literal: dict[str, bool] = {}            # path -> directories only
        self.globs: list[tuple[list[str] | None, str, bool]] = []   # (anchored parts or None, name glob, dir only)
        for pat in patterns:
            dir_only, p = pat.endswith("/"), pat.rstrip("/")
            if p.startswith("/") and not any(c in p for c in "*?["):
                self.literal[p[1:]] = self.literal.get(p[1:], True) and dir_only
            else:
                self.globs.append((p[1:].split("/") if p.startswith("/") else None, p, dir_only))

    def __call__(self, relpath: str, is_dir: bool) -> bool:
        rel = relpath.strip("/")
        if rel in self.literal and (is_dir or not self.literal[rel]):
            return True
        parts = rel.split("/")
        for want, glob, dir_only in self.globs:
            if dir_only and not is_dir:
                continue
            if want is None:
                if fnmatch.fnmatchcase(parts[-1], glob):
                    return True
            elif len(want) == len(parts) and all(map(fnmatch.fnmatchcase, parts, want)):
                return True
        return False


def anchored_pattern(relpath: str) -> str:
    """A path relative to the synced root (a trailing "/": a directory) as an anchored exclude pattern that means
    that path alone to rsync and to `Excludes`: wildcard characters in names become one-character classes
    (`[*]`), which both read as the character itself; a backslash beside them (rsync would take it as an escape)
    becomes `?`, which matches it and any other one character of a name."""
    if any(c in relpath for c in "*?["):
        relpath = "".join(f"[{c}]" if c in "*?[" else "?" if c == "\\" else c for c in relpath)
    return "/" + relpath


def expand_home(path: str, home: str) -> str:
    """`~` / `~/x` -> absolute, given the remote $HOME; relative paths are taken from $HOME too."""
    if path == "~":
        return home
    if path.startswith("~/"):
        return f"{home.rstrip('/')}/{path[2:]}"
    if not path.startswith("/"):
        return f"{home.rstrip('/')}/{path}"
    return path


def layout(workspace: str) -> dict[str, str]:
    ws = workspace.rstrip("/") or "/"
    rt = f"{ws}/.flashcore"
    return {
        "workspace": ws, "venv": f"{ws}/.venv", "venv_python": f"{ws}/.venv/bin/python",
        "runtime": rt, "results": f"{rt}/results", "token": f"{rt}/hf_token",
        "lock": f"{rt}/lock", "lock_owner": f"{rt}/lock.owner",
        "install_pid": f"{rt}/install.pid", "token_pid": f"{rt}/token.pid", "suite_pid": f"{rt}/suite.pid",
        "sync_hash": f"{rt}/sync-hash", "wheelhouse": f"{rt}/wheelhouse", "upload": f"{rt}/upload.tar.gz",
    }


def suite_paths(lay: dict[str, str], tag: str = "") -> tuple[str, str]:
    """(results folder, pidfile) of one suite process: `tag` "" = the one suite of a host without GPU (the
    folder and pidfile of old), "gpu0" ... = one GPU's."""
    if not tag:
        return lay["results"], lay["suite_pid"]
    return f"{lay['results']}/{tag}", f"{lay['runtime']}/suite-{tag}.pid"


def workspace_shell(workspace: str) -> str:
    """The workspace as a shell word that the remote shell resolves: `~/x` and `x` are taken from $HOME."""
    if workspace == "~":
        return '"$HOME"'
    if workspace.startswith("~/"):
        workspace = workspace[2:]
    return q(workspace) if workspace.startswith("/") else f'"$HOME"/{q(workspace)}'


def probe_command(python: str, workspace: str) -> str:
    """One round trip: who/where we are, which tools exist, whether the chosen python runs, and what the
    workspace already holds (the tar path's recorded hash, the pushed wheels with their sizes)."""
    lines = ['echo "home=$HOME"', 'echo "user=$(id -un)"', 'echo "os=$(uname -srm)"', 'echo "hostname=$(hostname)"']
    lines += [f'echo "tool.{t}=$(command -v {t} 2>/dev/null)"' for t in PROBE_TOOLS]
    lines.append(f'echo "python_path=$(command -v {q(python)} 2>/dev/null)"')
    lines.append(f"echo \"python_version=$({q(python)} -c 'import sys; print(sys.version.split()[0])' 2>&1 | head -n 1)\"")
    lines.append(f"ws={workspace_shell(workspace)}")
    lines.append('echo "sync_hash=$(cat "$ws/.flashcore/sync-hash" 2>/dev/null)"')
    lines.append('for f in "$ws"/.flashcore/wheelhouse/*.whl; do [ -f "$f" ] && echo "wheel.${f##*/}=$(wc -c < "$f")"; done')
    return "; ".join(lines) + "; true"


def gpu_query_command() -> str:
    """nvidia-smi, one round trip: per-GPU facts, processes on them, and the header line with CUDA's version."""
    gpu = f"nvidia-smi --query-gpu={','.join(GPU_QUERY_FIELDS)} --format=csv,noheader,nounits"
    apps = f"nvidia-smi --query-compute-apps={','.join(APP_QUERY_FIELDS)} --format=csv,noheader,nounits"
    return ("command -v nvidia-smi >/dev/null 2>&1 || { echo '@@no-nvidia-smi'; exit 0; }; "
            f"echo '@@gpus'; {gpu} 2>&1; echo \"@@rc=$?\"; echo '@@apps'; {apps} 2>&1; "
            "echo '@@header'; nvidia-smi 2>&1 | head -n 4")


def rsync_argv(src_dir: str, dest: str, ssh_command: str | None,
               excludes: Sequence[str] = SYNC_EXCLUDES, prepare: str | None = None,
               exclude_from: str | None = None) -> list[str]:
    """Local argv. `dest` is `user@host:/abs/ws` (remote) or a local path (--local); excluded paths on the
    destination (the venv, runtime files) are protected from --delete. `prepare`: a remote shell command run
    first in the same SSH session (`--rsync-path`), saving a round trip. `exclude_from`: a file that holds
    `excludes` (`exclude_file_bytes`) instead of one argument each: a checkout's git-ignored paths can number
    thousands, past the kernel's 128 KiB limit on the one `sh -c` argument the command travels in."""
    argv = ["rsync", "-rlt", "--delete", "--stats", "--itemize-changes"]
    if ssh_command:
        argv += ["-z", "-e", ssh_command]
        if prepare:
            argv += [f"--rsync-path={prepare} && rsync"]
    if exclude_from:
        argv += ["--from0", f"--exclude-from={exclude_from}"]
    else:
        argv += [f"--exclude={pat}" for pat in excludes]
    return argv + [src_dir.rstrip("/") + "/", dest.rstrip("/") + "/"]


def exclude_file_bytes(excludes: Sequence[str]) -> bytes:
    """The rsync exclude file of `rsync_argv(exclude_from=...)`: NUL-terminated patterns (`--from0`), so a path
    with a line break stays one pattern."""
    return b"".join(os.fsencode(pat) + b"\0" for pat in excludes)


def read_base64_command(path: str) -> str:
    """A file as base64 (binary-safe through a text stream; the no-SFTP fallback of `get`); exit 3: no file."""
    return f"[ -f {q(path)} ] || exit 3; base64 < {q(path)}"


def write_stdin_to_file_command(path: str, mode: int = 0o600) -> str:
    """Write stdin to `path`, created with `mode` (umask first: never world-readable, not even for a moment)."""
    parent = path.rsplit("/", 1)[0] or "/"
    return (f"umask 077 && mkdir -p {q(parent)} && rm -f {q(path)} && cat > {q(path)} && "
            f"chmod {mode:o} {q(path)}")


def untar_command(archive: str, workspace: str, hash_file: str, content_hash: str) -> str:
    """Unpack the tarball into the workspace. Files the previous tarball brought (its manifest) are removed
    first, so files deleted here disappear there too (what rsync --delete does on the rsync path)."""
    rt = hash_file.rsplit("/", 1)[0]
    manifest = f"{rt}/manifest"
    return (f"mkdir -p {q(workspace)} {q(rt)} && cd {q(workspace)} && "
            f"{{ [ ! -f {q(manifest)} ] || tr '\\n' '\\0' < {q(manifest)} | xargs -0 rm -f 2>/dev/null || true; }} && "
            f"tar -xzf {q(archive)} -C {q(workspace)} && tar -tzf {q(archive)} > {q(manifest)} && "
            f"rm -f {q(archive)} && printf %s {q(content_hash)} > {q(hash_file)}")


def rsync_prepare_command(runtime_dir: str, hash_file: str) -> str:
    """Before rsync: the workspace's runtime dir exists, and the tar path's recorded hash is dropped (rsync is
    about to change the tree, so that hash would no longer describe it)."""
    return f"mkdir -p {q(runtime_dir)} && rm -f {q(hash_file)}"


def python_script_command(python: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    """Run a Python script fed on stdin (`python - ARGS`): no quoting of code, nothing left on the remote disk."""
    return _env_prefix(env) + shlex.join([python, "-", *args])


def install_command(python: str, spec: dict) -> str:
    return python_script_command(python, [json.dumps(spec, sort_keys=True)])


def _env_prefix(env: Mapping[str, str] | None) -> str:
    if not env:
        return ""
    return "env " + " ".join(f"{k}={q(v)}" for k, v in sorted(env.items())) + " "


def pythonpath_env(workspace: str, extra: str = "") -> str:
    """Shell fragment: the workspace first on PYTHONPATH, then `extra` (the inventory's env), then what the
    host already has there."""
    head = workspace + (":" + extra if extra else "")
    return f'PYTHONPATH={q(head)}"${{PYTHONPATH:+:$PYTHONPATH}}"'


def pytest_argv(python: str, model: str, json_path: str, junit_path: str, device: str | None,
                seed: int | None = None) -> list[str]:
    argv = [python, "-m", "pytest", SUITE_TEST, "--parity-model", model, "--parity-json", json_path,
            "--junitxml", junit_path, "-p", "no:cacheprovider", "-q", "-rA"]
    if device:
        argv += ["--parity-device", device]
    if seed is not None:
        argv += ["--parity-seed", str(seed)]
    return argv


def in_group(command: str, pidfile: str) -> str:
    """`command` as its own session and process group whose id is written to `pidfile` (removed when it ends),
    so that a later command can kill the whole group (`kill_group_command`): closing the SSH channel does not
    stop a remote command. stdin passes through; the exit status is the command's."""
    body = f"echo $$ > {q(pidfile)}; {command}"
    return f"setsid -w sh -c {q(body)}; rc=$?; rm -f {q(pidfile)}; exit $rc"


def suite_command(workspace: str, inner: str, timeout_s: float, kill_after_s: float,
                  env: Mapping[str, str] | None = None, tag: str = "") -> str:
    """Run `inner` (a shell command) in the workspace with a remote deadline, as its own process group.

    The group's leader `exec`s `timeout`, whose pid is the group id in suite.pid; at the deadline `timeout`
    sends TERM to the whole group (then KILL after `kill_after_s`), so nothing is orphaned. The pipeline's local
    deadline, a little later, kills the same group over a new channel (`kill_group_command`). Output goes to the
    channel (streamed live) and to results/suite.log; the exit status is the suite's (124/137: timed out).
    `tag` (gpu0 ...): one GPU's suite, with its own results folder and pidfile (`suite_paths`).
    """
    rd, pidfile = suite_paths(layout(workspace), tag)
    env = dict(env or {})
    extra_path = env.pop("PYTHONPATH", "")
    envs = " ".join(f"{k}={q(v)}" for k, v in sorted(env.items()))
    body = (f"cd {q(workspace)} && exec env {pythonpath_env(workspace, extra_path)} PYTHONUNBUFFERED=1 "
            f"{envs} timeout --signal=TERM --kill-after={int(kill_after_s)} {int(max(1, timeout_s))} sh -c {q(inner)}")
    return (f"mkdir -p {q(rd)} && rm -f {q(rd)}/parity.json {q(rd)}/junit.xml {q(rd)}/suite.rc && "
            f"( ( {in_group(body, pidfile)} ); echo $? > {q(rd)}/suite.rc ) 2>&1 | tee {q(rd)}/suite.log; "
            f"exit \"$(cat {q(rd)}/suite.rc 2>/dev/null || echo 255)\"")


# A shell function: kill the process group recorded in the pidfile $1 (TERM, up to 2 s to go, then KILL).
# `kill -SIG -PGID` without `--`: dash's builtin kill rejects `--`.
_KG = ('kg() { pg=$(cat "$1" 2>/dev/null); [ -n "$pg" ] || return 0; kill -TERM -"$pg" 2>/dev/null; i=0; '
       'while kill -0 -"$pg" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done; '
       'kill -KILL -"$pg" 2>/dev/null; rm -f "$1"; }')


def kill_group_command(*pidfiles: str) -> str:
    """Kill the process groups recorded in `pidfiles` (each: TERM, up to 2 s for it to go, then KILL)."""
    return "; ".join([_KG, *(f"kg {q(p)}" for p in pidfiles), "true"])


def cleanup_command(files: Sequence[str], pidfiles: Sequence[str]) -> str:
    """The end of every run, one round trip: remove what must not stay (the token, first), kill what may run."""
    return (("rm -f " + " ".join(q(f) for f in files) + "; ") if files else "") + kill_group_command(*pidfiles)


LOCK_WAITING_EXIT = 75


def lock_command(lay: dict[str, str], owner: str) -> str:
    """Hold the workspace lock (flock on WS/.flashcore/lock) for as long as this command's stdin stays open.

    Prints `@@busy <owner>` and exits 75 when another run holds it, else kills what a dead run left behind
    (its process groups, WS/.flashcore/*.pid: nothing else can be running them, since the lock was free), records
    `owner`, prints `@@locked flock=yes|no stale=<pidfiles>`, then waits for stdin to close: that is the end of the
    run, or of its connection. Then it removes the token file and kills this workspace's process groups: a
    host-side watchdog that cleans up even when the pipeline cannot reconnect after a dropped connection."""
    rt, who = lay["runtime"], lay["lock_owner"]
    every = f"for p in {q(rt)}/*.pid; do [ -e \"$p\" ] && kg \"$p\"; done"
    return (f"mkdir -p {q(rt)} && exec 9>>{q(lay['lock'])} || exit 1; "
            f"if command -v flock >/dev/null 2>&1; then flock -n 9 || "
            f"{{ echo \"@@busy $(cat {q(who)} 2>/dev/null)\"; exit {LOCK_WAITING_EXIT}; }}; fl=yes; else fl=no; fi; "
            f"stale=; for p in {q(rt)}/*.pid; do [ -s \"$p\" ] && stale=\"$stale $p\"; done; {_KG}; {every}; "
            f"printf '%s\\n' {q(owner)} > {q(who)}; "
            f"echo \"@@locked flock=$fl stale=$stale\"; cat > /dev/null; "
            f"rm -f {q(lay['token'])} {q(who)}; {every}; true")
