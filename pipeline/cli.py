"""flashcore-deploy: validate flashcore on GPU hosts (or this machine) and write Markdown reports.

A thin shell: argv -> `settings.Flags` -> `settings.resolve` (every check, before anything runs) -> `execute`
(signals, the inventory's lock, `fleet.run_fleet`: every host at once within --parallel, the history, the
summary, the exit code). `fabfile.py`'s `fab validate` and `fab nightly` build their Flags from the task's
arguments and Fabric's Connection and call the same `execute`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__, errors, local, report, subcommands
from pipeline.errors import PipelineError, UsageError, signal_name
from pipeline.remote import Cancel
from pipeline.history import HistoryStore, default_path
from pipeline.results import SKIPPABLE_STEPS
from pipeline.schedule import inventory_lock
from pipeline.settings import (DEFAULT_PARALLEL, DEFAULTS, Flags, HostConfig, count, describe, gpu_indices,
                               resolve, seconds, tcp_port)

if TYPE_CHECKING:  # the runner (paramiko, fabric) is imported only when something runs
    from pipeline.runner import RunOptions

EPILOG = """\
examples:
  flashcore-deploy --local
      this machine, no SSH; without a GPU the tiny preset runs on the CPU
  flashcore-deploy --host 203.0.113.7 --port 22022 --identity ~/.ssh/runpod --python /opt/conda/bin/python
      one host over SSH: strict host keys, H100 required, the default models (llama-3.1-8b, smollm2-135m)
  flashcore-deploy --host gpu-box          (a Host entry of ~/.ssh/config: HostName, User, Port, keys, ProxyJump)
  flashcore-deploy --inventory inventory.yaml --target nightly --parallel 8
      every host of a group at once (8 at a time): a report per host, then summary-<UTC>.md/.json/.junit.xml
  flashcore-deploy --inventory inventory.yaml --target @reports/summary-<UTC>.rerun.txt
      again the hosts that did not pass
  flashcore-deploy --host gpu-box --gpus 0,2
      two GPUs of a host, each its own suite, at once (default: every GPU)
  flashcore-deploy --inventory inventory.yaml --target nightly --list-hosts
      what a target selects; --dry-run prints every step's commands and runs nothing

exit codes:
  0 all passed   1 the kernels disagree with the reference (parity failed), or a confirmed regression
  against the history   2 usage, inventory or input-file error (before anything runs)
  3 host unreachable, authentication or host-key failure, connection dropped
  4 host does not meet the GPU requirement   5 a step failed (sync, install, token, model not loadable,
  suite crash or timeout, report; a host past its --host-timeout; UNKNOWN: an unexpected error)
  6 busy: another run holds the workspace lock (--lock-timeout), or this inventory's fleet lock
  130 interrupted (SIGINT)   143 terminated (SIGTERM)   129 hung up (SIGHUP): the remote suites killed, the
  token removed, every started host's report written ("INTERRUPTED")
  several hosts: the highest of them (an interruption wins)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = _Parser(prog="flashcore-deploy", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    where = p.add_argument_group("where")
    where.add_argument("--host", metavar="HOST", help="the host to validate over SSH (address, or a Host of ~/.ssh/config)")
    where.add_argument("--port", metavar="PORT", help=f"SSH port (default {d.port}, or ssh_config's)")
    where.add_argument("--user", metavar="USER", help=f"SSH user (default {d.user}, or ssh_config's)")
    where.add_argument("--identity", metavar="KEY", help="private key file (default: ssh_config's, your keys/agent)")
    where.add_argument("--known-hosts", metavar="FILE",
                       help="known_hosts file for strict host-key checking (default ~/.ssh/known_hosts + "
                            "/etc/ssh/ssh_known_hosts, or ssh_config's UserKnownHostsFile)")
    where.add_argument("--accept-new-host-key", action="store_true",
                       help="record an unknown host key in known_hosts (a changed or revoked key is always refused)")
    where.add_argument("--ssh-config", metavar="FILE",
                       help="ssh_config to read (default ~/.ssh/config then /etc/ssh/ssh_config; 'none': none)")
    where.add_argument("--inventory", metavar="FILE", help="inventory.yaml with defaults, hosts and groups")
    where.add_argument("--target", metavar="NAME",
                       help="inventory host, group, 'all', or @FILE: the hosts/groups a file lists, one a line "
                            "(a summary's rerun file) (instead of --host)")
    where.add_argument("--local", action="store_true",
                       help="this machine, no SSH (the default when no host is named)")
    what = p.add_argument_group("what")
    what.add_argument("--model", metavar="MODEL[,MODEL]",
                      help=f"{d.model} (the default: llama-3.1-8b and smollm2-135m on a GPU, tiny on a host without "
                           "GPU), a preset (tiny, llama-3.1-8b ...), smollm2-135m (real weights), a hub id like "
                           "meta-llama/Llama-3.1-8B (needs an HF token: HF_TOKEN or the HF cache), or a list a,b")
    what.add_argument("--seed", metavar="N", help="the parity suite's seed: random weights, prompts, targets "
                                                  "(default 0)")
    what.add_argument("--require-gpu", metavar="H100|any|none",
                      help="GPU the host must have (default H100 remotely, none with --local); none runs the "
                           "suite on the CPU")
    what.add_argument("--python", metavar="PATH",
                      help=f"the host's interpreter whose torch/triton are used (default {d.python}; this python "
                           "with --local)")
    what.add_argument("--workspace", metavar="DIR", help=f"remote workspace (default {d.workspace})")
    what.add_argument("--wheelhouse", metavar="DIR",
                      help="local folder of wheels pushed to the host for what it lacks (offline install)")
    what.add_argument("--gpus", metavar="LIST",
                      help="validate these GPUs of each host, by nvidia-smi index, e.g. 0,2 (default: every GPU, "
                           "each with a suite of its own, at once)")
    what.add_argument("--skip", action="append", default=[], metavar="STEP",
                      help=f"skip a step ({', '.join(SKIPPABLE_STEPS)}); repeatable")
    what.add_argument("--timeout", metavar="SECONDS",
                      help=f"suite time limit, enforced on the host and here (default {d.suite_timeout:g})")
    what.add_argument("--connect-timeout", metavar="SECONDS",
                      help=f"SSH connect timeout (default {d.connect_timeout:g})")
    what.add_argument("--lock-timeout", metavar="SECONDS",
                      help=f"how long to wait while another run holds the workspace (default {d.lock_timeout:g}; "
                           "then exit 6)")
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--parallel", metavar="N", help=f"hosts validated at once (default {DEFAULT_PARALLEL})")
    fleet.add_argument("--host-timeout", metavar="SECONDS",
                       help="a host's wall limit, all its steps together (default: the sum of its steps' limits); "
                            "then it is stopped, cleaned up and reported TIMED OUT, the others go on")
    fleet.add_argument("--history", metavar="FILE",
                       help="the history store every run is recorded in (default: the inventory's history:, else "
                            "REPORT_DIR/history.sqlite)")
    out = p.add_argument_group("output")
    out.add_argument("--report-dir", default="reports", metavar="DIR",
                     help="where REPORT_DIR/<host>-<UTC time>.md and .json go (default reports/)")
    out.add_argument("--template", metavar="FILE", help="your own jinja2 report template")
    out.add_argument("--list-hosts", action="store_true", help="print what the target selects, then stop")
    out.add_argument("--dry-run", action="store_true", help="print each step's commands; run nothing")
    out.add_argument("--debug", action="store_true", help="tracebacks and paramiko's log on stderr")
    out.add_argument("--version", action="store_true", help="print the version and exit")
    out.add_argument("--suite-command", metavar="CMD", help=argparse.SUPPRESS)
    # --suite-command: TESTING AID (hidden). Replaces the remote pytest invocation with a shell command, which
    # still runs in the workspace under the same timeout, process group and results paths
    # ($FLASHCORE_PARITY_JSON, $FLASHCORE_JUNIT). The integration tests use it for a suite that hangs.
    return p


def make_flags(**raw) -> Flags:
    """Flags from strings (argv, or a fab task's arguments): numbers are checked here, the rest in settings."""
    conv = {"port": lambda v: tcp_port(v),
            "timeout": lambda v: seconds(v, "--timeout"),
            "connect_timeout": lambda v: seconds(v, "--connect-timeout"),
            "lock_timeout": lambda v: seconds(v, "--lock-timeout", allow_zero=True),
            "host_timeout": lambda v: seconds(v, "--host-timeout"),
            "parallel": lambda v: count(v, "--parallel"),
            "gpus": lambda v: gpu_indices(v),
            "seed": lambda v: count(v, "--seed", least=0)}
    for key, fn in conv.items():
        if raw.get(key) is not None:
            raw[key] = fn(raw[key])
    raw["skip"] = tuple(raw.get("skip") or ())
    return Flags(**{k: v for k, v in raw.items() if k in Flags.__dataclass_fields__ and v is not None})


def version_line() -> str:
    import fabric
    import paramiko
    return (f"flashcore-deploy {__version__} (python {sys.version.split()[0]}, fabric {fabric.__version__}, "
            f"paramiko {paramiko.__version__})")


def _reproduce(argv: list[str], cfg: HostConfig | None, many: bool) -> str:
    """The command line that re-runs this host alone (None: the command line as given)."""
    if cfg is None:
        return shlex.join(["flashcore-deploy", *argv])
    args, out, skip = list(argv), [], False
    for x in args:
        if skip:
            skip = False
        elif many and x == "--target":
            skip = True
        elif not (many and x.startswith("--target=")):
            out.append(x)
    return shlex.join(["flashcore-deploy", *out, *(["--target", cfg.name] if many else [])])


@contextmanager
def signals_cancel(say: Callable[[str], None]) -> Iterator[Cancel]:
    """SIGINT, SIGTERM and SIGHUP set one Cancel that every active run observes (they stop their remote
    commands, clean up and report "interrupted"); the previous handlers come back afterwards."""
    cancel = Cancel()

    def handler(signum, frame):
        if not cancel.is_set():
            say(f"flashcore-deploy: {signal_name(signum)}: stopping (killing the remote commands, removing the "
                "token, writing the report)")
        cancel.set(signum)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield cancel
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def quiet_libraries(debug: bool) -> None:
    """paramiko logs a dropped connection with a traceback through logging's last-resort handler (stderr):
    without --debug that goes nowhere; with it, everything goes to stderr."""
    log = logging.getLogger("paramiko")
    if debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    elif not log.handlers:
        log.addHandler(logging.NullHandler())
        log.propagate = False


def _say(line: str) -> None:
    print(line, flush=True)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_output(flags: Flags) -> None:
    if flags.template:
        report.check_template(flags.template)
    report.check_report_dir(flags.report_dir)


def run_options(flags: Flags, code_root: Path, **extra) -> RunOptions:
    """The runner's options from the flags (the same for every host and for a cluster); `extra` adds the rest."""
    from pipeline.runner import RunOptions
    return RunOptions(skip=frozenset(flags.skip), wheelhouse=flags.wheelhouse, report_dir=flags.report_dir,
                      template=flags.template, suite_command=flags.suite_command, debug=flags.debug,
                      code_root=code_root, **extra)


def dry_run(hosts: list[HostConfig], flags: Flags, code_root: Path) -> None:
    from pipeline.runner import Checkout, plan_lines
    checkout = Checkout()
    for cfg in hosts:
        for line in plan_lines(cfg, run_options(flags, code_root, checkout=checkout)):
            _say(line)


def is_fleet(flags: Flags, hosts: list[HostConfig]) -> bool:
    """Several hosts, or a target that is not one host's name (a group, all, @file): a summary is written and
    the inventory's lock held. One host alone is recorded in the history only."""
    return len(hosts) > 1 or bool(flags.target) and flags.target not in {h.name for h in hosts}


def history_path(flags: Flags) -> Path:
    return Path(flags.history).expanduser() if flags.history else default_path(flags.report_dir)


def check_history(path: Path) -> None:
    """The history file opens (SQLite, WAL, a schema this code knows): before anything runs, or exit 2."""
    with HistoryStore(path):
        pass


def execute(flags: Flags, hosts: list[HostConfig], reproduce: Callable[[HostConfig], str], code_root: Path) -> int:
    """Run the resolved hosts, at most --parallel at once (or list them, or print their plans): the exit code."""
    if flags.list_hosts:
        for cfg in hosts:
            _say(describe(cfg))
        return errors.EXIT_OK
    if flags.dry_run:
        dry_run(hosts, flags, code_root)
        return errors.EXIT_OK
    check_output(flags)
    history = history_path(flags)
    check_history(history)
    from pipeline import fleet
    from pipeline.runner import Checkout
    checkout = Checkout()   # the checkout is read once for all hosts

    def make_opts(cfg: HostConfig) -> RunOptions:
        return run_options(flags, code_root, reproduce=reproduce(cfg), checkout=checkout)

    many = is_fleet(flags, hosts)
    fo = fleet.FleetOptions(report_dir=flags.report_dir, history=history,
                            parallel=flags.parallel or DEFAULT_PARALLEL,
                            target=flags.target or ",".join(h.name for h in hosts), summary=many)
    view = fleet.LiveView([h.name or h.label for h in hosts]) if many and sys.stdout.isatty() else fleet.PlainView()
    lock = inventory_lock(flags.inventory) if many and flags.inventory else nullcontext()
    with lock, signals_cancel(view.error) as cancel:
        _, outcome = fleet.run_fleet(hosts, make_opts, fo, cancel, view)
    for kind, path in outcome.paths.items():
        _say(f"summary {kind}: {path}")
    return fleet.fleet_exit_code(outcome.exit_code, cancel)


def guarded(fn: Callable[[], int], debug: bool) -> int:
    """Bad input and early failures: one line on stderr and the exit code; the traceback only with --debug."""
    try:
        return fn()
    except PipelineError as e:
        if debug:
            traceback.print_exc()
        _err(f"flashcore-deploy: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _err("flashcore-deploy: interrupted")
        return errors.EXIT_SIGINT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    quiet_libraries(debug)

    def go() -> int:
        if (code := subcommands.dispatch(argv)) is not None:   # history, schedule
            return code
        a = build_parser().parse_args(argv)
        if a.version:
            _say(version_line())
            return errors.EXIT_OK
        raw = {k: v for k, v in vars(a).items() if k != "version"}
        return execute_selected(make_flags(**raw), lambda cfg, many: _reproduce(argv, cfg, many))

    return guarded(go, debug)


def execute_selected(flags: Flags, reproduce: Callable[[HostConfig | None, bool], str]) -> int:
    """What the flags select (flashcore-deploy and fab alike): a Slurm cluster of the inventory as one job array,
    else its hosts. `reproduce(cfg, many)`: the command line that re-runs host `cfg` (None: the whole cluster)."""
    code_root = local.find_code_root()
    if flags.inventory or flags.target:   # a target may be a Slurm cluster of the inventory
        from pipeline import cluster
        if (target := cluster.resolve(flags, code_root)) is not None:
            return execute_cluster(flags, target, reproduce(None, False), code_root)
    hosts = resolve(flags, code_root)
    return execute(flags, hosts, lambda cfg: reproduce(cfg, len(hosts) > 1), code_root)


def execute_cluster(flags: Flags, target, reproduce: str, code_root: Path) -> int:
    """A Slurm cluster of the inventory (pipeline.cluster): list it, print its plan, or validate its GPUs as one
    job array through its login node, as a fleet runs: the history checked up front (--history, the inventory's
    `history:`, else REPORT_DIR/history.sqlite), the inventory's lock held, a line per task, the summary, the exit
    code."""
    from dataclasses import replace

    from pipeline import cluster
    from pipeline.fleet import finished_lines, fleet_exit_code
    opts = run_options(flags, code_root, out=_say, reproduce=reproduce)
    if flags.list_hosts or flags.dry_run:
        for line in [cluster.describe(target)] if flags.list_hosts else cluster.plan_lines(target, opts):
            _say(line)
        return errors.EXIT_OK
    check_output(flags)
    history = history_path(flags)
    check_history(history)
    with inventory_lock(target.inventory), signals_cancel(_err) as cancel:
        out = cluster.run_cluster(target, replace(opts, cancel=cancel), history)
    for label, res in [("login node", out.login), *out.tasks.items()]:
        line, err = finished_lines(res, flags.report_dir, f"{target.name} {label}")
        _say(line)
        if err:
            _err(err)
    _say(f"summary: {out.summary['md']} (exit {out.exit_code})")
    return fleet_exit_code(out.exit_code, cancel)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
