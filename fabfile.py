"""Fabric tasks for flashcore. `fab validate` and `fab nightly` run what `flashcore-deploy` runs
(pipeline.cli.execute).

    fab -H root@203.0.113.7:22022 -i ~/.ssh/runpod validate --python /opt/conda/bin/python
    fab -H gpu-a,gpu-b validate --model tiny   # every host at once (--parallel), even when one fails; the worst exit
    fab validate                               # the default target of ./inventory.yaml
    fab validate --target nightly              # an inventory host, group, or all
    fab validate --local                       # this machine, no SSH
    fab nightly                                # the inventory's default target, every host at once, the summary
    fab nightly --target nightly --parallel 4

With -H, the host's settings come from Fabric's Connection as Fabric resolved them (~/.ssh/config's HostName,
User, Port, IdentityFile, ProxyJump or a configured gateway, `-i` keys): the task builds its HostConfig from
that, not from a command line. Fabric calls `validate` once per -H host, one after another: each call only
resolves its host; a post-task, run once after them all, validates them together (at most --parallel at once).
Run from the repository root (the code synced to the host is this checkout).
"""

from __future__ import annotations

import shlex
import sys

from fabric import task
from invoke import Task
from invoke.exceptions import Exit

from pipeline import errors
from pipeline.cli import execute, execute_selected, guarded, make_flags, quiet_libraries, version_line
from pipeline.local import find_code_root
from pipeline.settings import Flags, HostConfig, fabric_layer, resolve

_pending: list[tuple[Flags, HostConfig, str]] = []   # -H hosts resolved by `validate`, one call per host


def _run_collected(c) -> None:
    """Runs once after `validate` has been called for every -H host (a post-task): all of them at once."""
    if not _pending:
        return                                   # no -H: `validate` ran its hosts itself
    flags = _pending[0][0]
    hosts = [cfg for _, cfg, _ in _pending]
    reproduce = {id(cfg): line for _, cfg, line in _pending}
    _pending.clear()
    _exit(guarded(lambda: execute(flags, hosts, lambda cfg: reproduce[id(cfg)], find_code_root()), flags.debug))


def _exit(code: int) -> None:
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
    post=[Task(_run_collected)],
    help={
        "model": "default (llama-3.1-8b + smollm2-135m on a GPU), a preset, smollm2-135m, a hub id, or a list a,b",
        "seed": "the parity suite's seed (default 0)",
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
        "target": "inventory host, group, all, or @FILE (the hosts a file lists)",
        "parallel": "hosts validated at once (default 8)",
        "gpus": "validate these GPUs of each host, e.g. 0,2 (default: every GPU, at once)",
        "host_timeout": "a host's wall limit in seconds (default: the sum of its steps' limits)",
        "history": "the history file (default: the inventory's history:, else REPORT_DIR/history.sqlite)",
        "local": "this machine, no SSH",
        "list_hosts": "print what the target selects, then stop",
        "dry_run": "print each step's commands; run nothing",
        "version": "print the version and stop",
        "debug": "show tracebacks",
    },
)
def validate(c, model=None, seed=None, require_gpu=None, python=None, workspace=None, known_hosts=None,
             accept_new_host_key=False, wheelhouse=None, report_dir="reports", template=None, skip=None,
             timeout=None, connect_timeout=None, lock_timeout=None, inventory=None, target=None, local=False,
             parallel=None, gpus=None, host_timeout=None, history=None, list_hosts=False, dry_run=False,
             version=False, debug=False):
    """Validate GPU hosts: connect, lock, gpu, sync, install, token, parity suite (per GPU), report."""
    quiet_libraries(debug)
    if version:
        print(version_line())
        return
    host = getattr(c, "host", None)  # a Fabric Connection with -H; a plain invoke Context without
    given_port = host and str(c.port) != (c.ssh_config or {}).get("port", "22")    # -H h:PORT, not ssh_config
    raw = dict(
        host=c.original_host if host else None, port=c.port if given_port else None, local=local,
        inventory=None if host else inventory, target=None if host else target, model=model,
        seed=seed, require_gpu=require_gpu, python=python, workspace=workspace, known_hosts=known_hosts,
        accept_new_host_key=accept_new_host_key, wheelhouse=wheelhouse, report_dir=report_dir, template=template,
        skip=skip, timeout=timeout, connect_timeout=connect_timeout, lock_timeout=lock_timeout, parallel=parallel,
        gpus=gpus, host_timeout=host_timeout, history=history, list_hosts=list_hosts, dry_run=dry_run, debug=debug)
    if host:
        def collect() -> int:
            flags = make_flags(**raw)
            [cfg] = resolve(flags, find_code_root(), base=fabric_layer(c))
            _pending.append((flags, cfg, _reproduce(c)))
            return errors.EXIT_OK
        _exit(guarded(collect, debug))           # bad input: stop here, no host is run
        return
    if not (local or target or inventory):
        raw["inventory"] = "inventory.yaml"
    _exit(_run(raw, debug))


def _run(raw: dict, debug: bool) -> int:
    def go() -> int:
        line = shlex.join(["fab", *sys.argv[1:]])
        return execute_selected(make_flags(**raw), lambda cfg, many: line)
    return guarded(go, debug)


@task(
    auto_shortflags=False,
    iterable=["skip"],
    help={
        "inventory": "the inventory (default inventory.yaml)",
        "target": "host, group, all or @FILE (default: the inventory's default_target)",
        "parallel": "hosts validated at once (default 8)",
        "report_dir": "reports, summary and history (default reports/)",
        "history": "the history file (default: the inventory's history:, else REPORT_DIR/history.sqlite)",
        "model": "default (llama-3.1-8b + smollm2-135m on a GPU), a preset, smollm2-135m, a hub id, or a list a,b",
        "seed": "the parity suite's seed (default 0)",
        "skip": "skip a step: gpu, sync, install, token, suite (repeatable)",
        "list_hosts": "print what the target selects, then stop",
        "dry_run": "print each step's commands; run nothing",
        "debug": "show tracebacks",
    },
)
def nightly(c, inventory="inventory.yaml", target=None, parallel=None, report_dir="reports", history=None,
            model=None, seed=None, skip=None, list_hosts=False, dry_run=False, debug=False):
    """The nightly fleet run: every host of the target at once, one report each, the summary and the history."""
    quiet_libraries(debug)
    _exit(_run(dict(inventory=inventory, target=target, parallel=parallel, report_dir=report_dir, history=history,
                    model=model, seed=seed, skip=skip, list_hosts=list_hosts, dry_run=dry_run, debug=debug), debug))
