"""Run the parity suite on one or several models and produce the flashcore.parity/2 document.

    report = run_suite(["llama-3.1-8b", "smollm2-135m"], device="cuda", json_path="parity.json", seed=0)
    report = run_suite("tiny", config=SuiteConfig.for_device("cpu", scenarios=("single_token",)))

Models: `default_models(device)` is what a run without a model list gets: on a GPU the Llama-3.1-8B shape (random
weights, the production size) and SmolLM2-135M-Instruct (real trained weights, so the reference is confident
and top-1 checks bite); on the CPU the tiny preset. They run one after the other, each freed before the next.

For each model, the low-precision copy (bf16 on a GPU, fp16 on the CPU: bf16 is broken in the Triton
interpreter) is switched between flashcore and SDPA; the reference is the same weights upcast to fp32 with eager
attention, held whole beside it (the 8B shape: 16 GB bf16 + 32 GB fp32, fits an 80 GB H100). Every scenario is
isolated: an exception fails that scenario (traceback tail in its detail) and the document is still written.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import platform
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone

import torch

import flashcore
from flashcore.integrations import NAME, make_attention, register, set_attention
from flashcore.models import default_dtype, load_model
from flashcore.parity import latency as latency_mod
from flashcore.parity.prompts import Prompts
from flashcore.parity.results import (Environment, Latency, Memory, ModelInfo, ModelRun, ParityReport, Sample,
                                      ScenarioResult)
from flashcore.parity.scenarios import REGISTRY, Kernels, Models, SuiteConfig, chat_samples, head_counts

GPU_MODELS = ("llama-3.1-8b", "smollm2-135m")
CPU_MODELS = ("tiny",)


def default_models(device_kind: str) -> tuple[str, ...]:
    """The models a run gets when none is named: the 8B shape and a real trained model on a GPU, tiny on the CPU."""
    return GPU_MODELS if device_kind == "cuda" else CPU_MODELS


def parse_models(spec: str | list[str] | tuple[str, ...] | None, device_kind: str) -> list[str]:
    """'a,b' / ['a', 'b'] / 'default' / None -> the model list ('default' expands to default_models)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec or ["default"])
    out: list[str] = []
    for name in (n.strip() for n in names):
        for item in (default_models(device_kind) if name in ("default", "") else (name,)):
            if item not in out:
                out.append(item)
    return out


def environment(device: torch.device) -> Environment:
    import transformers
    import triton
    on_gpu = device.type == "cuda"
    return Environment(device=torch.cuda.get_device_name(device) if on_gpu else "cpu",
                       device_kind="cuda" if on_gpu else "cpu", python=platform.python_version(),
                       torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                       flashcore=flashcore.__version__, cuda=torch.version.cuda,
                       triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1")


def model_info(name: str, loaded, dtype: torch.dtype) -> ModelInfo:
    dtype_name = str(dtype).removeprefix("torch.")
    if loaded is None:
        from flashcore.models import PACKAGED, PRESETS
        source = "preset" if name in PRESETS else "package" if name in PACKAGED else "hub"
        return ModelInfo(preset=name, source=source, dtype=dtype_name, num_layers=0, num_heads=0, num_kv_heads=0,
                         head_dim=0, hidden_size=0, vocab_size=0, params=0)
    c = loaded.model.config
    layers, heads, kv_heads, head_dim = head_counts(loaded.model)
    return ModelInfo(preset=name, source=loaded.source, dtype=dtype_name, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=head_dim, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                     params=sum(p.numel() for p in loaded.model.parameters()), weights=loaded.weights)


def failed(name: str, why: str, detail: str = "") -> ScenarioResult:
    title = REGISTRY[name].title if name in REGISTRY else name
    return ScenarioResult(name=name, title=title, passed=False, criterion="(not evaluated)", measured={},
                          summary=why, detail=detail)


def fp32_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights upcast to fp32 (exact), eager attention."""
    ref = copy.deepcopy(model).float().eval()
    return set_attention(ref, "eager")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_scenario(name: str, models: Models, cfg: SuiteConfig) -> ScenarioResult:
    """One registered scenario as a ScenarioResult; an exception fails it (with the traceback's tail)."""
    spec = REGISTRY[name]
    t0 = time.perf_counter()
    try:
        out = spec.run(models, cfg)
    except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
        tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-6:]
        result = failed(name, f"raised {type(exc).__name__}: {str(exc)[:200]}", "\n".join(tail))
    else:
        result = ScenarioResult(name=name, title=spec.title, passed=bool(out.passed), criterion=spec.criterion,
                                measured=out.measured, summary=out.summary, detail=out.detail,
                                worst_err_over_bound=out.worst_ratio)
    result.duration_s = round(time.perf_counter() - t0, 2)
    return result


def _attention_name(kernels: Kernels | None) -> tuple[str, Kernels]:
    if kernels is None:
        return register(), Kernels.default()
    return register(f"{NAME}_under_test", make_attention(kernels.prefill, kernels.decode)), kernels


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _phase(timings: dict[str, float], name: str, device: torch.device):
    """Adds the wall time of the block to timings[name] (the device's queued work included)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 2)


def run_model(name: str, *, device: torch.device, dtype: torch.dtype, config: SuiteConfig,
              kernels: Kernels | None = None, token: str | None = None, fail_fast: bool = False) -> ModelRun:
    """The suite on one model: every configured scenario, chat samples for a real model, decode latency."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    lat = Latency(cache_len=config.latency_cache_len, rows=[], skipped_reason="not run")
    try:
        with _phase(timings, "load", device):
            loaded = load_model(name, device=device, dtype=dtype, token=token, seed=config.seed,
                                attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001 - the document says why, in one line
        why = f"model {name!r} did not load: {_one_line(exc)}"
        lat.skipped_reason = why
        return ModelRun(model=model_info(name, None, dtype), passed=False, error=why, loaded=False, latency=lat,
                        scenarios=[failed(n, why) for n in config.scenarios], timings_s=timings,
                        duration_s=round(time.perf_counter() - t0, 2))
    attn, kernels = _attention_name(kernels)
    prompts = Prompts.for_model(loaded.model, loaded.tokenizer, config.seed, device)
    with _phase(timings, "reference", device):
        ref = fp32_reference(loaded.model)
    models = Models(lowp=loaded.model, ref=ref, attn=attn, device=device, prompts=prompts, kernels=kernels)
    scenarios: list[ScenarioResult] = []
    with _phase(timings, "scenarios", device):
        for scenario in config.scenarios:
            if fail_fast and scenarios and not scenarios[-1].passed:
                scenarios.append(failed(scenario, f"not run: fail-fast after {scenarios[-1].name} failed"))
                continue
            scenarios.append(run_scenario(scenario, models, config))
    error, samples = "", []
    if not fail_fast or all(s.passed for s in scenarios):
        try:
            with _phase(timings, "samples", device):
                samples = [Sample(**s) for s in chat_samples(models, config)]
        except Exception as exc:  # noqa: BLE001 - generate() with flashcore failing is a failure of the run
            error = f"chat samples (generate) raised {type(exc).__name__}: {_one_line(exc)[:200]}"
    memory = Memory(**models.notes["memory"]) if "memory" in models.notes else Memory()
    if device.type == "cuda":
        memory.peak_gpu_bytes = memory.peak_gpu_bytes or torch.cuda.max_memory_allocated()
    models.ref = ref = None
    _free(device)
    if not config.latency:
        lat.skipped_reason = (latency_mod.cpu_skip_reason() if device.type != "cuda"
                              else "disabled in this suite configuration")
    else:
        try:
            with _phase(timings, "latency", device):
                lat = latency_mod.measure(models.lowp, attn, cache_len=config.latency_cache_len,
                                          steps=config.latency_steps, seed=config.seed)
        except Exception as exc:  # noqa: BLE001
            lat.skipped_reason = f"latency measurement failed: {type(exc).__name__}: {str(exc)[:200]}"
    passed = (not error and [s.name for s in scenarios] == list(config.scenarios)
              and all(s.passed for s in scenarios))
    return ModelRun(model=model_info(name, loaded, dtype), passed=passed, scenarios=scenarios, latency=lat,
                    memory=memory, samples=samples, duration_s=round(time.perf_counter() - t0, 2), error=error,
                    timings_s=timings)


def run_suite(models: str | list[str] | tuple[str, ...] | None = None, *, device=None,
              dtype: torch.dtype | None = None, config: SuiteConfig | None = None, kernels: Kernels | None = None,
              json_path=None, token: str | None = None, seed: int | None = None,
              fail_fast: bool = False) -> ParityReport:
    """The suite over `models` ('a,b', a list, 'default' or None: default_models), written to json_path.
    seed overrides config.seed: random weights, prompts and targets (a real model: which chats). fail_fast: after a scenario
    fails, the rest of that model's scenarios are marked not run (mutation tests only need the verdict)."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    config = config or SuiteConfig.for_device(device.type)
    if seed is not None:
        config = replace(config, seed=seed)
    runs = []
    for name in parse_models(models, device.type):
        runs.append(run_model(name, device=device, dtype=dtype, config=config, kernels=kernels, token=token,
                              fail_fast=fail_fast))
        _free(device)
    report = ParityReport(passed=bool(runs) and all(r.passed for r in runs), seed=config.seed,
                          environment=environment(device), runs=runs, started_at=started_at,
                          duration_s=round(time.perf_counter() - t0, 2))
    if json_path:
        report.write(json_path)
    return report


def format_table(report: ParityReport) -> str:
    """A plain-text summary (for humans and the CLI)."""
    lines = [f"flashcore parity on {report.environment.device} (seed {report.seed}): "
             f"{'PASSED' if report.passed else 'FAILED'} in {report.duration_s:.1f}s"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for run in report.runs:
        lines.append(f"{run.model.preset} ({run.model.dtype}, {run.model.weights or run.model.source}): "
                     f"{'PASSED' if run.passed else 'FAILED'} in {run.duration_s:.1f}s"
                     + (f" - {run.error}" if run.error else ""))
        if run.timings_s:
            lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in run.timings_s.items()))
        for s in run.scenarios:
            lines.append(f"  {'PASS' if s.passed else 'FAIL'}  {s.name:<14} {s.duration_s:5.1f}s  {s.summary}")
        for row in run.latency.rows:
            lines.append(f"  latency {row.mode:<10} flashcore {fmt(row.flashcore_ms)} ms/token, sdpa "
                         f"{fmt(row.sdpa_ms)} ms/token, speedup {fmt(row.speedup)}  ({row.note})")
        if not run.latency.rows:
            lines.append(f"  latency skipped: {run.latency.skipped_reason}")
        for sample in run.samples:
            lines.append(f"  chat: {sample.prompt[:70]!r}")
            for who in ("reference", "flashcore", "sdpa"):
                lines.append(f"    {who:<9} {getattr(sample, who)[:110]!r}")
    return "\n".join(lines)
