"""Validate the GPUs of a Slurm cluster as ONE job array, driven from its login node.

    render_script -> submit: sbatch --parsable --hold, mkdir the job's folder, scontrol release (one round trip)
      -> wait: one squeue for the whole array per poll (2 s -> 30 s backoff), progress callback, wall limit,
         cancel event / Ctrl-C -> scancel, then polls until Slurm says every task ended
      -> collect: every task's facts.json in one read -> one TaskRecord per array task, never silently missing

On the shared filesystem (WS: the workspace, synced and installed once on the login node by the caller):
    WS/slurm/<job id>/validate.sbatch       the script as submitted (templates/slurm/validate.sbatch.j2)
    WS/slurm/<job id>/slurm-<task>.out      Slurm's own output of each task (what the script says before the suite)
    WS/slurm/<job id>/<task>/               facts.json, parity.json, junit.xml, suite.log

Builders and parsers are pure; their fixtures (tests/pipeline/fixtures/slurm/) are real outputs of Debian 12's
slurm 22.05. All I/O goes through the caller's command runner: pipeline.remote.Remote (SSH to the login node, or
LocalRemote on it), whose `run(command, timeout=...)` returns a CommandResult.

Status comes from `squeue --array --states=all --Format=NAME:|,...`: the -O field names and the ':|' suffix are
the same from 22.05 to 25.11; exit_code is read in both of its forms (22.05 prints the raw wait status, 23.02+
"code:signal"). Not `--json` (its schema changes with every data_parser version) and not sacct (it needs
slurmdbd, which many clusters and the test cluster lack): squeue keeps an ended task for MinJobAge (default
300 s), ten times the longest poll interval.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import signal
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import jinja2
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import commands, parse
from pipeline.errors import EXIT_GPU, EXIT_OK, EXIT_PARITY, EXIT_STEP, StepError
from pipeline.inventory import check_env_names
from pipeline.remote import CommandResult
from pipeline.settings import DEFAULTS
from pipeline.results import GpuInfo, HostRunResult, StepResult

q = shlex.quote
TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "slurm" / "validate.sbatch.j2"
TINY = "tiny"
TASK_DIR = "@@TASK_DIR@@"          # placeholder in the suite's argv for the shell's "$task_dir"
SQUEUE_FIELDS = ("ArrayJobID", "ArrayTaskID", "State", "Reason", "NodeList", "exit_code", "StartTime", "EndTime")

# Slurm's job states (squeue --helpstate / JOB STATE CODES), by what they mean for a task's life.
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})
# anything else (RUNNING, COMPLETING, SUSPENDED, STOPPED, SIGNALING, STAGE_OUT, RESIZING, a state of a newer
# Slurm) counts as running: never taken for an end; the wall limit bounds the wait
UNKNOWN = "UNKNOWN"                # our word, not Slurm's: a task Slurm never reported
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
                         r"|UNLIMITED|INFINITE)$")
_OWN_OPTIONS = ("--array", "-a", "--output", "-o", "--error", "-e", "--parsable", "--hold", "-H", "--job-name",
                "-J", "--wrap")


class SlurmError(StepError):
    """sbatch / squeue / scancel failed; the message carries Slurm's own words."""


class Runner(Protocol):
    def run(self, command: str, *, timeout: float) -> CommandResult: ...


# ------------------------------------------------------------------------------------------------ the config


class SlurmConfig(BaseModel):
    """An inventory entry `executor: slurm`: one job array, one task per GPU (CPU tasks for `gpu: none`).

        executor: slurm
        login: lab-login                  # an inventory host (SSH as today); omitted: this machine (--local)
        workspace: /shared/alice/flashcore
        partition: gpu
        account: proj-42
        gpus: 64
        time: "00:30:00"
        sbatch_options: ["--qos=normal", "--constraint=h100"]
        setup: ["module load cuda/12.4"]
    """

    model_config = ConfigDict(extra="forbid")
    executor: Literal["slurm"] = "slurm"
    login: str | None = Field(None, description="login node: an inventory host or address (SSH); None: this machine")
    workspace: str = Field(..., description="on the filesystem the nodes share; absolute or ~/...")
    partition: str | None = None
    account: str | None = None
    gpus: int = Field(1, ge=1, description="how many GPUs to validate: the array's size")
    gpu: str = Field("any", description="'none': CPU tasks (no GPU asked for, the suite on the CPU)")
    gpu_request: str = Field("--gres=gpu:1", description="how a task asks for its GPU (or --gpus-per-task=1, "
                                                         "--gres=gpu:h100:1)")
    cpus_per_task: int = Field(1, ge=1)
    time: str = Field("00:30:00", description="each task's Slurm time limit (sbatch --time)")
    sbatch_options: list[str] = Field(default_factory=list, description="more #SBATCH lines, e.g. --qos=debug")
    python: str | None = Field(None, description="the interpreter whose torch/triton the tasks use: WS/.venv is "
                                                  "built on it on the login node and the tasks run that venv "
                                                  "(default: the login host's python); the same path on the nodes")
    model: str | None = Field(None, description=f"default {DEFAULTS.model} on GPUs, {TINY} on CPU tasks")
    seed: int | None = Field(None, ge=0, description="the suite's --parity-seed (None: its default, 0)")
    setup: list[str] = Field(default_factory=list, description="shell lines each task runs first (module load ...)")
    env: dict[str, str] = Field(default_factory=dict, description="for the Slurm commands and every task")
    max_parallel: int | None = Field(None, ge=1, description="array throttle: at most N tasks at once")
    job_name: str = "flashcore-validate"
    wall_s: float = Field(3600.0, gt=0, description="the pipeline's limit for the whole array, queue included")
    poll_min_s: float = Field(2.0, gt=0)
    poll_max_s: float = Field(30.0, gt=0)
    settle_s: float = Field(120.0, gt=0, description="after scancel: how long to wait for Slurm to end the tasks")

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _SLURM_TIME.match(v.strip()):
            raise ValueError(f"not a Slurm time limit: {v!r} (minutes, HH:MM:SS or D-HH:MM:SS)")
        return v.strip()

    @field_validator("login", "partition", "account", "job_name")
    @classmethod
    def _word(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or re.search(r"[\s'\"\\$`]", v)):
            raise ValueError(f"must be one word without quotes or $: {v!r}")
        return v

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: str) -> str:
        if not v.strip() or any(c in v for c in "\n\r\0"):
            raise ValueError(f"must be a GPU name (H100), any or none, got {v!r}")
        return v.strip()

    @field_validator("gpu_request")
    @classmethod
    def _gpu_request(cls, v: str) -> str:
        if not re.match(r"^--(gres=gpu|gpus-per-task=|gpus=)[\w:=,.-]*$", v):
            raise ValueError(f"must be --gres=gpu[:TYPE]:1 or --gpus-per-task=1, got {v!r}")
        return v

    @field_validator("sbatch_options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for opt in v:
            name = opt.split("=", 1)[0].split()[0] if opt.strip() else ""
            if not name.startswith("-") or "\n" in opt:
                raise ValueError(f"not an sbatch option: {opt!r}")
            if name in _OWN_OPTIONS:
                raise ValueError(f"{name} is set by the pipeline itself")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_env_names(v)

    @model_validator(mode="after")
    def _poll(self) -> SlurmConfig:
        if self.poll_max_s < self.poll_min_s:
            raise ValueError("poll_max_s must be >= poll_min_s")
        return self

    @property
    def uses_gpu(self) -> bool:
        return self.gpu.strip().lower() != "none"

    @property
    def suite_model(self) -> str:
        return self.model or (DEFAULTS.model if self.uses_gpu else TINY)

    def with_home(self, home: str) -> SlurmConfig:
        """The workspace made absolute with the login node's $HOME (as the SSH steps do)."""
        return self.model_copy(update={"workspace": commands.expand_home(self.workspace, home).rstrip("/")})


def runs_dir(workspace: str) -> str:
    return f"{workspace.rstrip('/')}/slurm"


# --------------------------------------------------------------------------------------- pure builders


def suite_line(cfg: SlurmConfig) -> str:
    """The parity suite's command line (commands.pytest_argv, as on an SSH host), writing into "$task_dir"."""
    python = cfg.python or commands.layout(cfg.workspace)["venv_python"]
    argv = commands.pytest_argv(python, cfg.suite_model, f"{TASK_DIR}/parity.json", f"{TASK_DIR}/junit.xml",
                                "cuda" if cfg.uses_gpu else "cpu", cfg.seed)
    return shlex.join(argv).replace(TASK_DIR, '"$task_dir"')


def render_script(cfg: SlurmConfig, *, suite_command: str | None = None, token_path: str | None = None) -> str:
    """The sbatch script. `suite_command`: a shell command each task runs instead of the suite (a testing aid, as
    --suite-command is for SSH hosts); `token_path`: an HF token file on the shared filesystem (mode 0600)."""
    if not cfg.workspace.startswith("/"):
        raise ValueError(f"workspace must be absolute here (with_home first): {cfg.workspace!r}")
    env = dict(cfg.env)
    if not cfg.uses_gpu:
        env["TRITON_INTERPRET"] = "1"   # CPU tasks on a GPU node: Triton's interpreter all the same
    if token_path:
        env["HF_TOKEN_PATH"] = token_path
    jenv = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    jenv.filters["q"] = q
    return jenv.get_template(TEMPLATE.name).render(
        tasks=cfg.gpus, gpu=cfg.uses_gpu, gpu_request=cfg.gpu_request, partition=cfg.partition,
        account=cfg.account, time=cfg.time, cpus_per_task=cfg.cpus_per_task, max_parallel=cfg.max_parallel,
        job_name=cfg.job_name, sbatch_options=cfg.sbatch_options, runs_dir=runs_dir(cfg.workspace),
        workspace=cfg.workspace, setup=cfg.setup, env=sorted(env.items()),
        suite=f"( {suite_command} )" if suite_command else suite_line(cfg))   # a subshell: its `exit` is its own


def _env_prefix(env: Mapping[str, str]) -> str:
    return shlex.join(["env", *(f"{k}={v}" for k, v in sorted(env.items()))]) + " " if env else ""


def submit_command(cfg: SlurmConfig, script: str) -> str:
    """One round trip: write the script, submit it held, make the job's folder (Slurm does not create the folder
    of --output), move the script there, release. Prints `@@sbatch=<sbatch --parsable output>`."""
    runs, env = q(runs_dir(cfg.workspace)), _env_prefix(cfg.env)
    delim = "FLASHCORE_SBATCH_" + hashlib.sha256(script.encode()).hexdigest()[:16]
    body = script if script.endswith("\n") else script + "\n"
    return (f"set -e; mkdir -p {runs}; f=$(mktemp {runs}/submit.XXXXXX); trap 'rm -f \"$f\"' EXIT\n"
            f"cat > \"$f\" <<'{delim}'\n{body}{delim}\n"
            f"out=$({env}sbatch --parsable --hold \"$f\"); jid=${{out%%;*}}; echo \"@@sbatch=$out\"\n"
            f"mkdir -p {runs}/\"$jid\"; mv \"$f\" {runs}/\"$jid\"/validate.sbatch; {env}scontrol release \"$jid\"")


def squeue_command(cfg: SlurmConfig, job_id: int) -> str:
    fmt = ",".join(f"{name}:|" for name in SQUEUE_FIELDS)
    return f"{_env_prefix(cfg.env)}squeue --jobs={job_id} --array --states=all --noheader --Format={q(fmt)}"


def scancel_command(cfg: SlurmConfig, job_id: int | str) -> str:
    """`job_id`: the whole array, or `<job>_<task>` for one task."""
    return f"{_env_prefix(cfg.env)}scancel {job_id}"


def collect_command(job_dir: str) -> str:
    """Every task's facts.json (one JSON line each), in one read."""
    return f"find {q(job_dir)} -mindepth 2 -maxdepth 2 -name facts.json -exec cat {{}} + 2>/dev/null; true"


# ------------------------------------------------------------------------------------------- pure parsers


@dataclass(frozen=True)
class TaskStatus:
    """One array task as squeue shows it."""

    state: str
    reason: str = ""
    node: str = ""
    exit_code: int | None = None
    signal: int | None = None
    started_at: str = ""
    ended_at: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def pending(self) -> bool:
        return self.state in PENDING_STATES


def parse_sbatch(stdout: str) -> tuple[int, str]:
    """`sbatch --parsable` prints `jobid` or `jobid;cluster` (here after @@sbatch=) -> (job id, cluster)."""
    m = re.search(r"^(?:@@sbatch=)?(\d+)(?:;(\S+))?\s*$", stdout, re.MULTILINE)
    if not m:
        raise SlurmError(f"sbatch printed no job id: {stdout.strip()[-300:]!r}")
    return int(m.group(1)), m.group(2) or ""


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """squeue's exit_code -> (exit status, signal): "3:0" (23.02+) or the raw wait status "768" (22.05)."""
    text = text.strip()
    if ":" in text:
        code, _, sig = text.partition(":")
        return (int(code), int(sig)) if code.isdigit() and sig.isdigit() else (None, None)
    if not text.isdigit():
        return None, None
    status = int(text)
    return (None, status & 0x7F) if status & 0x7F else (status >> 8, 0)


def _time_field(text: str) -> str:
    return "" if text in ("", "N/A", "NONE", "Unknown", "None") else text


def parse_squeue(stdout: str, job_id: int) -> dict[int, TaskStatus]:
    """Lines of `squeue --array --Format=...:|` -> {array task id: TaskStatus}, only for `job_id`."""
    tasks: dict[int, TaskStatus] = {}
    for line in stdout.splitlines():
        parts = line.split("|")
        if len(parts) < len(SQUEUE_FIELDS) or not parts[0].strip().isdigit() or int(parts[0]) != job_id:
            continue
        _, task, state, reason, node, exit_code, start, end = (p.strip() for p in parts[:len(SQUEUE_FIELDS)])
        if not task.isdigit():
            continue
        state = state.split()[0] if state else UNKNOWN
        code, sig = parse_exit_code(exit_code) if state in ENDED_STATES else (None, None)
        tasks[int(task)] = TaskStatus(state=state,
                                      reason="" if reason in ("None", "(null)") else reason, node=node,
                                      exit_code=code, signal=sig, started_at=_time_field(start),
                                      ended_at=_time_field(end))
    return tasks


def job_unknown(stderr: str) -> bool:
    """squeue's answer for a job slurmctld no longer holds (MinJobAge passed) or never had."""
    return "Invalid job id" in stderr


def parse_facts(stdout: str) -> dict[int, dict[str, Any]]:
    """The facts.json lines the tasks wrote -> {array task id: facts}. A line that is not JSON is skipped."""
    out: dict[int, dict[str, Any]] = {}
    for line in stdout.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), int):
            out[doc["task"]] = doc
    return out


@dataclass(frozen=True)
class Progress:
    total: int
    pending: int
    running: int
    done: int
    elapsed_s: float
    states: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.done == self.total

    def line(self) -> str:
        ended = ", ".join(f"{k} {v}" for k, v in sorted(self.states.items()) if k in ENDED_STATES)
        return (f"{self.pending} pending, {self.running} running, {self.done} done of {self.total}"
                + (f" ({ended})" if ended else "") + f" after {self.elapsed_s:.0f} s")


def progress(statuses: Mapping[int, TaskStatus], total: int, elapsed_s: float) -> Progress:
    """Counts over all `total` tasks; one Slurm has not listed yet counts as pending."""
    states = Counter(s.state for s in statuses.values())
    done = sum(1 for s in statuses.values() if s.ended)
    pending = sum(1 for s in statuses.values() if s.pending) + (total - len(statuses))
    return Progress(total, pending, total - done - pending, done, round(elapsed_s, 1), dict(states))


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TaskRecord:
    """One array task (one GPU) at the end: Slurm's own state and reason, where it ran, what it left."""

    task_id: int
    state: str                       # Slurm's final state, or UNKNOWN when Slurm never listed the task
    reason: str = ""                 # Slurm's reason with it (for a task that never ran: why it waited)
    state_at_cancel: str = ""        # PENDING / RUNNING when the pipeline cancelled the job ('' if it did not)
    node: str = ""
    gpu_uuid: str = ""
    gpu_name: str = ""
    job_gpus: str = ""               # SLURM_JOB_GPUS: the GPU's index on its node (not remapped by cgroups)
    cuda_visible_devices: str = ""
    exit_code: int | None = None     # the suite's, from facts.json; else Slurm's
    signal: int | None = None
    ran: bool = False                # the task started on a node
    started_at: str = ""             # UTC from facts.json when the task wrote it, else squeue's (local time)
    ended_at: str = ""
    duration_s: float | None = None  # the task's own run time (facts.json)
    task_dir: str = ""
    parity_json: str = ""            # path on the shared filesystem; '' when the task wrote none

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0 and bool(self.parity_json)

    def describe(self) -> str:
        """One line for a summary: Slurm's words first."""
        why = f" ({self.reason})" if self.reason else ""
        where = f" on {self.node}" + (f" ({self.gpu_uuid})" if self.gpu_uuid else "") if self.node else ""
        code = "" if self.exit_code is None else f", exit {self.exit_code}"
        code += f", signal {self.signal}" if self.signal else ""
        if self.state == UNKNOWN:
            return f"task {self.task_id}: UNKNOWN: Slurm never reported it{why}"
        if not self.ran:
            at = f"{self.state_at_cancel} when the pipeline cancelled the job, then " if self.state_at_cancel else ""
            return f"task {self.task_id}: never ran: {at}{self.state}{why}"
        at = f" (was {self.state_at_cancel} when the pipeline cancelled the job)" if self.state_at_cancel else ""
        return f"task {self.task_id}: {self.state}{why}{where}{code}{at}"


def task_records(tasks: int, job_dir: str, statuses: Mapping[int, TaskStatus], facts: Mapping[int, dict],
                 at_cancel: Mapping[int, TaskStatus] | None = None) -> list[TaskRecord]:
    """One record for every task 0..tasks-1, whatever Slurm and the task left behind."""
    records = []
    for tid in range(tasks):
        st, fa = statuses.get(tid), facts.get(tid) or {}
        before = (at_cancel or {}).get(tid)
        code = fa.get("exit_code") if isinstance(fa.get("exit_code"), int) else (st.exit_code if st else None)
        records.append(TaskRecord(
            task_id=tid, state=st.state if st else UNKNOWN, reason=st.reason if st else "",
            state_at_cancel=before.state if before is not None and not before.ended else "",
            node=(st.node if st else "") or str(fa.get("hostname", "")), gpu_uuid=str(fa.get("gpu_uuid", "")),
            gpu_name=str(fa.get("gpu_name", "")), job_gpus=str(fa.get("job_gpus", "")),
            cuda_visible_devices=str(fa.get("cuda_visible_devices", "")),
            exit_code=code, signal=(st.signal or None) if st else None,
            ran=bool(fa) or bool(st and st.node),
            started_at=_utc(fa.get("started")) or (st.started_at if st and st.node else ""),
            ended_at=_utc(fa.get("ended")) or (st.ended_at if st and st.ended else ""),
            duration_s=_span(fa),
            task_dir=f"{job_dir}/{tid}", parity_json=f"{job_dir}/{tid}/parity.json" if fa.get("parity_json") else ""))
    return records


def _span(facts: Mapping[str, Any]) -> float | None:
    started, ended = facts.get("started"), facts.get("ended")
    return float(ended - started) if _utc(started) and _utc(ended) else None


def _utc(epoch: Any) -> str:
    """facts.json's epoch seconds -> ISO 8601 UTC (squeue's times are the cluster's local time, zone unnamed)."""
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return ""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


# ---------------------------------------------------------------------------------------------- executor


@dataclass
class ArrayRun:
    """What one job array came to."""

    job_id: int
    cluster: str
    tasks: int
    job_dir: str
    script_path: str
    ended_by: str = "finished"       # finished | wall limit | cancelled | interrupted | vanished
    records: list[TaskRecord] = field(default_factory=list)
    polls: int = 0
    submit_s: float = 0.0
    wait_s: float = 0.0
    collect_s: float = 0.0
    last_progress: Progress | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> list[TaskRecord]:
        return [r for r in self.records if r.ok]

    def summary(self) -> str:
        states = Counter(r.state for r in self.records)
        return (f"job {self.job_id}: {len(self.passed)} of {self.tasks} tasks completed with results ("
                + ", ".join(f"{k} {v}" for k, v in sorted(states.items())) + f"); {self.ended_by}")


def _check(res: CommandResult, what: str) -> None:
    if not res.ok:
        raise SlurmError(f"{what} failed (exit {res.exit_code}): {parse.brief(res.stderr or res.stdout)}")


def submit(runner: Runner, cfg: SlurmConfig, script: str, timeout: float = 120) -> ArrayRun:
    res = runner.run(submit_command(cfg, script), timeout=timeout)
    try:
        job_id, cluster = parse_sbatch(res.stdout)
    except SlurmError:
        _check(res, "sbatch")
        raise
    job_dir = f"{runs_dir(cfg.workspace)}/{job_id}"
    run = ArrayRun(job_id, cluster, cfg.gpus, job_dir, f"{job_dir}/validate.sbatch")
    if res.exit_code != 0:   # submitted but not released: do not leave it held in the queue
        runner.run(scancel_command(cfg, job_id), timeout=60)
        _check(res, f"releasing job {job_id} (cancelled it)")
    return run


def poll(runner: Runner, cfg: SlurmConfig, job_id: int, timeout: float = 60) -> dict[int, TaskStatus] | None:
    """One squeue for the whole array. None: Slurm no longer knows the job."""
    res = runner.run(squeue_command(cfg, job_id), timeout=timeout)
    if res.exit_code != 0 and job_unknown(res.stderr):
        return None
    _check(res, "squeue")
    return parse_squeue(res.stdout, job_id)


def cancel(runner: Runner, cfg: SlurmConfig, job_id: int, timeout: float = 60) -> None:
    _check(runner.run(scancel_command(cfg, job_id), timeout=timeout), "scancel")


@dataclass
class _Watch:
    """The wait loop's state: the last status of every task Slurm has listed (kept when it stops listing one)."""

    known: dict[int, TaskStatus] = field(default_factory=dict)
    polls: int = 0
    failures: int = 0
    vanished: bool = False


def _poll_once(runner: Runner, cfg: SlurmConfig, run: ArrayRun, w: _Watch, timeout: float = 60) -> None:
    try:
        statuses = poll(runner, cfg, run.job_id, timeout)
    except SlurmError as e:     # a busy slurmctld times out now and then: five in a row is an error
        w.failures += 1
        run.errors.append(str(e))
        if w.failures >= 5:
            raise
        return
    w.polls, w.failures = w.polls + 1, 0
    if statuses is None:
        w.vanished = True
    else:
        w.known.update(statuses)


def _wait(runner: Runner, cfg: SlurmConfig, run: ArrayRun, w: _Watch, t0: float, cancel_event: threading.Event,
          on_progress: Callable[[Progress], None] | None) -> str:
    interval = cfg.poll_min_s
    while True:
        _poll_once(runner, cfg, run, w)
        run.last_progress = progress(w.known, run.tasks, time.monotonic() - t0)
        if on_progress:
            on_progress(run.last_progress)
        if run.last_progress.finished:
            return "finished"
        if w.vanished:
            return "vanished"
        left = cfg.wall_s - (time.monotonic() - t0)
        if left <= 0:
            return "wall limit"
        if cancel_event.wait(min(interval, left)):
            return "cancelled"
        interval = min(interval * 1.5, cfg.poll_max_s)


def _settle(runner: Runner, cfg: SlurmConfig, run: ArrayRun, w: _Watch) -> None:
    """After scancel: poll until Slurm says every task ended (KillWait, epilogs), for at most settle_s in all (a
    controller that does not answer must not hold a Ctrl-C for minutes); the records then come from what was
    seen last."""
    t0, interval = time.monotonic(), min(1.0, cfg.poll_min_s)
    while (left := cfg.settle_s - (time.monotonic() - t0)) > 0:
        try:
            _poll_once(runner, cfg, run, w, timeout=max(1.0, left))
        except SlurmError:          # squeue kept failing (said in run.errors)
            return
        if w.vanished or progress(w.known, run.tasks, 0).finished:
            return
        time.sleep(min(interval, max(0.0, cfg.settle_s - (time.monotonic() - t0))))
        interval = min(interval * 1.5, cfg.poll_max_s)
    run.errors.append(f"tasks still not ended {cfg.settle_s:g} s after scancel")


def collect(runner: Runner, run: ArrayRun, statuses: Mapping[int, TaskStatus],
            at_cancel: Mapping[int, TaskStatus] | None = None, timeout: float = 300) -> list[TaskRecord]:
    res = runner.run(collect_command(run.job_dir), timeout=timeout)
    return task_records(run.tasks, run.job_dir, statuses, parse_facts(res.stdout), at_cancel)


def run_array(runner: Runner, cfg: SlurmConfig, script: str, *, cancel_event: threading.Event | None = None,
              on_submit: Callable[[ArrayRun], None] | None = None,
              on_progress: Callable[[Progress], None] | None = None) -> ArrayRun:
    """Submit the array, wait for it (bounded), cancel it when the wall limit, the cancel event or Ctrl-C comes
    first, and collect one record per task. Raises SlurmError when nothing was submitted or squeue keeps failing,
    and the runner's own error when the connection drops (both after a best-effort scancel; `on_submit` has told
    the caller the job id, to cancel it over a fresh connection)."""
    t0 = time.monotonic()
    run = submit(runner, cfg, script)
    run.submit_s = round(time.monotonic() - t0, 3)
    if on_submit:
        on_submit(run)
    w = _Watch()
    try:
        run.ended_by = _wait(runner, cfg, run, w, t0, cancel_event or threading.Event(), on_progress)
    except KeyboardInterrupt:
        run.ended_by = "interrupted"
    except BaseException:
        _cancel_quietly(runner, cfg, run)
        raise
    run.wait_s = round(time.monotonic() - t0 - run.submit_s, 3)
    at_cancel = None
    if run.ended_by in ("wall limit", "cancelled", "interrupted"):
        at_cancel = dict(w.known)
        try:
            cancel(runner, cfg, run.job_id)
        except SlurmError as e:   # said in the run's errors; the records still come
            run.errors.append(str(e))
        _settle(runner, cfg, run, w)
    c0 = time.monotonic()
    run.records = collect(runner, run, w.known, at_cancel)
    run.collect_s = round(time.monotonic() - c0, 3)
    run.polls = w.polls
    return run


def _cancel_quietly(runner: Runner, cfg: SlurmConfig, run: ArrayRun) -> None:
    try:
        runner.run(scancel_command(cfg, run.job_id), timeout=30)
    except Exception:  # noqa: BLE001 - best effort on the way out of an error that is re-raised
        pass


@contextmanager
def cancel_on_signals(event: threading.Event, signals=(signal.SIGTERM,)) -> Iterator[threading.Event]:
    """While inside: these signals set `event` (run_array then cancels the job and still collects) instead of
    ending the process; the previous handlers come back on the way out. Main thread only."""
    previous = {s: signal.signal(s, lambda *_: event.set()) for s in signals}
    try:
        yield event
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------------------- results home


def fetch_results(remote: Any, run: ArrayRun, dest: Path, timeout: float = 600) -> Path:
    """Bring WS/slurm/<job id>/ to `dest`/<job id>/ in one tar on the login node and one transfer (a Remote's
    run + get); returns the local folder, whose <task>/parity.json feed the per-GPU reports."""
    archive = f"{run.job_dir}.tar.gz"
    parent, name = run.job_dir.rsplit("/", 1)
    _check(remote.run(f"tar -czf {q(archive)} -C {q(parent)} {q(name)}", timeout=timeout), "tar of the results")
    local = dest / f"{name}.tar.gz"
    try:
        if not remote.get(archive, str(local)):
            raise SlurmError(f"{archive}: not found on the login node")
    finally:
        remote.run(f"rm -f {q(archive)}", timeout=60)
    with tarfile.open(local) as tar:
        if hasattr(tarfile, "data_filter"):   # Python >= 3.10.12 / 3.11.4: no links or paths out of dest
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    local.unlink()
    return dest / name


def local_records(records: list[TaskRecord], local_dir: Path) -> list[TaskRecord]:
    """The same records with their paths in the fetched copy."""
    return [replace(r, task_dir=str(local_dir / str(r.task_id)),
                    parity_json=str(local_dir / str(r.task_id) / "parity.json") if r.parity_json else "")
            for r in records]


# ------------------------------------------------------------------------------------- per-GPU reports


def stopping_signal(ended_by: str, signum: int | None = None) -> int | None:
    """The signal that stopped the run, if one did: the caller's (the CLI's Cancel knows it), else SIGINT for
    Ctrl-C without a handler ("interrupted") and SIGTERM for the cancel event (cancel_on_signals' signal)."""
    if ended_by not in ("interrupted", "cancelled"):
        return None
    return signum or (signal.SIGINT if ended_by == "interrupted" else signal.SIGTERM)


def task_verdict(rec: TaskRecord, parity: dict | None, ended_by: str, signum: int | None = None) -> tuple[str, int]:
    """The verdict line and exit code of one task's report, in the SSH runs' words (exit 1 only when the kernels
    ran and disagree with the reference), with Slurm's state and reason where the task did not end with results.
    A task the pipeline's own stop (a signal: `stopping_signal`) cut short, running or still pending, is
    INTERRUPTED (128 + the signal) like an SSH run; one that never ran for any other reason (pending past the wall
    limit, a drained node, a down partition) is NOT RUN with Slurm's state and reason, exit 5: an error in the
    fleet summary (JUnit <error>, the run fails), not its "not run" status, which names a GPU the run chose not
    to validate (JUnit <skipped>, no exit code). A GPU that was asked for and not validated must fail the run."""
    why = f" ({rec.reason})" if rec.reason else ""
    stopped = stopping_signal(ended_by, signum) if rec.state_at_cancel else None
    if not rec.ran:
        if stopped:
            return f"INTERRUPTED: never ran ({rec.state_at_cancel}{why})", 128 + stopped
        return f"NOT RUN: {rec.state_at_cancel or rec.state}{why}", EXIT_STEP
    verdict, _ = parse.parity_verdict(parse.parity_report(parity))   # the SSH hosts' order: a disagreeing model first
    if verdict == "failed":
        return "FAILED: parity", EXIT_PARITY
    if verdict == "not_loaded":
        return "ERROR: model not loaded", EXIT_STEP
    if verdict == "passed" and rec.state == "COMPLETED" and rec.exit_code == 0:
        return "PASSED", EXIT_OK
    if stopped:
        return "INTERRUPTED", 128 + stopped
    return f"ERROR: {rec.state}{why}" + (" without parity results" if rec.state == "COMPLETED" else ""), EXIT_STEP


def gpu_index(rec: TaskRecord) -> int:
    """The task's GPU on its node: SLURM_JOB_GPUS (global, even where cgroups renumber CUDA_VISIBLE_DEVICES
    from 0), else CUDA_VISIBLE_DEVICES, else 0."""
    for value in (rec.job_gpus, rec.cuda_visible_devices):
        if value.split(",")[0].isdigit():
            return int(value.split(",")[0])
    return 0


def wrong_gpu(required: str, rec: TaskRecord) -> str:
    """Why a task that ran did not meet a GPU name the entry requires (`gpu: H100`: a case-insensitive part of
    nvidia-smi's name, as for SSH hosts); '' when it did, or when `any` / `none` is required."""
    want = required.strip()
    if not rec.ran or want.lower() in ("any", "none") or want.lower() in rec.gpu_name.lower():
        return ""
    got = f"a {rec.gpu_name}" if rec.gpu_name else "a GPU nvidia-smi did not name"
    return f"task {rec.task_id} ran on {got} on {rec.node or 'its node'}, not a {want}"


def host_result(rec: TaskRecord, run: ArrayRun, cfg: SlurmConfig, parity: dict | None = None,
                signum: int | None = None) -> HostRunResult:
    """One task as the HostRunResult an SSH run produces (schema flashcore.report/1), so report.write and
    the fleet summary take it as they are: host = the node, one GpuInfo (its index on the node, UUID, name)
    or none for CPU tasks, the suite's parity document, and one `suite` step that says what Slurm said."""
    _, summary = parse.parity_summary(parity)
    verdict, code = task_verdict(rec, parity, run.ended_by, signum)
    error = "" if code == EXIT_OK else rec.describe()
    if (wrong := wrong_gpu(cfg.gpu, rec)) and code < 128:      # as an SSH host's gpu step: exit 4, whatever ran
        verdict, code, error = "GPU REQUIREMENT NOT MET", EXIT_GPU, wrong
    gpus = [GpuInfo(index=gpu_index(rec), name=rec.gpu_name, uuid=rec.gpu_uuid)] if cfg.uses_gpu and rec.ran else []
    detail = f"Slurm job {run.job_id}_{rec.task_id}: {rec.describe()}" + (f"; {summary}" if parity else "")
    step = StepResult("suite", "ok" if code == EXIT_OK else "failed", detail=detail, command=run.script_path)
    notes = [f"Validated by Slurm: array task {rec.task_id} of job {run.job_id} ({run.tasks} tasks, ended: "
             f"{run.ended_by}); its files: {rec.task_dir}."]
    gres = ", ".join(f"{k}={v}" for k, v in (("SLURM_JOB_GPUS", rec.job_gpus),
                                             ("CUDA_VISIBLE_DEVICES", rec.cuda_visible_devices)) if v)
    if gres:
        notes.append(gres)
    return HostRunResult(
        host=rec.node or f"{cfg.job_name}[{rec.task_id}]", address=cfg.login or "localhost", port=0, user="",
        local=cfg.login is None, model=cfg.suite_model, device=("cuda" if cfg.uses_gpu else "cpu") if rec.ran else "",
        require_gpu=cfg.gpu, workspace=cfg.workspace, started_at=rec.started_at, finished_at=rec.ended_at,
        duration_s=rec.duration_s or 0.0,
        steps=[step], gpus=gpus, parity=parity, verdict=verdict, exit_code=code, error=error, notes=notes)


def host_results(run: ArrayRun, cfg: SlurmConfig, records: list[TaskRecord] | None = None,
                 signum: int | None = None) -> list[HostRunResult]:
    """Every task's HostRunResult; `records`: the fetched copies (local_records) whose parity.json are read;
    `signum`: the signal that stopped the run (task_verdict)."""
    out = []
    for rec in records or run.records:
        doc = None
        if rec.parity_json and Path(rec.parity_json).is_file():
            try:
                doc = json.loads(Path(rec.parity_json).read_text())
            except ValueError:
                doc = None
        out.append(host_result(rec, run, cfg, doc, signum))
    return out
