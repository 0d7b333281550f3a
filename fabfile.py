"""Fabric tasks for flashcore. `fab validate` runs what `flashcore-deploy` runs (pipeline.cli.execute).

    fab -H root@203.0.113.7:22022 -i ~/.ssh/runpod validate --python /opt/conda/bin/python
    fab -H gpu-a,gpu-b validate --model tiny   # every host, even when one fails; the worst exit code at the end
    fab validate                               # the default target of ./inventory.yaml
    fab validate --target nightly              # an inventory host, group, or all
    fab validate --local                       # this machine, no SSH

With -H, the host's settings come from Fabric's Connection as Fabric resolved them (~/.ssh/config's HostName,
User, Port, IdentityFile, ProxyJump or a configured gateway, `-i` keys): the task builds its HostConfig from
that, not from a command line. Run from the repository root (the code synced to the host is this checkout).
"""

from __future__ import annotations

import shlex
import sys

from fabric import task
from invoke import Task
from invoke.exceptions import Exit

from pipeline import errors
from pipeline.cli import execute, guarded, make_flags, quiet_libraries, version_line
from pipeline.local import find_code_root
from pipeline.settings import fabric_layer, resolve

_codes: list[int] = []   # this fab invocation's per-host exit codes (-H a,b calls `validate` once per host)


def _worst_exit(c) -> None:
    """Runs once after `validate` has run for every -H host (a post-task): the worst exit code, or 0."""
    code = errors.overall_exit_code(_codes)
    _codes.clear()
    if code:
        raise Exit(code=code)


def _reproduce(c) -> str:
    """This fab command line, with -H narrowed to this host."""
    argv = list(sys.argv)
    for i, x in enumerate(argv[:-1]):
        if x in ("-H", "--hosts"):
            argv[i + 1] = c.original_host
    return shlex.join(["fab", *argv[1:]])


@task(
    auto_shortflags=False,       # invoke would turn --wheelhouse into -h (and -h must stay help)
    iterable=["skip"],
    post=[Task(_worst_exit)],
    help={
        "model": "tiny, llama-3.1-8b (default) or a hub id",
        "require_gpu": "H100 (default), any, or none (runs the suite on the CPU)",
        "python": "the host's interpreter (default python3)",
        "workspace": "remote workspace (default ~/flashcore-workspace)",
        "known_hosts": "known_hosts file for strict host-key checking",
        "accept_new_host_key": "record an unknown host key (a changed or revoked one is always refused)",
        "wheelhouse": "local wheels pushed for what the host lacks",
        "report_dir": "report folder (default reports/)",
        "template": "your own jinja2 report template",
        "skip": "skip a step: gpu, sync, install, token, suite (repeatable)",
        "timeout": "suite time limit in seconds",
        "connect_timeout": "SSH connect timeout in seconds",
        "lock_timeout": "seconds to wait while another run holds the workspace (then exit 6)",
        "inventory": "inventory file when no -H is given (default inventory.yaml)",
        "target": "inventory host, group or all",
        "local": "this machine, no SSH",
        "list_hosts": "print what the target selects, then stop",
        "dry_run": "print each step's commands; run nothing",
        "version": "print the version and stop",
        "debug": "show tracebacks",
    },
)
def validate(c, model=None, require_gpu=None, python=None, workspace=None, known_hosts=None,
             accept_new_host_key=False, wheelhouse=None, report_dir="reports", template=None, skip=None,
             timeout=None, connect_timeout=None, lock_timeout=None, inventory=None, target=None, local=False,
             list_hosts=False, dry_run=False, version=False, debug=False):
    """Validate a GPU host: connect, lock, gpu, sync, install, token, parity suite, report."""
    quiet_libraries(debug)
    if version:
        print(version_line())
        return
    host = getattr(c, "host", None)  # a Fabric Connection with -H; a plain invoke Context without

    def go() -> int:
        given_port = host and str(c.port) != (c.ssh_config or {}).get("port", "22")    # -H h:PORT, not ssh_config
        flags = make_flags(
            host=c.original_host if host else None, port=c.port if given_port else None, local=local, inventory=None if host else inventory,
            target=None if host else target, model=model, require_gpu=require_gpu, python=python,
            workspace=workspace, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key,
            wheelhouse=wheelhouse, report_dir=report_dir, template=template, skip=skip, timeout=timeout,
            connect_timeout=connect_timeout, lock_timeout=lock_timeout, list_hosts=list_hosts, dry_run=dry_run,
            debug=debug)
        if not (host or local or target or inventory):
            flags.inventory = "inventory.yaml"
        hosts = resolve(flags, find_code_root(), base=fabric_layer(c) if host else None)
        return execute(flags, hosts, lambda cfg: _reproduce(c) if host else
                       shlex.join(["fab", *sys.argv[1:]]))

    code = guarded(go, debug)
    if code == errors.EXIT_USAGE or code > 128:
        raise Exit(code=code)    # bad input or a signal: stop here, the other hosts are not run
    _codes.append(code)
