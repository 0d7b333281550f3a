"""The ordered steps and `run_host`, the one run function behind `flashcore-deploy` and `fab validate`.

    connect -> gpu -> sync -> install -> token -> suite -> report (always)

Each step returns a StepResult or raises a PipelineError (which fails that step, skips the rest, and picks the
exit code). `run_host` keeps no global state: everything lives in a per-run `_Run`, so hosts (or GPUs) can
later run in parallel.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import commands, local, parse
from pipeline.errors import (AuthenticationError, CommandTimeout, ConnectError, GpuRequirementError, HostKeyError,
                             Interrupted, ParityFailure, PipelineError, StepError)
from pipeline.inventory import HostConfig, describe_gpu_requirement
from pipeline.remote import CommandResult, Remote, connect
from pipeline.results import HostRunResult, StepResult, SyncFacts

TINY = "tiny"
FORWARDED_ENV = ("HF_ENDPOINT",)  # non-secret settings taken from the operator's environment


@dataclass
class RunOptions:
    skip: frozenset[str] = frozenset()
    wheelhouse: str | None = None
    report_dir: str = "reports"
    template: str | None = None
    suite_command: str | None = None    # testing aid: replaces the pytest invocation (see --suite-command)
    kill_after_s: float = 10.0
    reproduce: str = ""
    debug: bool = False
    out: Callable[[str], None] = print
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    code_root: Path = field(default_factory=local.find_code_root)


def is_hub_model(model: str) -> bool:
    """A hub id looks like org/name; presets have no "/" (the rule flashcore.models.load_model applies)."""
    return "/" in model


@dataclass
class _Run:
    cfg: HostConfig
    opts: RunOptions
    result: HostRunResult
    stem: str
    remote: Remote | None = None
    probe: dict[str, str] = field(default_factory=dict)
    lay: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    token_delivered: bool = False
    last: CommandResult | None = None

    def run(self, command: str, timeout: float, **kw) -> CommandResult:
        assert self.remote is not None
        self.last = None
        res = self.remote.run(command, timeout=timeout, **kw)
        self.last = res
        return res

    def say(self, text: str) -> None:
        self.opts.out(parse.redact(text, self.secrets))


# ------------------------------------------------------------------------------------------------------ steps


def step_connect(r: _Run) -> StepResult:
    r.remote = connect(r.cfg)
    res = r.run(commands.probe_command(r.cfg.python), timeout=30)
    r.probe = parse.parse_key_values(res.stdout)
    home = r.probe.get("home") or "/root"
    r.lay = commands.layout(commands.expand_home(r.cfg.workspace, home))
    r.result.workspace = r.lay["workspace"]
    rsync = "rsync" if r.probe.get("tool.rsync") else "no rsync"
    who = f"{r.probe.get('user', '?')}@{r.probe.get('hostname', '?')}"
    how = "local, no SSH" if r.remote.local else f"SSH {r.cfg.user}@{r.cfg.address}:{r.cfg.port}"
    return StepResult("connect", "ok", detail=f"{how}: {who}, {r.probe.get('os', '?')}, {rsync}",
                      command=res.command)


def step_gpu(r: _Run) -> StepResult:
    res = r.run(commands.gpu_query_command(), timeout=60)
    probe = parse.parse_gpu_query(res.stdout)
    r.result.gpus = probe.gpus
    if probe.nvidia_smi:  # keep the raw output: a new host's output is a new parser fixture
        raw = Path(r.opts.report_dir) / r.stem / "nvidia-smi.txt"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(res.stdout)
        r.result.artifacts["nvidia-smi.txt"] = str(raw)
    why = parse.check_gpu_requirement(r.cfg.gpu, probe)
    if why:
        raise GpuRequirementError(why)
    if probe.gpus and not probe.error:
        r.result.device = "cuda"
        g = probe.gpus[0]
        names = f"{len(probe.gpus)} x {g.name}" if len({x.name for x in probe.gpus}) == 1 else \
            ", ".join(x.name for x in probe.gpus)
        detail = (f"{names} (cc {g.compute_capability}, {g.memory_total_mib} MiB, driver {g.driver_version}, "
                  f"CUDA {g.cuda_version or '?'})")
        busy = sum(len(x.processes) for x in probe.gpus)
        if busy:
            detail += f"; {busy} process(es) already on the GPU"
            r.result.notes.append(f"{busy} process(es) were already running on the GPU(s): timings may suffer.")
    else:
        r.result.device = "cpu"
        detail = "no GPU (" + ("nvidia-smi not found" if not probe.nvidia_smi else probe.error or "none") + \
            "): the suite runs on the CPU"
        if not r.cfg.model_explicit and r.result.model != TINY:
            r.result.model = TINY
            detail += f"; model falls back to the {TINY} preset"
        r.result.notes.append(f"No GPU on this host: the parity suite ran the `{r.result.model}` preset on the CPU "
                              "(Triton interpreter). This checks the pipeline and the kernels' logic, not GPU "
                              "speed; latency figures are not meaningful.")
    return StepResult("gpu", "ok", detail=detail, command=res.command)


def step_sync(r: _Run) -> StepResult:
    tree = local.collect_tree(r.opts.code_root)
    r.result.sync = SyncFacts(content_hash=tree.content_hash, files=len(tree.files))
    ws, hash_file = r.lay["workspace"], r.lay["sync_hash"]
    can_rsync = bool(shutil.which("rsync")) and bool(r.probe.get("tool.rsync")) and \
        (r.remote.local or bool(shutil.which("ssh")))
    if can_rsync:
        # rsync every time (files edited on the host are put back); no recorded hash to trust or update
        dest, ssh = r.remote.rsync_target(ws)
        prepare = commands.rsync_prepare_command(r.lay["runtime"], hash_file)
        if r.remote.local:
            r.run(prepare, timeout=30)
        argv = commands.rsync_argv(str(tree.root), dest, ssh, prepare=prepare)
        res = r.remote.rsync(argv, timeout=600)
        r.last = res
        if not res.ok:
            raise StepError(f"rsync failed (exit {res.exit_code}): {parse.tail(res.output, 3, 400)}")
        sent, nfiles = parse.parse_rsync_stats(res.stdout)
        r.result.sync.method, r.result.sync.bytes_sent = "rsync", sent
        changed = parse.parse_rsync_changed(res.stdout)
        detail = f"rsync: {nfiles} of {len(tree.files)} files changed, {sent} bytes sent"
        if changed:
            detail += " (" + ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "") + ")"
        cmd = shlex.join(argv)
    elif (pre := r.run(f"mkdir -p {commands.q(r.lay['runtime'])} && " + commands.read_file_command(hash_file),
                       timeout=30)).stdout.strip() == tree.content_hash:
        r.result.sync.method = "unchanged"
        detail = f"unchanged ({len(tree.files)} files, hash {tree.content_hash[:12]}): nothing sent"
        cmd = pre.command
    else:
        blob = local.make_tarball(tree)
        r.remote.put_data(blob, r.lay["upload"])
        res = r.run(commands.untar_command(r.lay["upload"], ws, hash_file, tree.content_hash), timeout=120)
        if not res.ok:
            raise StepError(f"unpacking the tarball failed: {parse.tail(res.output, 3, 400)}")
        r.result.sync.method, r.result.sync.bytes_sent = "tar", len(blob)
        missing = "this machine" if not shutil.which("rsync") else \
            "the host" if not r.probe.get("tool.rsync") else "this machine (ssh client)"
        how = "tar over SFTP" if not r.remote.local else "tar"
        detail = f"{how} (no rsync on {missing}): {len(tree.files)} files, {len(blob)} bytes sent"
        cmd = res.command
    r.result.versions["flashcore_content_hash"] = tree.content_hash
    return StepResult("sync", "ok", detail=detail + f"; content {tree.content_hash[:12]}", command=cmd)


def _push_wheelhouse(r: _Run) -> tuple[str, list[str]]:
    wh = Path(r.opts.wheelhouse).expanduser()
    wheels = sorted(wh.glob("*.whl"))
    if not wheels:
        raise StepError(f"--wheelhouse {r.opts.wheelhouse}: no .whl files there")
    remote_dir = r.lay["wheelhouse"]
    listing = r.run(f"mkdir -p {commands.q(remote_dir)} && cd {commands.q(remote_dir)} && "
                    "for f in *.whl; do [ -f \"$f\" ] && echo \"$f $(wc -c < \"$f\")\"; done; true", timeout=60)
    have = dict(line.rsplit(" ", 1) for line in listing.stdout.splitlines() if " " in line)
    for w in wheels:
        if have.get(w.name) != str(w.stat().st_size):
            r.remote.put(str(w), f"{remote_dir}/{w.name}")
    return remote_dir, [w.name for w in wheels]


def step_install(r: _Run) -> StepResult:
    if r.probe and not r.probe.get("python_path"):
        raise StepError(f"remote python {r.cfg.python!r} not found on the host (set --python or the inventory's "
                        f"python: {r.probe.get('python_version', '')})")
    reqs = local.requirements(r.opts.code_root)
    wh_dir, wheel_names = _push_wheelhouse(r) if r.opts.wheelhouse else ("", [])
    spec = {"workspace": r.lay["workspace"], "venv": r.lay["venv"], "requirements": reqs, "wheelhouse": wh_dir,
            "spec_hash": local.install_spec_hash(reqs, r.cfg.python, wheel_names)}
    res = r.run(commands.install_command(r.cfg.python, spec), timeout=r.cfg.install_timeout,
                stdin=local.remote_script("install.py"))
    doc = parse.parse_result_line(res.stdout)
    if res.timed_out:
        raise CommandTimeout(f"install did not finish within {r.cfg.install_timeout:g} s")
    if not doc:
        raise StepError(f"install failed (exit {res.exit_code}): {parse.tail(res.output, 3, 400)}")
    if not doc.get("ok"):
        raise StepError(f"install: {doc.get('error', 'failed')}")
    imp = doc.get("imports", {})
    v = r.result.versions
    for key in ("python", "torch", "torch_cuda", "triton", "transformers", "huggingface_hub", "pytest",
                "flashcore"):
        if imp.get(key) not in (None, ""):
            v[key] = str(imp[key])
    v["python_executable"] = str(imp.get("python_executable", ""))
    v["flashcore_revision"] = local.git_revision(r.opts.code_root) or "unknown"
    how = "venv reused (dependency spec unchanged)" if doc.get("cached") else "venv built"
    if doc.get("installed"):
        how += "; installed " + ", ".join(doc["installed"]) + (" from the wheelhouse" if wh_dir else "")
    detail = (f"{how} on {doc.get('host_python', r.cfg.python)}: torch {v.get('torch', '?')}, "
              f"triton {v.get('triton', '?')}, transformers {v.get('transformers', '?')}, "
              f"flashcore {v.get('flashcore', '?')} from the workspace")
    return StepResult("install", "ok", detail=detail, command=res.command)


def step_token(r: _Run) -> StepResult:
    model = r.result.model
    if not is_hub_model(model):
        return StepResult("token", "skipped",
                          detail=f"model preset {model!r} needs no hub (random weights from a config)")
    token, source = local.hf_token(r.opts.environ)
    if not token:
        raise StepError(f"no HF token for the hub model {model}: set HF_TOKEN or run `hf auth login` locally")
    r.secrets.append(token)
    put = r.remote.put_bytes(token.encode() + b"\n", r.lay["token"], 0o600)
    if not put.ok:
        raise StepError(f"could not write the token file on the remote: {parse.tail(put.output, 2, 300)}")
    r.token_delivered = True
    env = {**_forwarded_env(r), "HF_TOKEN_PATH": r.lay["token"]}
    res = r.run(commands.python_script_command(r.lay["venv_python"], [model], env), timeout=90,
                stdin=local.remote_script("token_check.py"))
    doc = parse.parse_result_line(res.stdout) or {}
    status = doc.get("status", "hub_error")
    if status != "ok":
        words = {"no_token": "no token", "invalid_token": "invalid token", "no_access": "no access",
                 "unreachable": "hub unreachable", "hub_error": "hub error"}
        raise StepError(f"HF token ({source}): {words.get(status, status)}: "
                        f"{doc.get('detail') or parse.tail(res.output, 2, 300)}")
    return StepResult("token", "ok", detail=f"token from {source}: {doc.get('detail', '')}", command=res.command)


def _forwarded_env(r: _Run) -> dict[str, str]:
    env = dict(r.cfg.env)
    for key in FORWARDED_ENV:
        if r.opts.environ.get(key):
            env.setdefault(key, r.opts.environ[key])
    return env


def step_suite(r: _Run) -> StepResult:
    lay, res_dir = r.lay, r.lay["results"]
    json_path, junit_path = f"{res_dir}/parity.json", f"{res_dir}/junit.xml"
    device = r.result.device or None
    env = _forwarded_env(r)
    env.update({"FLASHCORE_PARITY_JSON": json_path, "FLASHCORE_JUNIT": junit_path})
    if r.token_delivered:
        env["HF_TOKEN_PATH"] = lay["token"]
    venv_python = lay["venv_python"] if "install" not in r.opts.skip else r.cfg.python
    inner = r.opts.suite_command or shlex.join(
        commands.pytest_argv(venv_python, r.result.model, json_path, junit_path, device))
    timeout = r.cfg.suite_timeout
    cmd = commands.suite_command(lay["workspace"], inner, timeout, r.opts.kill_after_s, env)
    label = r.cfg.name or r.cfg.label
    r.say(f"[{label} suite] {inner}")
    res = r.run(cmd, timeout=timeout + r.opts.kill_after_s + 15, pidfile=lay["pidfile"],
                on_output=lambda line: r.say(f"[{label} suite] {line}"))
    art = Path(r.opts.report_dir) / r.stem
    for name in ("parity.json", "junit.xml", "suite.log"):
        try:
            if r.remote.get(f"{res_dir}/{name}", str(art / name)):
                r.result.artifacts[name] = str(art / name)
        except PipelineError:
            pass
    if "suite.log" not in r.result.artifacts:  # the remote log is gone: keep what was streamed
        art.mkdir(parents=True, exist_ok=True)
        (art / "suite.log").write_text(parse.redact(res.output, r.secrets))
        r.result.artifacts["suite.log"] = str(art / "suite.log")
    if res.timed_out:
        raise CommandTimeout(f"suite: no end within {timeout + r.opts.kill_after_s + 15:g} s; killed the remote "
                             "process group over a new channel")
    if res.exit_code in (124, 137):
        raise CommandTimeout(f"suite timed out after {timeout:g} s (the remote `timeout` killed its process group)")
    doc = None
    if "parity.json" in r.result.artifacts:
        try:
            doc = json.loads(Path(r.result.artifacts["parity.json"]).read_text())
        except (OSError, ValueError):
            doc = None
    r.result.parity = doc
    _, summary = parse.parity_summary(doc)
    if isinstance(doc, dict):
        envd = doc.get("environment") or {}
        for key in ("device", "device_kind", "cuda", "triton_interpret"):
            if envd.get(key) not in (None, ""):
                r.result.versions[f"suite_{key}"] = str(envd[key])
    if doc is None:
        raise StepError(f"suite crashed (exit {res.exit_code}) without writing its results JSON")
    from flashcore.parity.results import ParityReport, SchemaError
    try:
        passed = ParityReport.from_dict(doc).passed   # the typed contract: every field checked
    except SchemaError as e:
        raise StepError(f"suite results do not match flashcore.parity/1: {e}") from None
    if not passed:
        raise ParityFailure(f"parity failed: {summary}")
    if res.exit_code != 0:
        raise StepError(f"suite exited {res.exit_code} although its results say passed ({summary})")
    return StepResult("suite", "ok", detail=f"{summary} ({r.result.model} on {device or 'default device'})",
                      command=cmd)


STEPS: tuple[tuple[str, Callable[[_Run], StepResult]], ...] = (
    ("connect", step_connect), ("gpu", step_gpu), ("sync", step_sync), ("install", step_install),
    ("token", step_token), ("suite", step_suite),
)


# ------------------------------------------------------------------------------------------------- run_host


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "host"


def verdict_for(error: PipelineError | None, failed_step: str, suite_skipped: bool) -> tuple[str, int]:
    if error is None:
        return ("PASSED (suite skipped)" if suite_skipped else "PASSED"), 0
    if isinstance(error, ParityFailure):
        return "FAILED: parity", error.exit_code
    if isinstance(error, HostKeyError):
        return "REFUSED: host key", error.exit_code
    if isinstance(error, AuthenticationError):
        return "REFUSED: authentication", error.exit_code
    if isinstance(error, ConnectError):
        return "UNREACHABLE", error.exit_code
    if isinstance(error, GpuRequirementError):
        return "GPU REQUIREMENT NOT MET", error.exit_code
    if isinstance(error, Interrupted):
        return "INTERRUPTED", error.exit_code
    return f"ERROR: {failed_step} step failed", error.exit_code


def run_host(cfg: HostConfig, opts: RunOptions) -> HostRunResult:
    """Validate one host: every step in order, the report always written. Never raises PipelineError."""
    from pipeline import report

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    result = HostRunResult(host=cfg.name or cfg.label, address="localhost" if cfg.local else cfg.address,
                           port=0 if cfg.local else cfg.port, user=cfg.user, local=cfg.local, model=cfg.model,
                           require_gpu=describe_gpu_requirement(cfg.gpu), started_at=started.isoformat(),
                           reproduce=opts.reproduce)
    stem = f"{_slug(result.host)}-{started.strftime('%Y%m%dT%H%M%SZ')}"
    n = 1
    while (Path(opts.report_dir) / f"{stem}.json").exists() or (Path(opts.report_dir) / stem).exists():
        n += 1  # two runs of one host within a second: never overwrite a report
        stem = f"{_slug(result.host)}-{started.strftime('%Y%m%dT%H%M%SZ')}-{n}"
    r = _Run(cfg, opts, result, stem=stem)
    error: PipelineError | None = None
    failed_step = ""
    label = cfg.name or cfg.label
    try:
        for name, fn in STEPS:
            if error is not None:
                result.steps.append(StepResult(name, "skipped", detail=f"not run: {failed_step} failed"))
                continue
            if name in opts.skip:
                result.steps.append(StepResult(name, "skipped", detail="--skip " + name))
                r.say(f"[{label}] {name:8s} skipped (--skip)")
                continue
            r.say(f"[{label}] {name:8s} ...")
            s0 = time.monotonic()
            try:
                step = fn(r)
            except PipelineError as e:
                error, failed_step = e, name
                step = _failed(r, name, str(e))
            except KeyboardInterrupt:
                error, failed_step = Interrupted(f"interrupted during {name}"), name
                step = _failed(r, name, "interrupted (Ctrl-C)")
            except Exception as e:  # noqa: BLE001 - a bug or an unforeseen failure: reported, not lost
                error, failed_step = StepError(f"{name}: unexpected {type(e).__name__}: {e}"), name
                step = _failed(r, name, str(error))
                if opts.debug:
                    import traceback
                    traceback.print_exc(file=sys.stderr)
            step.duration_s = round(time.monotonic() - s0, 3)
            step.detail = parse.redact(step.detail, r.secrets)
            step.command = parse.redact(step.command, r.secrets)
            step.log_tail = parse.redact(step.log_tail, r.secrets)
            result.steps.append(step)
            r.say(f"[{label}] {name:8s} {step.status} ({step.duration_s:.2f} s) {step.detail}")
    finally:
        _cleanup(r)
    result.verdict, result.exit_code = verdict_for(error, failed_step, "suite" in opts.skip)
    result.error = parse.redact(str(error), r.secrets) if error else ""
    result.finished_at = datetime.now(timezone.utc).isoformat()
    result.duration_s = round(time.monotonic() - t0, 3)
    s0 = time.monotonic()
    try:
        paths = report.write_report(result, Path(opts.report_dir), r.stem, opts.template, r.secrets,
                                    report_step_start=s0)
        r.say(f"[{label}] report   {paths['md']}")
    except Exception as e:  # noqa: BLE001 - a broken user template must not hide the verdict
        r.say(f"[{label}] report   failed: {type(e).__name__}: {e}")
        result.steps.append(StepResult("report", "failed", round(time.monotonic() - s0, 3), str(e)))
    return result


def _failed(r: _Run, name: str, detail: str) -> StepResult:
    last = r.last
    return StepResult(name, "failed", detail=detail, command=last.command if last else "",
                      log_tail=parse.tail(last.output, 40) if last else "")


def _cleanup(r: _Run) -> None:
    if r.remote is None:
        return
    try:
        if r.token_delivered:
            r.remote.run(commands.remove_file_command(r.lay["token"]), timeout=15)
    except (PipelineError, OSError):
        pass
    finally:
        r.remote.close()
