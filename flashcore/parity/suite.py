"""Run the parity suite on one model and produce the flashcore.parity/1 document.

    report = run_suite("tiny" | "llama-3.1-8b" | "org/hub-id", device="cuda", json_path="parity.json")

The low-precision model (bf16 on a GPU, fp16 on the CPU: bf16 is broken in the Triton interpreter) is switched
between flashcore and SDPA; the reference is the same weights upcast to fp32 with eager attention, held whole
beside it (the 8B shape: 16 GB bf16 + 32 GB fp32, fits an 80 GB H100). Every scenario is isolated: an exception
fails that scenario (traceback tail in its detail) and the document is still written.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import time
import traceback
from datetime import datetime, timezone

import torch

import flashcore
from flashcore.integrations import NAME, register, set_attention
from flashcore.models import default_dtype, load_model
from flashcore.parity import latency as latency_mod
from flashcore.parity.results import (SCENARIO_NAMES, Environment, Latency, Memory, ModelInfo, ParityReport,
                                      ScenarioResult)
from flashcore.parity.scenarios import Models, SuiteConfig, run_scenario

TITLES = {"single_token": "Next-token logits after a prompt", "generate_50": "Greedy generation of 50 tokens",
          "generate_200": "Greedy generation of 200 tokens", "gqa_memory": "GQA KV-cache memory",
          "batch_4": "Batch of 4 left-padded prompts"}


def environment(device: torch.device) -> Environment:
    import transformers
    import triton
    on_gpu = device.type == "cuda"
    return Environment(device=torch.cuda.get_device_name(device) if on_gpu else "cpu",
                       device_kind="cuda" if on_gpu else "cpu", python=platform.python_version(),
                       torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                       flashcore=flashcore.__version__, cuda=torch.version.cuda,
                       triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1")


def model_info(name: str, source: str, model: torch.nn.Module | None, dtype: torch.dtype) -> ModelInfo:
    if model is None:
        return ModelInfo(preset=name, source=source, dtype=str(dtype).removeprefix("torch."), num_layers=0,
                         num_heads=0, num_kv_heads=0, head_dim=0, hidden_size=0, vocab_size=0, params=0)
    c = model.config
    return ModelInfo(preset=name, source=source, dtype=str(dtype).removeprefix("torch."),
                     num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                     num_kv_heads=c.num_key_value_heads,
                     head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                     hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                     params=sum(p.numel() for p in model.parameters()))


def failed(name: str, why: str, detail: str = "") -> ScenarioResult:
    return ScenarioResult(name=name, title=TITLES.get(name, name), passed=False, criterion="(not evaluated)",
                          measured={}, summary=why, detail=detail)


def fp32_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights upcast to fp32 (exact), eager attention."""
    ref = copy.deepcopy(model).float().eval()
    return set_attention(ref, "eager")


def run_suite(name: str, *, device=None, dtype: torch.dtype | None = None, config: SuiteConfig | None = None,
              attn: str = NAME, json_path=None, token: str | None = None) -> ParityReport:
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    config = config or SuiteConfig.for_device(device.type)
    register()
    env = environment(device)
    scenarios: list[ScenarioResult] = []
    memory = Memory()
    lat = Latency(cache_len=config.latency_cache_len, rows=[], skipped_reason="not run")
    info = model_info(name, "hub" if "/" in name else "preset", None, dtype)
    try:
        loaded = load_model(name, device=device, dtype=dtype, token=token, seed=config.seed, attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001 - the document says why, in one line
        why = f"model {name!r} did not load: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        scenarios = [failed(n, why) for n in config.scenarios]
        lat.skipped_reason = why
    else:
        info = model_info(name, loaded.source, loaded.model, dtype)
        models = Models(lowp=loaded.model, ref=fp32_reference(loaded.model), attn=attn, device=device)
        for scenario in config.scenarios:
            try:
                scenarios.append(run_scenario(scenario, models, config))
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
                tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-6:]
                scenarios.append(failed(scenario, f"raised {type(exc).__name__}: {str(exc)[:200]}", "\n".join(tail)))
        if "memory" in models.notes:
            memory = Memory(**models.notes["memory"])
        if device.type == "cuda":
            memory.peak_gpu_bytes = memory.peak_gpu_bytes or torch.cuda.max_memory_allocated()
        models.ref = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not config.latency:
            lat.skipped_reason = (latency_mod.cpu_skip_reason() if device.type != "cuda"
                                  else "disabled in this suite configuration")
        else:
            try:
                lat = latency_mod.measure(models.lowp, attn, cache_len=config.latency_cache_len,
                                          steps=config.latency_steps, seed=config.seed)
            except Exception as exc:  # noqa: BLE001
                lat.skipped_reason = f"latency measurement failed: {type(exc).__name__}: {str(exc)[:200]}"
    passed = bool(scenarios) and all(s.passed for s in scenarios) and \
        [s.name for s in scenarios] == [n for n in SCENARIO_NAMES if n in config.scenarios]
    report = ParityReport(passed=passed, model=info, environment=env, scenarios=scenarios, latency=lat,
                          memory=memory, started_at=started_at, duration_s=round(time.perf_counter() - t0, 2))
    if json_path:
        report.write(json_path)
    return report


def format_table(report: ParityReport) -> str:
    """A plain-text summary (for humans and the CLI)."""
    lines = [f"flashcore parity: {report.model.preset} ({report.model.dtype}) on {report.environment.device}: "
             f"{'PASSED' if report.passed else 'FAILED'} in {report.duration_s:.1f}s"]
    for s in report.scenarios:
        lines.append(f"  {'PASS' if s.passed else 'FAIL'}  {s.name:<13} {s.summary}")
    if report.latency.rows:
        for row in report.latency.rows:
            fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"  latency {row.mode:<10} flashcore {fmt(row.flashcore_ms)} ms/token, sdpa "
                         f"{fmt(row.sdpa_ms)} ms/token, speedup {fmt(row.speedup)}  ({row.note})")
    else:
        lines.append(f"  latency skipped: {report.latency.skipped_reason}")
    return "\n".join(lines)
