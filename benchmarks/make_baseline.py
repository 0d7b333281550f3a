"""Copy flashcore/ops as of a git revision into DIR/flashcore_before/ops, so that bench_attention.py --baseline DIR
times the kernels of that revision beside the working tree's in the same process (same card, same run).

    python benchmarks/make_baseline.py --rev main --out .kx/.baseline

Imports of flashcore.ops become flashcore_before.ops and the torch custom ops move to the flashcore_before::
namespace (two packages cannot register the same op name). Only flashcore/ops is copied; it imports nothing else
of flashcore.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def rename(source: str) -> str:
    return source.replace("flashcore.ops", "flashcore_before.ops").replace('"flashcore::', '"flashcore_before::')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    names = subprocess.run(["git", "ls-tree", "--name-only", args.rev, "flashcore/ops/"], capture_output=True,
                           text=True)
    if names.returncode != 0 or not names.stdout.strip():
        print(f"make_baseline: no flashcore/ops at {args.rev}: {names.stderr.strip()}", file=sys.stderr)
        return 2
    target = Path(args.out) / "flashcore_before" / "ops"
    target.mkdir(parents=True, exist_ok=True)
    (target.parent / "__init__.py").write_text(f'"""flashcore/ops at {args.rev} (benchmarks/make_baseline.py)."""\n')
    for path in names.stdout.split():
        if path.endswith(".py"):
            source = subprocess.run(["git", "show", f"{args.rev}:{path}"], capture_output=True, text=True,
                                    check=True).stdout
            (target / Path(path).name).write_text(rename(source))
    print(f"flashcore/ops at {args.rev} -> {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
