"""A Slurm cluster of the inventory (`clusters:`, `executor: slurm`): its GPUs validated as ONE job array driven
from its login node, into the same per-GPU reports, fleet summary, JUnit and history as an SSH fleet.

    resolve(flags)   the inventory entry (checked by slurm.SlurmConfig) + the flags -> Cluster: the entry and the
                     login node's HostConfig (an inventory host or ssh_config name over SSH, or --local: here)
    run_cluster()    the login node through the runner, with the cluster's steps:
                         connect -> lock -> sync -> install -> token -> suite = the job array -> report
                     then one report per task, each judged against the history first (summary.Judge, as
                     an SSH fleet's hosts are), and the fleet summary (summary.finish_fleet; its rerun file
                     names the cluster). The CLI holds the inventory's lock around it, as for a fleet.

The cut: the login node IS one host of the runner (its lock, sync, install, HF token, cleanup and report are
the runner's, unchanged); only where its suite runs differs. So the runner takes its steps as an option
(RunOptions.steps) and this module gives it STEPS without `gpu` (the login node's GPUs are not the ones validated:
each task records its own) and with `suite` replaced by a step whose one operation is a `Call`: code, not a
command list, because the array is a loop (submit, poll, cancel, collect: pipeline.slurm.run_array) over the run's
connection. The token step writes the token file into the workspace, which is on the shared filesystem: the tasks
read it through HF_TOKEN_PATH, and the runner's cleanup removes it when the run ends, whatever ends it.

A signal sets the run's Cancel; the array's wait observes it (run_array's cancel_event) and then scancels, through
the same connection. Remote.run refuses every command once the Cancel is set, so the Slurm commands run on the
connection with a Cancel of their own (each is short and has its timeout): scancel, the settling polls, the
collection and the results' fetch still happen after Ctrl-C / SIGTERM / the wall limit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path

from pydantic import BaseModel, ValidationError

from pipeline import local, report, slurm, summary
from pipeline.errors import (ConnectError, Interrupted, InventoryError, ParityFailure, PipelineError, StepError,
                             UsageError, overall_exit_code, signal_name)
from pipeline.history import default_path
from pipeline.inventory import Inventory, format_validation, load_inventory
from pipeline.remote import Cancel, Remote
from pipeline.results import HostRunResult, StepResult
from pipeline.runner import RunOptions, guarded, plan_lines as _plan_lines, run_host
from pipeline.settings import (Flags, HostConfig, check_flags, check_model, preset_names, resolve as resolve_hosts,
                               take_inventory_history, target_names)
from pipeline.steps import STEPS, Call, Facts, Outcome, Step, is_hub_model

TASK_FILES = ("parity.json", "junit.xml", "suite.log", "facts.json")
HEARTBEAT_S = 300.0          # progress is printed when the counts change, and at least this often


@dataclass(frozen=True)
class Cluster:
    name: str
    slurm: slurm.SlurmConfig     # the inventory entry with the flags applied (workspace as given: ~ is the login's)
    login: HostConfig            # the login node (local=True: this machine)
    inventory: str = "inventory.yaml"    # the file it came from (its lock is held while the array runs)


# Fleet flags that say nothing to a job array: refused rather than silently ignored.
FLEET_ONLY_FLAGS = {
    "parallel": "--parallel: Slurm runs the tasks (the entry's max_parallel: throttles the array)",
    "gpus": "--gpus: each task gets one GPU from Slurm (the entry's gpus: says how many tasks)",
    "host_timeout": "--host-timeout: the array's wall limit is --timeout (the entry's wall_s:)",
}


# ------------------------------------------------------------------------------------------------ settings


class _Clusters(BaseModel):
    clusters: dict[str, slurm.SlurmConfig] = {}


def check_clusters(inv: Inventory, path: str, presets: tuple[str, ...] = ()) -> dict[str, slurm.SlurmConfig]:
    """Every `clusters:` entry of the inventory, checked (exit 2 naming the file and field); `presets`: the
    model presets a `model:` must name (or a hub id)."""
    try:
        entries = _Clusters(clusters=inv.clusters).clusters
    except ValidationError as e:
        raise InventoryError(format_validation(path, e)) from None
    for name, entry in entries.items():
        if entry.model:
            check_model(entry.model, presets, f"{path}: clusters.{name}.model")
    return entries


def resolve(flags: Flags, code_root: Path) -> Cluster | None:
    """The cluster an inventory target names (or the one name a `--target @FILE` lists: a summary's rerun file),
    every input checked; None when the target is not a cluster (then settings.resolve takes the flags). `--local`:
    the login node is this machine, whatever the entry's `login`. The inventory's `history:` goes into the flags
    as for hosts."""
    if flags.host is not None or not (flags.inventory or flags.target):
        return None
    path = flags.inventory or "inventory.yaml"
    inv = load_inventory(path)
    presets = preset_names(code_root)
    entries = check_clusters(inv, path, presets)
    names = target_names(flags.target) if flags.target else [inv.default_target]
    name = next((n for n in names if n in entries), None)
    if name is None:
        return None
    if len(names) > 1:
        others = ", ".join(n for n in names if n != name)
        raise UsageError(f"--target {flags.target}: the Slurm cluster {name} is validated alone (one job array), "
                         f"not together with {others}")
    for key, why in FLEET_ONLY_FLAGS.items():
        if getattr(flags, key) is not None:
            raise UsageError(f"{why}; it does not apply to the Slurm cluster {name}")
    check_flags(replace(flags, local=False))
    take_inventory_history(flags, inv)
    if flags.model:
        check_model(flags.model, presets)
    over = {"model": flags.model, "workspace": flags.workspace, "python": flags.python, "gpu": flags.require_gpu,
            "wall_s": flags.timeout, "seed": flags.seed}
    cfg = entries[name].model_copy(update={k: v for k, v in over.items() if v is not None})
    if flags.local:
        cfg = cfg.model_copy(update={"login": None})
    return Cluster(name, cfg, _login(name, cfg, flags, inv, path, code_root), path)


def _login(name: str, cfg: slurm.SlurmConfig, flags: Flags, inv: Inventory, path: str, code_root: Path) -> HostConfig:
    """The login node as the runner's host: an inventory host (its layering), else an address or ssh_config
    name (as --host), else this machine; the workspace, python and model are the cluster's."""
    own = {"workspace": cfg.workspace, "python": cfg.python, "model": cfg.suite_model, "require_gpu": cfg.gpu,
           "timeout": None}     # the tasks' GPU (the login node has no gpu step); --timeout: the array's wall limit
    if cfg.login is None:
        f = Flags(local=True, lock_timeout=flags.lock_timeout, **own)
    elif cfg.login in inv.hosts:
        f = replace(flags, host=None, target=cfg.login, inventory=path, local=False, **own)
    else:
        f = replace(flags, host=cfg.login, target=None, inventory=None, local=False, **own)
    (host,) = resolve_hosts(f, code_root)
    return replace(host, name=name)


def describe(c: Cluster) -> str:
    """One line for --list-hosts."""
    s, login = c.slurm, c.login
    via = "this machine, no SSH" if login.local else f"{login.user}@{login.address}:{login.port}"
    where = "".join(f"\t{k} {v}" for k, v in (("partition", s.partition), ("account", s.account)) if v)
    tasks = f"{s.gpus} GPUs ({s.gpu_request})" if s.uses_gpu else f"{s.gpus} CPU tasks (no GPU)"
    return (f"{c.name}\tSlurm via {via}{where}\t{tasks}, time {s.time}, wall {s.wall_s:g} s\tmodel {s.suite_model}"
            f"\tpython {login.python}\tworkspace {s.workspace}")


# --------------------------------------------------------------------------------------------------- steps


@dataclass
class ArrayDone:
    """What the suite step's Call returns: the array, and one HostRunResult per task."""

    run: slurm.ArrayRun
    cfg: slurm.SlurmConfig                      # as submitted (absolute workspace, the tasks' python and env)
    tasks: list[HostRunResult] = field(default_factory=list)
    records: list[slurm.TaskRecord] = field(default_factory=list)   # in the fetched copy when the fetch worked
    fetch_error: str = ""


def node_config(cfg: slurm.SlurmConfig, f: Facts) -> slurm.SlurmConfig:
    """The entry as the tasks see it: the workspace as the login node resolved it, the venv the install step built
    there (with --skip install: the python itself), the forwarded settings (HF_ENDPOINT) in their environment."""
    python = f.lay["venv_python"] if "install" not in f.skip else f.cfg.python
    return cfg.model_copy(update={"workspace": f.lay["workspace"], "python": python,
                                  "env": {**f.here.environ, **cfg.env}})


def token_path(f: Facts) -> str | None:
    """The token file the token step wrote on the shared filesystem, when the tasks need it."""
    return f.lay["token"] if is_hub_model(f.model) and f.here.token and "token" not in f.skip else None


def plan_array(c: Cluster, suite_command: str | None, done: list[ArrayDone], f: Facts) -> list:
    cfg = node_config(c.slurm, f)
    script = slurm.render_script(cfg, suite_command=suite_command, token_path=token_path(f))
    job_dir = f"{slurm.runs_dir(cfg.workspace)}/<job id>"
    lines = (f"# one job array of {cfg.gpus} task(s), submitted held from the login node; polled with one squeue "
             f"per poll ({cfg.poll_min_s:g} s -> {cfg.poll_max_s:g} s), wall limit {cfg.wall_s:g} s, then "
             "scancel; results fetched from " + job_dir,
             *("$ " + x for x in slurm.submit_command(cfg, "<the script below>").splitlines()),
             "$ " + slurm.squeue_command(cfg, 0).replace("--jobs=0", "--jobs=<job id>"),
             "$ " + slurm.scancel_command(cfg, "<job id>") + "    (wall limit, Ctrl-C, SIGTERM)",
             f"# {job_dir}/validate.sbatch:", *("    " + x for x in script.splitlines()))
    return [Call(partial(drive_array, cfg, script, done, c.name), describe=lines)]


class LoginShell:
    """How the Slurm commands reach the login node: through the run's connection, with a Cancel of their own
    (scancel, the settling polls and the collection must run after the run's Cancel is set; each is short and has
    its timeout). After a dropped connection they raise, as every command does (pipeline.ssh.SSHRemote)."""

    def __init__(self, remote: Remote):
        self.remote = remote

    def run(self, command: str, *, timeout: float):
        saved, self.remote.cancel = self.remote.cancel, Cancel()
        try:
            return self.remote.run(command, timeout=timeout)
        finally:
            self.remote.cancel = saved

    def get(self, remote_path: str, local_path: str) -> bool:
        return self.remote.get(remote_path, local_path)


def drive_array(cfg: slurm.SlurmConfig, script: str, done: list[ArrayDone], label: str, *, remote: Remote,
                cancel: Cancel, say: Callable[[str], None], art_dir: Path) -> ArrayDone:
    """Submit, wait (progress printed), cancel when the run's Cancel or the wall limit says so, collect, fetch the
    job's folder into the report's artifact folder, and make every task's HostRunResult. After a dropped
    connection the job is cancelled over a new one, and the run ends UNREACHABLE like an SSH host's."""
    shell, submitted = LoginShell(remote), []

    def on_submit(run: slurm.ArrayRun) -> None:
        submitted.append(run)
        say(f"[{label} suite] submitted job {run.job_id} ({run.tasks} tasks): {run.script_path}")

    try:
        run = slurm.run_array(shell, cfg, script, cancel_event=cancel.event, on_submit=on_submit,
                              on_progress=_progress_printer(say, f"[{label} suite]"))
    except ConnectError:
        if submitted:
            _cancel_over_fresh_connection(remote, cfg, submitted[0], say, label)
        raise
    out = ArrayDone(run, cfg, records=run.records)
    try:
        out.records = slurm.local_records(run.records, slurm.fetch_results(shell, run, art_dir))
    except (PipelineError, OSError) as e:
        out.fetch_error = f"the job's results could not be fetched: {e}"
    out.tasks = slurm.host_results(run, cfg, out.records, cancel.signum or None)
    done.append(out)
    return out


def _progress_printer(say: Callable[[str], None], prefix: str) -> Callable[[slurm.Progress], None]:
    last: dict[str, object] = {"counts": None, "at": 0.0}

    def on_progress(p: slurm.Progress) -> None:
        counts = (p.pending, p.running, p.done)
        if counts != last["counts"] or time.monotonic() - float(last["at"]) >= HEARTBEAT_S:
            say(f"{prefix} {p.line()}")
            last.update(counts=counts, at=time.monotonic())
    return on_progress


def _cancel_over_fresh_connection(remote: Remote, cfg: slurm.SlurmConfig, run: slurm.ArrayRun,
                                  say: Callable[[str], None], label: str) -> None:
    """The connection dropped while the job was queued or running: scancel it over a new one, once."""
    try:
        fresh = remote.reconnect()
        try:
            slurm.cancel(fresh, cfg, run.job_id)
        finally:
            fresh.close()
        say(f"[{label} suite] the connection dropped: cancelled job {run.job_id} over a new one")
    except PipelineError as e:
        say(f"[{label} suite] the connection dropped and job {run.job_id} could not be cancelled ({e}): "
            f"cancel it on the login node with scancel {run.job_id}")


def conclude_array(f: Facts, out: list) -> Outcome:
    """The login node's suite step: the array's end in Slurm's words, failed unless every task passed."""
    done: ArrayDone = out[0]
    run, tasks = done.run, done.tasks
    detail = run.summary() + (f"; {done.fetch_error}" if done.fetch_error else "")
    each = "one GPU each" if done.cfg.uses_gpu else "on the CPU"
    notes = [f"Validated by Slurm: job {run.job_id}, an array of {run.tasks} tasks ({each}; {run.script_path}); "
             "each task has its own report, the fleet summary lists them all."] + [f"Slurm: {e}" for e in run.errors]
    code = overall_exit_code([t.exit_code for t in tasks])
    step = StepResult("suite", "ok" if code == 0 else "failed", detail=detail, command=run.script_path)
    bad = [t for t in tasks if t.exit_code]
    why = "; ".join(t.error or t.verdict for t in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if code == 0 and not done.fetch_error:
        return Outcome(step, {"notes": notes})
    if code > 128:
        error: PipelineError = Interrupted(f"interrupted ({signal_name(code - 128)}): cancelled job {run.job_id} "
                                           f"(scancel); {run.summary()}", code - 128)
    elif code == 1:
        error = ParityFailure(f"parity failed on {sum(t.exit_code == 1 for t in tasks)} of {len(tasks)} "
                              f"tasks: {why}")
    else:
        error = StepError(f"{len(bad)} of {len(tasks)} tasks did not pass ({run.ended_by}): {why}" if bad
                          else done.fetch_error)
    step.status = "failed"
    return Outcome(step, {"notes": notes}, error=error)


def cluster_steps(c: Cluster, suite_command: str | None, done: list[ArrayDone]) -> tuple[Step, ...]:
    """The runner's steps for the login node: no `gpu`, and `suite` = the job array (its Call fills `done`)."""
    array = Step("suite", partial(plan_array, c, suite_command, done), conclude_array)
    return tuple(array if s.name == "suite" else s for s in STEPS if s.name != "gpu")


# ----------------------------------------------------------------------------------------------------- run


@dataclass
class ClusterOutcome:
    exit_code: int
    login: HostRunResult                 # the login node's run: sync, install, token, the array's end
    tasks: dict[str, HostRunResult]      # one per array task, each with its report: "<job>_<task> on <node>"
    summary: dict[str, str]              # the fleet summary's files by kind


def plan_lines(c: Cluster, opts: RunOptions) -> list[str]:
    """--dry-run: the login node's steps and the array (script and Slurm commands), from assumed facts."""
    return _plan_lines(c.login, replace(opts, steps=cluster_steps(c, opts.suite_command, [])))


def run_cluster(c: Cluster, opts: RunOptions, history: Path | None = None) -> ClusterOutcome:
    """The login node through the runner (the array as its suite step), then one report per task, each judged
    against the history (`history`, default REPORT_DIR/history.sqlite) before it is written, as an SSH fleet's
    hosts are, and the fleet summary (JUnit, the history recorded, a rerun file naming the cluster). Exit code: the
    worst of the login node's run and the fleet's (a confirmed regression at least 1; an interruption wins)."""
    judge = summary.Judge(history or default_path(opts.report_dir))
    opts = replace(opts, judge=judge)
    done: list[ArrayDone] = []
    login = run_host(c.login, replace(opts, steps=cluster_steps(c, opts.suite_command, done)))
    tasks = write_task_reports(done[0], login, c.name, opts) if done else {}
    fleet = summary.finish_fleet(list(tasks.values()) or [login], opts.report_dir, judge=judge, target=c.name,
                                 rerun_target=c.name, started_at=login.started_at, environ=opts.environ)
    return ClusterOutcome(overall_exit_code([login.exit_code, fleet.exit_code]), login, tasks, fleet.paths)


def write_task_reports(done: ArrayDone, login: HostRunResult, name: str,
                       opts: RunOptions) -> dict[str, HostRunResult]:
    """Each task's report beside the login node's: REPORT_DIR/<cluster>-<job>_<task>-<UTC>.md + .json, with the
    versions and code the login node installed, links to the task's files fetched into the login report's
    folder, and `opts.judge`'s regressions at its top."""
    report_dir = Path(opts.report_dir)
    started = datetime.fromisoformat(login.started_at)
    token, _ = local.hf_token(opts.environ)
    for res, rec in zip(done.tasks, done.records):
        res.versions = {**login.versions, **res.versions}
        res.sync, res.reproduce = login.sync, login.reproduce
        res.started_at = res.started_at or login.started_at
        res.notes.append(f"Prepared once on the login node for every task (sync, install, token): "
                         f"{login.artifacts.get('report_md', '-')}.")
        res.artifacts = _task_artifacts(Path(rec.task_dir), report_dir, done.run.job_dir, rec.task_id)
        if opts.judge is not None:
            guarded(lambda: opts.judge(res), res.notes, "the history's judgement", [token] if token else [], opts)
        stem = report.reserve_stem(report_dir, f"{name}-{done.run.job_id}_{rec.task_id}", started)
        report.write(res, report_dir, stem, opts.template, [token] if token else [])
    return {f"{done.run.job_id}_{rec.task_id}" + (f" on {rec.node}" if rec.node else ""): res
            for res, rec in zip(done.tasks, done.records)}


def _task_artifacts(task_dir: Path, report_dir: Path, job_dir: str, task_id: int) -> dict[str, str]:
    """The task's files that came back, relative to the report folder (the task's Slurm output beside them)."""
    files = {name: task_dir / name for name in TASK_FILES}
    files["slurm.out"] = task_dir.parent / f"slurm-{task_id}.out"
    return {name: os.path.relpath(path, report_dir) for name, path in files.items() if path.is_file()}
