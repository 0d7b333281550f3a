"""`flashcore-deploy schedule --emit cron|systemd|github`: ready recipes for a nightly fleet run, and the local lock
that keeps two runs of one inventory from overlapping.

    flashcore-deploy schedule --emit cron                    a crontab line, wrapped in `flock -n`
    flashcore-deploy schedule --emit systemd --at 03:30      a oneshot service + a timer (OnCalendar=, Persistent=true)
    flashcore-deploy schedule --emit github --target all     a GitHub Actions workflow for a self-hosted runner

The builders are pure (options in, text out); `main()` prints. `inventory_lock()` is what the fleet runner holds
for a whole run: a second run of the same inventory (cron and a hand-started one, a timer firing while the last
night still runs) stops at once with one line naming the holder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipeline.errors import BusyError, UsageError

NAME = "flashcore-nightly"
_TIME = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Recipe:
    repo: str                       # the checkout the schedule runs from (absolute)
    inventory: str = "inventory.yaml"
    target: str = "nightly"
    parallel: int | None = None     # --parallel for the run (None: the CLI's default; a Slurm cluster takes none)
    hour: int = 2
    minute: int = 17
    report_dir: str = "reports"
    name: str = NAME
    runner_label: str = "flashcore-ssh"     # GitHub: the self-hosted runner's label
    env_file: str = ""              # systemd: EnvironmentFile= with HF_TOKEN (default ~/.config/flashcore/nightly.env)

    @property
    def deploy(self) -> str:
        return str(Path(self.repo) / ".venv" / "bin" / "flashcore-deploy")

    def deploy_args(self) -> list[str]:
        return ["--inventory", self.inventory, "--target", self.target,
                *(["--parallel", str(self.parallel)] if self.parallel is not None else [])]


def parse_time(text: str) -> tuple[int, int]:
    m = _TIME.match(text.strip())
    if not m:
        raise UsageError(f"--at {text}: expected HH:MM (24 h)")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------------------------------------------- cron


def cron_line(r: Recipe) -> str:
    """`M H * * * cd REPO && flock -n LOCK DEPLOY ... >> LOG 2>&1`: flock -n exits at once (status 1) while the
    previous night still holds the lock. Cron turns an unescaped % into a newline, hence the escaping."""
    reports = Path(r.repo) / r.report_dir
    lock, log = (shlex.quote(str(reports / x)) for x in (f".{r.name}.cron.lock", f"{r.name}.log"))
    cmd = (f"cd {shlex.quote(r.repo)} && mkdir -p {shlex.quote(str(reports))} && flock -n {lock} "
           f"{shlex.join([r.deploy, *r.deploy_args(), '--report-dir', str(reports)])} >> {log} 2>&1")
    return f"{r.minute} {r.hour} * * * " + cmd.replace("%", r"\%")


def cron_text(r: Recipe) -> str:
    return (f"# {r.name}: paste into `crontab -e` (the machine's local time).\n"
            f"# HF_TOKEN (hub models only): cron has no secrets; keep it in the HF cache (`hf auth login`).\n"
            f"{cron_line(r)}\n")


# ---------------------------------------------------------------------------------------------------- systemd


def _specifiers(text: str) -> str:
    """systemd expands %-specifiers in most settings (WorkingDirectory=, Description=, ...): keep a % as it is."""
    return text.replace("%", "%%")


def _exec_word(word: str) -> str:
    """One ExecStart= word: specifiers and $VARS are expanded in command lines too; quoted for its own parser."""
    return shlex.quote(_specifiers(word).replace("$", "$$"))


def systemd_units(r: Recipe) -> dict[str, str]:
    """{file name: text} for a oneshot service and its timer (user units: `systemctl --user`)."""
    env_file = _specifiers(r.env_file) if r.env_file else "%h/.config/flashcore/nightly.env"   # %h: your home
    what = _specifiers(f"{r.target} of {r.inventory}")
    service = f"""[Unit]
Description=flashcore nightly: validate {what}
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
WorkingDirectory={_specifiers(r.repo)}
# HF_TOKEN=... for hub models, in a 0600 file (never in this unit); the leading '-' makes it optional
EnvironmentFile=-{env_file}
ExecStart={' '.join(_exec_word(w) for w in [r.deploy, *r.deploy_args(), '--report-dir', r.report_dir])}
TimeoutStartSec=6h
# SIGTERM (systemctl stop, the timeout) reaches flashcore-deploy: every started host's report says interrupted
KillMode=mixed
"""
    timer = f"""[Unit]
Description=flashcore nightly timer ({what})

[Timer]
OnCalendar=*-*-* {r.hour:02d}:{r.minute:02d}:00
# a night missed while the machine was off runs at the next boot
Persistent=true
Unit={r.name}.service

[Install]
WantedBy=timers.target
"""
    return {f"{r.name}.service": service, f"{r.name}.timer": timer}


def systemd_text(r: Recipe) -> str:
    units = systemd_units(r)
    out = [f"# {r.name}: save the two files below into ~/.config/systemd/user/, then\n"
           f"#   systemctl --user daemon-reload && systemctl --user enable --now {r.name}.timer\n"
           f"#   loginctl enable-linger $USER     # run while you are logged out\n"]
    for name, text in units.items():
        out.append(f"\n# ---- {name}\n{text}")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------- github


def github_workflow(r: Recipe) -> str:
    """A workflow for a self-hosted runner that can reach the hosts over SSH. The key, the known_hosts lines and
    the HF token come from repository secrets; reports and the history live outside the checkout (checkout
    cleans its folder) so the history survives from night to night, and only tonight's files are uploaded.
    The summary reaches the run's page through $GITHUB_STEP_SUMMARY. GitHub's cron is in UTC."""
    reports = f"~/{r.name}/reports"
    group = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{r.name}-{r.inventory}-{r.target}")
    deploy = " ".join([shlex.join(["./.venv/bin/flashcore-deploy", *r.deploy_args()]),
                       f'--report-dir "$HOME/{r.name}/reports"', '--identity "$HOME/.ssh/flashcore_nightly"',
                       '--known-hosts "$HOME/.ssh/flashcore_known_hosts"'])
    return f"""# {r.name}: save as .github/workflows/{r.name}.yml. Needs a self-hosted runner labelled
# '{r.runner_label}' that reaches the hosts over SSH, and the repository secrets FLASHCORE_SSH_KEY (private key),
# FLASHCORE_KNOWN_HOSTS (the hosts' known_hosts lines) and HF_TOKEN (hub models only).
name: flashcore nightly
"on":
  schedule:
    - cron: "{r.minute} {r.hour} * * *"     # UTC
  workflow_dispatch: {{}}
concurrency:
  group: {group}
  cancel-in-progress: false
permissions:
  contents: read
jobs:
  nightly:
    runs-on: [self-hosted, {r.runner_label}]
    timeout-minutes: 360
    steps:
      - uses: actions/checkout@v4
      - name: bootstrap
        run: bash scripts/bootstrap.sh
      - name: SSH key and known hosts
        env:
          SSH_KEY: ${{{{ secrets.FLASHCORE_SSH_KEY }}}}
          KNOWN_HOSTS: ${{{{ secrets.FLASHCORE_KNOWN_HOSTS }}}}
        run: |
          umask 077
          mkdir -p ~/.ssh {reports}
          printf '%s\\n' "$SSH_KEY" > ~/.ssh/flashcore_nightly
          printf '%s\\n' "$KNOWN_HOSTS" > ~/.ssh/flashcore_known_hosts
      - name: nightly
        env:
          HF_TOKEN: ${{{{ secrets.HF_TOKEN }}}}
        run: |
          touch -d '1 second ago' "$RUNNER_TEMP/nightly.start"     # a report of the same clock tick is newer
          {deploy}
      - name: tonight's reports
        if: always()
        run: |
          mkdir -p "$RUNNER_TEMP/tonight" && cd {reports}
          find . -type f -newer "$RUNNER_TEMP/nightly.start" -exec cp --parents {{}} "$RUNNER_TEMP/tonight/" \\;
      - uses: actions/upload-artifact@v4
        if: always()
        with:
          name: {r.name}-reports
          path: ${{{{ runner.temp }}}}/tonight/
      - name: remove the key
        if: always()
        run: |
          rm -f ~/.ssh/flashcore_nightly
"""


# ------------------------------------------------------------------------------------------------------- lock


class FleetBusy(BusyError):
    """Another run of the same inventory holds the lock: exit 6, like a busy workspace."""


def lock_path(inventory: str | Path, lock_dir: str | Path | None = None) -> Path:
    """A per-user lock file for this inventory (by its absolute path), on a local filesystem."""
    key = hashlib.sha256(str(Path(inventory).expanduser().resolve()).encode()).hexdigest()[:16]
    base = Path(lock_dir) if lock_dir else \
        Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"flashcore-{os.getuid()}"
    return base / f"inventory-{key}.lock"


@contextmanager
def inventory_lock(inventory: str | Path, lock_dir: str | Path | None = None, timeout: float = 0) -> Iterator[Path]:
    """Hold the inventory's lock for the block (filelock: flock(2), released by the kernel if we die).
    Raises FleetBusy at once (or after `timeout` s) when another process holds it, naming that process."""
    from filelock import FileLock, Timeout

    path = lock_path(inventory, lock_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = path.with_suffix(".owner")
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        held_by = owner.read_text().strip() if owner.is_file() else "unknown process"
        raise FleetBusy(f"another run of {inventory} is in progress ({held_by}; lock {path})") from None
    try:
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield path
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


# -------------------------------------------------------------------------------------------------------- CLI

EMITTERS = {"cron": cron_text, "systemd": systemd_text, "github": github_workflow}


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import _Parser   # the CLI's one-line usage errors

    p = _Parser(prog="flashcore-deploy schedule",
                description="Print a ready recipe that runs the fleet every night (docs/NIGHTLY.md).")
    p.add_argument("--emit", required=True, choices=sorted(EMITTERS), help="cron, systemd or github")
    p.add_argument("--inventory", default="inventory.yaml", metavar="FILE", help="default inventory.yaml")
    p.add_argument("--target", default="nightly", metavar="GROUP", help="host, group or all (default nightly)")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="hosts at once (default: the run's own, 8; not for a Slurm cluster)")
    p.add_argument("--at", default="02:17", metavar="HH:MM",
                   help="time of day (default 02:17; cron/systemd: the machine's local time, github: UTC)")
    p.add_argument("--repo", metavar="DIR", help="the checkout to run from (default: the current directory)")
    p.add_argument("--report-dir", default="reports", metavar="DIR", help="reports and history (default reports/)")
    p.add_argument("--runner-label", default="flashcore-ssh", metavar="LABEL",
                   help="github: the self-hosted runner's label (default flashcore-ssh)")
    p.add_argument("--env-file", metavar="FILE", help="systemd: the 0600 file with HF_TOKEN=...")
    return p


def recipe_from_args(a: argparse.Namespace) -> Recipe:
    if a.parallel is not None and a.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    hour, minute = parse_time(a.at)
    repo = Path(a.repo or os.getcwd()).expanduser().resolve()
    if not repo.is_dir():
        raise UsageError(f"--repo {a.repo}: not a directory")
    return Recipe(repo=str(repo), inventory=a.inventory, target=a.target, parallel=a.parallel, hour=hour,
                  minute=minute, report_dir=a.report_dir, runner_label=a.runner_label, env_file=a.env_file or "")


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    a = build_parser().parse_args(list(argv))
    (out or sys.stdout).write(EMITTERS[a.emit](recipe_from_args(a)))
    return 0
