"""`flashcore-deploy history [--host H] [--metric M] [--last N]`: the trend of one or more metrics per host/GPU
as a table (with each run's verdict under the regression rule) and a PNG plot (matplotlib, Agg backend).

    flashcore-deploy history                                   graphed decode ms/token, every host, last 14 runs
    flashcore-deploy history --host lab-a --metric '*.err_bound.*' --last 30 --plot err.png

The pure part: `series_points()` (results -> judged points) and `table_rows()`; `plot_png()` draws; `main()` reads
the store and prints.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipeline.errors import UsageError
from pipeline.gpu_result import GpuResult
from pipeline.history import HistoryStore, default_path
from pipeline.regression import Finding, assess, spec_for

DEFAULT_METRIC = "*.decode.cuda_graph.flashcore_ms"   # every model's graphed decode step
DEFAULT_LAST = 14
MAX_PANELS = 6


@dataclass
class Point:
    result: GpuResult
    metric: str
    finding: Finding | None      # None: no value for this metric in that run, or a metric the rule does not judge

    @property
    def value(self) -> float | None:
        return self.result.metrics.get(self.metric)

    @property
    def series(self) -> str:
        """One line of the plot: a host's GPU slot."""
        return self.result.label


def series_points(results: Sequence[GpuResult], metrics: Sequence[str], last: int) -> list[Point]:
    """Every result judged against its own past (the same GPU slot: host + index + model, as the nightly judged
    it), the newest `last` per host/GPU slot kept, oldest first."""
    by_key: dict[tuple[str, int | None, str], list[GpuResult]] = {}
    for r in results:
        by_key.setdefault((r.host, r.gpu_index, r.gpu_name), []).append(r)
    keep: dict[tuple[str, str], list[tuple[list[GpuResult], int, str]]] = {}
    for runs in by_key.values():
        for i, r in enumerate(runs):
            for m in metrics:
                if m in r.metrics:
                    keep.setdefault((r.label, m), []).append((runs, i, m))
    findings: dict[int, dict[str, Finding]] = {}     # only the kept results are judged (each against its past)

    def point(runs: list[GpuResult], i: int, metric: str) -> Point:
        r = runs[i]
        if id(r) not in findings:
            findings[id(r)] = {f.metric: f for f in assess(r, runs[:i]).findings}
        return Point(r, metric, findings[id(r)].get(metric))

    kept = [point(*k) for ks in keep.values() for k in ks[-last:]]
    return sorted(kept, key=lambda p: (p.metric, p.result.started_at, p.series))


def select_metrics(pattern: str, known: Sequence[str]) -> list[str]:
    """The metric names matching an exact name or an fnmatch pattern; a clear error listing what exists."""
    chosen = [m for m in known if m == pattern or fnmatch.fnmatchcase(m, pattern)]
    if not chosen:
        raise UsageError(f"--metric {pattern}: no such metric in the history (known: {', '.join(known) or 'none'})")
    return chosen


def table_rows(points: Sequence[Point]) -> list[list[str]]:
    """[when (UTC), host, GPU, status, metric, value, baseline, change, verdict] per point."""
    rows = []
    for p in points:
        f, r = p.finding, p.result
        rows.append([r.started_at[:16].replace("T", " "), r.host, r.label.removeprefix(r.host).strip() or "-",
                     r.status, p.metric, f"{p.value:.4g}",
                     f"{f.baseline:.4g}" if f and f.baseline is not None else "-",
                     f"{f.change:+.1%}" if f and f.change is not None else "-",
                     (f.label + (f" ({f.note})" if f.label == "environment" else "")) if f else "not judged"])
    return rows


HEADER = ["when (UTC)", "host", "GPU", "status", "metric", "value", "baseline", "change", "verdict"]


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*HEADER, box=box.SIMPLE_HEAD, show_edge=False)
    for row in rows:
        table.add_row(*row)
    Console(file=out, width=200, soft_wrap=True, color_system=None if not out.isatty() else "auto").print(table)


def plot_png(points: Sequence[Point], path: Path, title: str = "") -> Path:
    """One panel per metric (at most MAX_PANELS), one line per host/GPU; suspicious runs ringed in orange,
    regressions marked with a red cross, environment-labelled flags with a grey square."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from datetime import datetime

    metrics = list(dict.fromkeys(p.metric for p in points))[:MAX_PANELS]
    fig, axes = plt.subplots(len(metrics) or 1, 1, figsize=(9, 2.6 * max(1, len(metrics))), squeeze=False,
                             sharex=True)
    marks = {"suspicious": dict(marker="o", mfc="none", mec="tab:orange", ms=11, mew=2),
             "regression": dict(marker="x", color="tab:red", ms=11, mew=2.5),
             "environment": dict(marker="s", mfc="none", mec="grey", ms=10, mew=1.5)}
    colour = {s: f"C{i % 10}" for i, s in enumerate(dict.fromkeys(p.series for p in points))}   # same in each panel
    for ax, metric in zip(axes[:, 0], metrics):
        mine = [p for p in points if p.metric == metric]
        for series in dict.fromkeys(p.series for p in mine):
            pts = [p for p in mine if p.series == series]
            when = [datetime.fromisoformat(p.result.started_at.replace("Z", "+00:00")) for p in pts]
            ax.plot(when, [p.value for p in pts], marker=".", label=series, color=colour[series])
            for t, p in zip(when, pts):
                if p.finding and p.finding.label in marks:
                    ax.plot([t], [p.value], linestyle="none", **marks[p.finding.label])
        spec = spec_for(metric)
        ax.set_title(f"{metric}: {spec.title}" if spec else metric, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if not metrics:
        axes[0, 0].text(0.5, 0.5, "no data", ha="center", va="center")
    fig.suptitle(title or "flashcore nightly history")
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import _Parser   # the CLI's one-line usage errors

    p = _Parser(prog="flashcore-deploy history",
                description="The trend of a metric per host/GPU from the nightly history: a table and a PNG plot.")
    p.add_argument("--history", metavar="FILE", help="the history file (default REPORT_DIR/history.sqlite)")
    p.add_argument("--report-dir", default="reports", metavar="DIR", help="where the reports are (default reports/)")
    p.add_argument("--host", metavar="H", help="one host (default: all)")
    p.add_argument("--metric", default=DEFAULT_METRIC, metavar="M",
                   help=f"a metric name or fnmatch pattern, e.g. 'llama-3.1-8b.decode.*' or '*.err_bound.*' "
                        f"(default {DEFAULT_METRIC})")
    p.add_argument("--last", type=int, default=DEFAULT_LAST, metavar="N",
                   help=f"the last N runs per host/GPU (default {DEFAULT_LAST})")
    p.add_argument("--plot", metavar="PNG", help="where the plot goes (default: beside the history file, "
                   "history-<metric>.png)")
    return p


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    out = out or sys.stdout
    a = build_parser().parse_args(list(argv))
    if a.last < 1:
        raise UsageError("--last must be at least 1")
    path = Path(a.history) if a.history else default_path(a.report_dir)
    if not path.is_file():
        raise UsageError(f"no history at {path} (a nightly run writes it; --history FILE names another)")
    with HistoryStore(path) as store:
        if a.host and a.host not in store.hosts():
            raise UsageError(f"--host {a.host}: not in the history (hosts: {', '.join(store.hosts()) or 'none'})")
        metrics = select_metrics(a.metric, store.metric_names())
        results = store.results(host=a.host)
    points = series_points(results, metrics, a.last)
    print_table(table_rows(points), out)
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", a.metric).strip("_")
    png = plot_png(points, Path(a.plot) if a.plot else path.parent / f"history-{slug}.png",
                   title=f"flashcore nightly history: {a.metric}" + (f" on {a.host}" if a.host else ""))
    print(f"plot: {png}", file=out)
    return 0
