"""The regression rule: pure functions over one GPU's result and the earlier results of the same GPU slot (host +
GPU index + GPU model: `pipeline.history.HistoryStore.earlier`).

What it follows
- PyTorch's benchmark regression report (pytorch/test-infra, aws/lambda/benchmark_regression_summary_report,
  `common/regression_utils.py`, the job behind the HUD benchmark dashboards, compiler/TorchInductor included):
  a baseline aggregated from a window of earlier runs (median for latency metrics, `config.py`), a per-run
  violation flag, and `classify_flags`' labels: "regression" when the latest 2 runs are both flagged, "suspicious"
  below that, "insufficient_data" without enough history. Like the compiler dashboard, which gates on speedup over
  eager measured in the same run rather than on raw time, a flashcore latency flag that the same run's SDPA
  figure explains (the flashcore/SDPA ratio did not move) is put down to the host, not to flashcore.
- Conbench's lookback z-score (Apache Arrow, Velox): the baseline comes only from the same hardware, and without
  enough matching history it says so instead of guessing.
- The noise is the median absolute deviation scaled by 1.4826 (consistent with the standard deviation for normal
  data: scipy.stats.median_abs_deviation(scale="normal")), robust to the odd outlier night, with a floor of 3% of
  the baseline so that a metric that barely moves (graphed latency, err/bound) does not flag on 1% jitter.

The rule (constants below)
- baseline: median of the last 7 passing runs of the same host + GPU model, in the same GPU slot (at least 3, else
  "insufficient data"): the GPUs of one node are judged apart, so a bad card cannot hide behind its siblings
- noise: max(1.4826 x MAD, 3% of the baseline)
- a run is flagged when it is worse than the baseline by more than 3 noise units and by more than 5%; with the
  3% floor the first condition alone already needs more than 9%, so the smallest step it can see is 9%
- regression: this run and the previous run of the same GPU both flagged; one flagged run: "suspicious"
- a scenario that passed in the previous run and fails now: a regression at once
- versions changed since the baseline: said beside the flag ("environment changed: torch 2.11.0 -> 2.12.0")
- most of the fleet flagged on one metric the same night: one fleet-wide finding labelled "environment change",
  the hosts are not blamed one by one; unless only flashcore's code changed (and no version did): then the code
  is the suspect and the flags stay regressions (every host of a nightly runs the same checkout)
"""

from __future__ import annotations

import fnmatch
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pipeline.gpu_result import CODE_KEY, ENV_KEYS, GpuResult

WINDOW = 7              # baseline: the last WINDOW passing runs
MIN_BASELINE = 3        # fewer passing runs: "insufficient data"
MAD_SCALE = 1.4826      # MAD -> standard deviation for normal data
NOISE_FLOOR = 0.03      # noise is at least this fraction of the baseline
SIGMAS = 3.0            # flagged beyond this many noise units ...
MIN_CHANGE = 0.05       # ... and beyond this fraction of the baseline
FLEET_MIN_HOSTS = 2     # a fleet-wide shift needs this many judged hosts, and more than half of them flagged

Label = Literal["ok", "insufficient data", "suspicious", "regression", "environment"]
FLAGGED: tuple[Label, ...] = ("suspicious", "regression", "environment")


@dataclass(frozen=True)
class MetricSpec:
    pattern: str                        # fnmatch pattern over metric names
    better: Literal["lower", "higher"]
    gate: bool                          # a regression here fails the run; else it is shown, never fatal
    title: str


# First match wins; metric names start with the model (pipeline.gpu_result). Gated: the CUDA-graph decode step
# (0.2% apart over four real H100 runs), plain and with compiled blocks, and the error margins. Eager decode is
# judged and shown but not gated: it is host-bound (a Python loop, launch overhead) and moved 20-40% between runs
# on the same H100 (docs/BENCHMARKS.md); at that noise a 7-run MAD flags pure noise on a few percent of nights
# (tests/pipeline/test_regression.py measures it).
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("*.decode.cuda_graph.flashcore_ms", "lower", True, "flashcore decode ms/token, CUDA graph"),
    MetricSpec("*.decode.cuda_graph.ratio", "lower", True, "flashcore / SDPA decode time, CUDA graph"),
    MetricSpec("*.decode.cuda_graph_compiled.flashcore_ms", "lower", True,
               "flashcore decode ms/token, CUDA graph with compiled blocks"),
    MetricSpec("*.decode.cuda_graph_compiled.ratio", "lower", True,
               "flashcore / SDPA decode time, CUDA graph with compiled blocks"),
    MetricSpec("*.decode.*.flashcore_ms", "lower", False, "flashcore decode ms/token"),
    MetricSpec("*.decode.*.ratio", "lower", False, "flashcore / SDPA decode time"),
    MetricSpec("*.decode.*.sdpa_ms", "lower", False, "SDPA decode ms/token (the same run's reference)"),
    MetricSpec("*.err_bound.*", "lower", True, "worst logit error / bound"),
    MetricSpec("*.duration_s", "lower", False, "a model's share of the suite's wall time"),
    MetricSpec("suite_duration_s", "lower", False, "suite wall time"),
)


def spec_for(metric: str) -> MetricSpec | None:
    """The spec of a metric name; None: an unknown metric, recorded and plotted but not judged."""
    return next((s for s in METRICS if fnmatch.fnmatchcase(metric, s.pattern)), None)


@dataclass(frozen=True)
class Baseline:
    median: float
    noise: float
    n: int


@dataclass
class Finding:
    host: str
    gpu: str                           # GpuResult.label
    metric: str                        # a metric name, or "scenario <name>"
    label: Label
    gate: bool = True
    value: float | None = None
    baseline: float | None = None
    noise: float | None = None
    change: float | None = None        # relative change, positive = worse
    env: list[str] = field(default_factory=list)    # ["torch 2.11.0 -> 2.12.0", ...]
    code: str = ""                     # "5a7a6e32 -> 835cf0d4" when the code changed since the baseline
    note: str = ""

    @property
    def flagged(self) -> bool:
        return self.label in FLAGGED

    @property
    def fatal(self) -> bool:
        return self.label == "regression" and self.gate

    @property
    def units(self) -> float | None:
        if self.value is None or self.baseline is None or not self.noise:
            return None
        return abs(self.value - self.baseline) / self.noise

    def text(self) -> str:
        """One line: `llama-3.1-8b.decode.cuda_graph.ratio 0.97 vs 0.83 (+17%, 4.1 noise units): regression;
        environment changed: torch 2.11.0 -> 2.12.0`."""
        head = self.metric
        if self.value is not None and self.baseline is not None:
            head += f" {self.value:.4g} vs {self.baseline:.4g}"
            if self.change is not None:
                units = self.units
                head += f" ({self.change:+.0%}" + (f", {units:.1f} noise units)" if units is not None else ")")
        parts = [f"{head}: {self.label}"]
        if self.note:
            parts.append(self.note)
        if self.env:
            parts.append("environment changed: " + ", ".join(self.env))
        if self.code:
            parts.append(f"code changed: {self.code}")
        return "; ".join(parts)


def baseline_of(values: Sequence[float]) -> Baseline | None:
    """Median and noise of the baseline window (the last WINDOW values); None below MIN_BASELINE values."""
    window = list(values)[-WINDOW:]
    if len(window) < MIN_BASELINE:
        return None
    med = statistics.median(window)
    mad = statistics.median(abs(v - med) for v in window)
    return Baseline(med, max(MAD_SCALE * mad, NOISE_FLOOR * abs(med)), len(window))


def worse_by(value: float, base: Baseline, better: str) -> float:
    """How much worse `value` is than the baseline, in the metric's units (negative: better)."""
    return value - base.median if better == "lower" else base.median - value


def is_flagged(value: float, base: Baseline, better: str) -> bool:
    worse = worse_by(value, base, better)
    return worse > SIGMAS * base.noise and worse > MIN_CHANGE * abs(base.median)


def version_changes(old: dict[str, str], new: dict[str, str], keys: Sequence[str] = ENV_KEYS) -> list[str]:
    """["torch 2.11.0 -> 2.12.0", ...] for the keys both sides know and that differ."""
    return [f"{k} {old[k]} -> {new[k]}" for k in keys if old.get(k) and new.get(k) and old[k] != new[k]]


def baseline_versions(window: Sequence[GpuResult]) -> dict[str, str]:
    """Per key, the version most of the baseline runs had (the older one on a tie): what "since the baseline"
    compares against, also on the second flagged night, when the newest baseline run already has the new one."""
    out = {}
    for key in (*ENV_KEYS, CODE_KEY):
        seen = Counter(v for r in window if (v := r.versions.get(key)))
        if seen:
            out[key] = seen.most_common(1)[0][0]
    return out


def _code_change(old: dict[str, str], new: dict[str, str]) -> str:
    a, b = old.get(CODE_KEY, ""), new.get(CODE_KEY, "")
    return f"{a[:8]} -> {b[:8]}" if a and b and a != b else ""


def _passing_with(past: Sequence[GpuResult], metric: str) -> list[GpuResult]:
    return [p for p in past if p.passed and metric in p.metrics]


def _is_same_gpu(p: GpuResult, cur: GpuResult) -> bool:
    """The same GPU slot of the host (its index), for "consecutive" and "newly". The store already hands over one
    slot's past; this keeps the rule right on any input. Not the UUID: a rented host can come back with another
    card under the same name (the project's H100 box showed two UUIDs 20 minutes apart); the UUID is recorded
    and a change is named beside a flag (ENV_KEYS' gpu_uuid)."""
    return p.gpu_index == cur.gpu_index


def _flag_at(past: Sequence[GpuResult], i: int, metric: str, better: str) -> bool:
    """Was past[i] flagged on `metric` against its own baseline (the runs before it)?"""
    base = baseline_of([p.metrics[metric] for p in _passing_with(past[:i], metric)])
    return base is not None and is_flagged(past[i].metrics[metric], base, better)


def judge_metric(cur: GpuResult, past: Sequence[GpuResult], metric: str) -> Finding | None:
    """One metric of `cur` against `past` (earlier results of the same GPU slot, oldest first)."""
    spec = spec_for(metric)
    if spec is None or metric not in cur.metrics:
        return None
    value = cur.metrics[metric]
    f = Finding(cur.host, cur.label, metric, "ok", gate=spec.gate, value=value)
    window = _passing_with(past, metric)[-WINDOW:]
    base = baseline_of([p.metrics[metric] for p in window])
    if base is None:
        f.label, f.note = "insufficient data", f"{len(window)} earlier passing run(s), {MIN_BASELINE} needed"
        return f
    f.baseline, f.noise = base.median, base.noise
    f.change = worse_by(value, base, spec.better) / abs(base.median) if base.median else None
    if not is_flagged(value, base, spec.better):
        return f
    prev = next((i for i in range(len(past) - 1, -1, -1)
                 if _is_same_gpu(past[i], cur) and metric in past[i].metrics), None)
    f.label = "regression" if prev is not None and _flag_at(past, prev, metric, spec.better) else "suspicious"
    before = baseline_versions(window)
    f.env, f.code = version_changes(before, cur.versions), _code_change(before, cur.versions)
    return f


def _explained_by_host(f: Finding, cur: GpuResult, past: Sequence[GpuResult]) -> str:
    """For a flagged `<model>.decode.<mode>.flashcore_ms`: why the host explains it ('' when it does not): the same
    run's SDPA time got worse too and the flashcore/SDPA ratio was not flagged."""
    if not f.metric.endswith(".flashcore_ms"):
        return ""
    ref = judge_metric(cur, past, f.metric.removesuffix("flashcore_ms") + "sdpa_ms")
    ratio = judge_metric(cur, past, f.metric.removesuffix("flashcore_ms") + "ratio")
    if ref is None or ratio is None or ratio.flagged or ratio.label == "insufficient data":
        return ""
    if ref.change is None or ref.change <= 0:
        return ""
    return f"SDPA in the same run slowed too ({ref.change:+.0%}) and the flashcore/SDPA ratio held: the host"


def newly_failed(cur: GpuResult, past: Sequence[GpuResult]) -> list[Finding]:
    """Scenarios that fail now and passed in the previous run of this GPU that had them: regressions at once."""
    out = []
    for name, passed in cur.scenarios.items():
        if passed:
            continue
        prev = next((p for p in reversed(past) if _is_same_gpu(p, cur) and name in p.scenarios), None)
        if prev is not None and prev.scenarios[name]:
            out.append(Finding(cur.host, cur.label, f"scenario {name}", "regression",
                               note=f"newly fails (passed on {prev.started_at[:10] or 'the previous run'})",
                               env=version_changes(prev.versions, cur.versions),
                               code=_code_change(prev.versions, cur.versions)))
    return out


@dataclass
class Assessment:
    result: GpuResult
    findings: list[Finding] = field(default_factory=list)   # every judged metric + new scenario failures

    @property
    def flags(self) -> list[Finding]:
        return [f for f in self.findings if f.flagged]

    @property
    def regressed(self) -> bool:
        return any(f.fatal for f in self.findings)

    @property
    def status(self) -> str:
        """The worst label among the gated findings: regression > suspicious > environment > ok > insufficient
        data; "not judged" without any (a run that did not get to the suite). Ungated metrics are shown only."""
        labels = {f.label for f in self.findings if f.gate}
        return next((x for x in ("regression", "suspicious", "environment", "ok", "insufficient data")
                     if x in labels), "not judged")


def assess(cur: GpuResult, past: Sequence[GpuResult]) -> Assessment:
    """All findings for one GPU's result. `past`: earlier results of the same GPU slot, oldest first."""
    a = Assessment(cur)
    if not cur.ran:
        return a
    a.findings.extend(newly_failed(cur, past))
    for metric in sorted(cur.metrics):
        f = judge_metric(cur, past, metric)
        if f is None:
            continue
        if f.flagged and (why := _explained_by_host(f, cur, past)):
            f.label, f.note = "environment", why
        a.findings.append(f)
    return a


@dataclass
class FleetShift:
    metric: str
    hosts: list[str]                   # the flagged hosts
    judged: int                        # hosts with a baseline on this metric
    label: Literal["environment change", "code change"]
    env: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)

    def text(self) -> str:
        head = f"{self.metric}: {len(self.hosts)} of {self.judged} hosts shifted the same night ({self.label})"
        extra = []
        if self.env:
            extra.append("environment changed: " + ", ".join(self.env))
        if self.code:
            extra.append("code changed: " + ", ".join(self.code))
        if not self.env and not self.code and self.label == "environment change":
            extra.append("no version or code change recorded: the hosts' environment (cloud, drivers, load)")
        return head + ("; " + "; ".join(extra) if extra else "")


def fleet_shifts(assessments: Sequence[Assessment]) -> list[FleetShift]:
    """Metrics on which most of the fleet's judged hosts are flagged the same night. The per-host findings of an
    "environment change" are relabelled "environment" (no host is blamed); a "code change" leaves them as they are."""
    shifts = []
    metrics = sorted({f.metric for a in assessments for f in a.findings if f.value is not None})
    for metric in metrics:
        found = [(a, f) for a in assessments for f in a.findings if f.metric == metric]
        judged = {a.result.host for a, f in found if f.label != "insufficient data"}
        hits = [(a, f) for a, f in found if f.label in ("suspicious", "regression")]
        hosts = sorted({a.result.host for a, _ in hits})
        if len(judged) < FLEET_MIN_HOSTS or len(hosts) * 2 <= len(judged):
            continue
        env = sorted({e for _, f in hits for e in f.env})
        code = sorted({f.code for _, f in hits if f.code})
        code_only = not env and len(code) > 0 and all(f.code for _, f in hits)
        shift = FleetShift(metric, hosts, len(judged), "code change" if code_only else "environment change",
                           env, code)
        if not code_only:
            for _, f in hits:
                f.label = "environment"
                f.note = f"fleet-wide shift ({len(hosts)} of {len(judged)} hosts): not this host"
        shifts.append(shift)
    return shifts
