"""The mutation table: every mutant of flashcore/parity/mutants.py against every scenario of the suite, and the
err/bound each scenario reaches (docs/PARITY.md; the CI test runs each mutant on the scenarios it names).

    python benchmarks/parity_mutants.py --out mutants-cpu.jsonl                   # CPU, tiny (~15 min)
    python benchmarks/parity_mutants.py --device cuda --out mutants-h100.jsonl    # GPU, tiny

One JSON line per mutant, appended as it finishes (a rerun skips mutants already in the file), then a Markdown
table. Exit status 1 if a mutant passed the suite (the suite missed a bug).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._runs import JsonLines, device_kind  # noqa: E402


def _ratio(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else (f"{value:.3g}" if value < 1e4 else f"{value:.2e}")


def table(rows: list[dict]) -> str:
    lines = ["| mutant | bug | verdict | scenarios failed (worst err/bound) | max err/bound |", "|---|---|---|---|---|"]
    for row in rows:
        failed = {n: s["worst_err_over_bound"] for n, s in row["scenarios"].items() if not s["passed"]}
        ratios = [float(v) for v in failed.values() if v is not None]
        lines.append(f"| {row['mutant']} | {row['bug']} | {'PASSED (missed)' if row['passed'] else 'FAILED'} | "
                     + ", ".join(f"{n} {_ratio(v)}" for n, v in failed.items())
                     + f" | {_ratio(max(ratios)) if ratios else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mutants", default="", help="comma-separated subset (default: the whole catalogue)")
    parser.add_argument("--out", required=True, help="JSON lines, appended (resumes)")
    args = parser.parse_args(argv)
    kind = device_kind(args.device)
    from flashcore.parity import mutants
    from flashcore.parity.scenarios import SuiteConfig
    from flashcore.parity.suite import run_suite

    out = JsonLines(args.out)
    done = {row["mutant"] for row in out.rows}
    for name in [n for n in args.mutants.split(",") if n] or list(mutants.CATALOGUE):
        if name in done:
            continue
        mutant = mutants.CATALOGUE[name]
        t0 = time.perf_counter()
        report = run_suite(args.model, device=args.device, config=SuiteConfig.for_device(kind, seed=args.seed),
                           kernels=mutants.load(mutant))
        row = {"mutant": name, "bug": mutant.bug, "file": mutant.file, "passed": report.passed,
               "duration_s": round(time.perf_counter() - t0, 1),
               "scenarios": {s.name: {"passed": s.passed, "worst_err_over_bound": s.worst_err_over_bound}
                             for s in report.runs[0].scenarios}}
        out.append(row)
        print(f"{name}: {'PASSED (missed!)' if report.passed else 'FAILED'} ({row['duration_s']} s)", flush=True)
    rows = out.rows
    print(table(rows))
    return 1 if any(row["passed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
