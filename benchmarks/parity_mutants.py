"""The mutation table: every mutant of flashcore/parity/mutants.py against every scenario of the suite, and the
err/bound each scenario reaches (docs/PARITY.md; the CI test runs each mutant on the scenarios it names).

    python benchmarks/parity_mutants.py --out mutants-cpu.jsonl                   # CPU, tiny (~15 min)
    python benchmarks/parity_mutants.py --device cuda --out mutants-h100.jsonl    # GPU, tiny

One JSON line per mutant, appended as it finishes (a rerun skips mutants already in the file), then a Markdown
table. Exit status 1 if a mutant passed the suite (the suite missed a bug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    import torch
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from flashcore.parity import mutants
    from flashcore.parity.scenarios import SuiteConfig
    from flashcore.parity.suite import run_suite

    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    done = {row["mutant"] for row in rows}
    names = [n for n in args.mutants.split(",") if n] or list(mutants.CATALOGUE)
    for name in names:
        if name in done:
            continue
        mutant = mutants.CATALOGUE[name]
        t0 = time.perf_counter()
        config = SuiteConfig.for_device("cuda" if on_gpu else "cpu", seed=args.seed)
        report = run_suite(args.model, device=args.device, config=config, kernels=mutants.load(mutant))
        run = report.runs[0]
        row = {"mutant": name, "bug": mutant.bug, "file": mutant.file, "passed": report.passed,
               "duration_s": round(time.perf_counter() - t0, 1),
               "scenarios": {s.name: {"passed": s.passed, "worst_err_over_bound": s.worst_err_over_bound}
                             for s in run.scenarios}}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"{name}: {'PASSED (missed!)' if report.passed else 'FAILED'} ({row['duration_s']} s)", flush=True)
    print(table(rows))
    return 1 if any(row["passed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
