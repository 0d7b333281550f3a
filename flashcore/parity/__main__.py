"""python -m flashcore.parity --model PRESET_OR_HUB_ID --json PATH [--device cuda|cpu] : run the suite, print a table.

Exit status 0 when every scenario passed, 1 when one failed, 2 when the run itself could not start.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashcore.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="preset (tiny, llama-3.1-8b, ...) or hub id")
    parser.add_argument("--json", default=None, help="write the flashcore.parity/1 document here")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"])
    args = parser.parse_args(argv)

    import torch
    if args.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (flashcore.ops imports it)
    from flashcore.parity.suite import format_table, run_suite

    try:
        report = run_suite(args.model, device=args.device, json_path=args.json)
    except Exception as exc:  # noqa: BLE001
        print(f"flashcore.parity: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
