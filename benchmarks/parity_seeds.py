"""False alarms over many seeds: the whole parity suite with the real kernels, once per seed, and the
distribution of each scenario's worst err/bound (docs/PARITY.md records the figures).

    python benchmarks/parity_seeds.py --seeds 0-49 --out seeds-cpu.jsonl                      # CPU, tiny (~1 h)
    python benchmarks/parity_seeds.py --model default --device cuda --seeds 1-5 --out seeds-h100.jsonl

One JSON line per (seed, model) is appended to --out as soon as it is known, so an interrupted run resumes
where it stopped (seeds already in the file are skipped). A seed changes the random weights, the prompts and
the targets (for a real model: which chats). Exit status 1 if any seed failed (a false alarm).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._runs import JsonLines, device_kind  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    """'0-49' / '1,3,7' / '5' -> seeds."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def record(report) -> list[dict]:
    return [{"seed": report.seed, "model": run.model.preset, "passed": run.passed, "duration_s": run.duration_s,
             "error": run.error,
             "scenarios": {s.name: {"passed": s.passed, "worst_err_over_bound": s.worst_err_over_bound,
                                    "summary": s.summary if not s.passed else ""} for s in run.scenarios}}
            for run in report.runs]


def distribution(rows: list[dict]) -> str:
    """Per (model, scenario): runs, failures, and min / median / p90 / max of the worst err/bound."""
    table: dict[tuple[str, str], list] = {}
    for row in rows:
        for name, s in row["scenarios"].items():
            table.setdefault((row["model"], name), []).append(s)
    lines = ["| model | scenario | runs | failed | min | median | p90 | max |", "|---|---|---|---|---|---|---|---|"]
    for (model, name), results in table.items():
        ratios = sorted(float(s["worst_err_over_bound"]) for s in results if s["worst_err_over_bound"] is not None)
        failed = sum(not s["passed"] for s in results)
        q = lambda p: ratios[min(len(ratios) - 1, int(p * len(ratios)))] if ratios else float("nan")  # noqa: E731
        lines.append(f"| {model} | {name} | {len(results)} | {failed} | {q(0):.3f} | {statistics.median(ratios):.3f} "
                     f"| {q(0.9):.3f} | {q(1.0) if ratios else float('nan'):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model(s), comma-separated (default: 'default')")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--seeds", default="0-49", help="e.g. 0-49 or 1,2,3")
    parser.add_argument("--scenarios", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--out", required=True, help="JSON lines, appended (resumes)")
    args = parser.parse_args(argv)
    kind = device_kind(args.device)
    from flashcore.parity.scenarios import SuiteConfig
    from flashcore.parity.suite import run_suite

    out = JsonLines(args.out)
    done = {row["seed"] for row in out.rows}
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    for seed in parse_seeds(args.seeds):
        if seed in done:
            continue
        t0 = time.perf_counter()
        report = run_suite(args.model, device=args.device,
                           config=SuiteConfig.for_device(kind, scenarios=scenarios, seed=seed))
        new = record(report)
        for row in new:
            out.append(row)
        worst = max((float(s["worst_err_over_bound"]) for r in new for s in r["scenarios"].values()
                     if s["worst_err_over_bound"] is not None), default=float("nan"))
        print(f"seed {seed}: {'PASSED' if report.passed else 'FAILED'} worst err/bound {worst:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = out.rows
    failed = sorted({row["seed"] for row in rows if not row["passed"]})
    print(f"\n{len({r['seed'] for r in rows})} seeds, {len(failed)} failed{': ' + str(failed) if failed else ''}")
    print(distribution(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
