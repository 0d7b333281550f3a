"""flashcore-deploy: validate flashcore on a GPU host (or this machine) and write a Markdown report.

A thin shell over `pipeline.steps.run_host`; `fabfile.py`'s `fab validate` calls `main()` with the same argv.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from pipeline import errors, subcommands
from pipeline.errors import PipelineError, UsageError
from pipeline.inventory import (DEFAULT_MODEL, DEFAULT_WORKSPACE, HostConfig, load_inventory, parse_gpu_requirement,
                                resolve_host, select_hosts)
from pipeline.results import SKIPPABLE_STEPS, HostRunResult

EPILOG = """\
examples:
  flashcore-deploy --local
      this machine, no SSH; without a GPU the tiny preset runs on the CPU
  flashcore-deploy --host 203.0.113.7 --port 22022 --identity ~/.ssh/runpod --python /opt/conda/bin/python
      one host over SSH: strict host keys, H100 required, the llama-3.1-8b preset
  flashcore-deploy --inventory inventory.yaml --target nightly
      every host of a group (one report each)
  flashcore-deploy --host 127.0.0.1 --port 2222 --known-hosts /tmp/sshd-2222/known_hosts \\
      --identity /tmp/sshd-2222/client_key --require-gpu none --model tiny --skip suite

exit codes:
  0 all passed   1 parity/validation failed   2 usage or inventory error
  3 host unreachable, authentication or host-key failure   4 host does not meet the GPU requirement
  5 a step failed (sync, install, token, suite crash or timeout)   130 interrupted
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flashcore-deploy", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    where = p.add_argument_group("where")
    where.add_argument("--host", metavar="IP", help="the host to validate over SSH (address or name)")
    where.add_argument("--port", type=int, metavar="PORT", help="SSH port (default 22)")
    where.add_argument("--user", metavar="USER", help="SSH user (default root)")
    where.add_argument("--identity", metavar="KEY", help="private key file (default: your SSH keys/agent)")
    where.add_argument("--known-hosts", metavar="FILE",
                       help="known_hosts file for strict host-key checking (default ~/.ssh/known_hosts)")
    where.add_argument("--accept-new-host-key", action="store_true",
                       help="record an unknown host key in known_hosts (a changed key is always refused)")
    where.add_argument("--inventory", metavar="FILE", help="inventory.yaml with defaults, hosts and groups")
    where.add_argument("--target", metavar="NAME", help="inventory host, group or 'all' (instead of --host)")
    where.add_argument("--local", action="store_true",
                       help="this machine, no SSH (the default when no host is named)")
    what = p.add_argument_group("what")
    what.add_argument("--model", metavar="PRESET|HUB_ID",
                      help=f"tiny, llama-3.1-8b (default {DEFAULT_MODEL}; tiny on a host without GPU) or a hub "
                           "id like meta-llama/Llama-3.1-8B (needs an HF token: HF_TOKEN or the HF cache)")
    what.add_argument("--require-gpu", metavar="H100|any|none",
                      help="GPU the host must have (default H100 remotely, none with --local); none runs the "
                           "suite on the CPU")
    what.add_argument("--python", metavar="PATH",
                      help="the host's interpreter whose torch/triton are used (default python3; this python "
                           "with --local)")
    what.add_argument("--workspace", metavar="DIR", help=f"remote workspace (default {DEFAULT_WORKSPACE})")
    what.add_argument("--wheelhouse", metavar="DIR",
                      help="local folder of wheels pushed to the host for what it lacks (offline install)")
    what.add_argument("--skip", action="append", default=[], choices=SKIPPABLE_STEPS, metavar="STEP",
                      help=f"skip a step ({', '.join(SKIPPABLE_STEPS)}); repeatable")
    what.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="suite time limit, enforced on the host and here (default 1800)")
    what.add_argument("--connect-timeout", type=float, metavar="SECONDS", help="SSH connect timeout (default 10)")
    out = p.add_argument_group("output")
    out.add_argument("--report-dir", default="reports", metavar="DIR",
                     help="where REPORT_DIR/<host>-<UTC time>.md and .json go (default reports/)")
    out.add_argument("--template", metavar="FILE", help="your own jinja2 report template")
    out.add_argument("--debug", action="store_true", help="show tracebacks")
    out.add_argument("--suite-command", metavar="CMD", help=argparse.SUPPRESS)
    # --suite-command: TESTING AID (hidden). Replaces the remote pytest invocation with a shell command, which
    # still runs in the workspace under the same timeout, process group and results paths
    # ($FLASHCORE_PARITY_JSON, $FLASHCORE_JUNIT). The integration tests use it for a suite that hangs.
    return p


def _gpu_flag(value: str):
    try:
        return parse_gpu_requirement(value)
    except ValueError as e:
        raise UsageError(f"--require-gpu: {e}") from None


def _host_from_args(a: argparse.Namespace) -> HostConfig:
    gpu = _gpu_flag(a.require_gpu if a.require_gpu is not None else ("none" if a.local else "H100"))
    if a.local:
        return HostConfig(name="local", address="localhost", port=0, user=os.environ.get("USER", "local"),
                          python=a.python or sys.executable, workspace=a.workspace or DEFAULT_WORKSPACE, gpu=gpu,
                          model=a.model or DEFAULT_MODEL, model_explicit=a.model is not None, local=True,
                          suite_timeout=a.timeout or 1800.0)
    port = a.port or 22
    return HostConfig(
        name=a.host if port == 22 else f"{a.host}:{port}", address=a.host, port=port, user=a.user or "root",
        identity=a.identity, known_hosts=a.known_hosts, accept_new_host_key=a.accept_new_host_key,
        python=a.python or "python3", workspace=a.workspace or DEFAULT_WORKSPACE, gpu=gpu,
        model=a.model or DEFAULT_MODEL, model_explicit=a.model is not None,
        connect_timeout=a.connect_timeout or 10.0, suite_timeout=a.timeout or 1800.0)


def _overrides(a: argparse.Namespace, cfg: HostConfig) -> HostConfig:
    """CLI flags win over the inventory."""
    kw = dict(port=a.port, user=a.user, identity=a.identity, known_hosts=a.known_hosts, python=a.python,
              workspace=a.workspace, model=a.model, connect_timeout=a.connect_timeout, suite_timeout=a.timeout)
    if a.model:
        kw["model_explicit"] = True
    if a.accept_new_host_key:
        kw["accept_new_host_key"] = True
    cfg = cfg.with_overrides(**kw)
    if a.require_gpu is not None:
        cfg = replace(cfg, gpu=_gpu_flag(a.require_gpu))
    return cfg


def resolve_targets(a: argparse.Namespace) -> list[HostConfig]:
    chosen = [bool(a.host), bool(a.inventory or a.target), bool(a.local)]
    if sum(chosen) > 1:
        raise UsageError("choose one of --host, --inventory/--target, --local")
    if a.port is not None and not 1 <= a.port <= 65535:
        raise UsageError(f"--port: {a.port} is not a TCP port")
    if a.timeout is not None and a.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if a.wheelhouse and not Path(a.wheelhouse).expanduser().is_dir():
        raise UsageError(f"--wheelhouse {a.wheelhouse}: not a directory")
    if a.template and not Path(a.template).is_file():
        raise UsageError(f"--template {a.template}: no such file")
    if a.identity and not Path(a.identity).expanduser().is_file():
        raise UsageError(f"--identity {a.identity}: no such file")
    if a.inventory or a.target:
        inv = load_inventory(a.inventory or "inventory.yaml")
        return [_overrides(a, resolve_host(inv, name)) for name in select_hosts(inv, a.target)]
    if not a.host:
        a.local = True
    return [_host_from_args(a)]


def _reproduce(argv: list[str], cfg: HostConfig, many: bool) -> str:
    args = list(argv)
    if many:  # one host of a group: point --target at it
        out, skip = [], False
        for x in args:
            if skip:
                skip = False
                continue
            if x == "--target":
                skip = True
                continue
            if not x.startswith("--target="):
                out.append(x)
        args = [*out, "--target", cfg.name]
    return shlex.join(["flashcore-deploy", *args])


def run(argv: list[str]) -> list[HostRunResult]:
    from pipeline.steps import RunOptions, run_host

    a = build_parser().parse_args(argv)
    hosts = resolve_targets(a)
    results = []
    for cfg in hosts:
        opts = RunOptions(skip=frozenset(a.skip), wheelhouse=a.wheelhouse, report_dir=a.report_dir,
                          template=a.template, suite_command=a.suite_command, debug=a.debug,
                          reproduce=_reproduce(argv, cfg, len(hosts) > 1),
                          out=lambda line: print(line, flush=True))
        res = run_host(cfg, opts)
        results.append(res)
        print(f"{res.verdict}: {res.host} (exit {res.exit_code}) report {res.artifacts.get('report_md', '-')}",
              flush=True)
        if res.exit_code == errors.EXIT_INTERRUPTED:
            break
    return results


def overall_exit_code(results: list[HostRunResult]) -> int:
    codes = [r.exit_code for r in results]
    if errors.EXIT_INTERRUPTED in codes:
        return errors.EXIT_INTERRUPTED
    return max(codes, default=0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if (code := subcommands.dispatch(argv)) is not None:   # history, schedule
            return code
        return overall_exit_code(run(argv))
    except PipelineError as e:
        if debug:
            traceback.print_exc()
        print(f"flashcore-deploy: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("flashcore-deploy: interrupted", file=sys.stderr)
        return errors.EXIT_INTERRUPTED


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
