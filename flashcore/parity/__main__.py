"""python -m flashcore.parity [--model M[,M2]] [--json PATH] [--device cuda|cpu] [--seed N] [--scenarios a,b]

Run the parity suite and print a table. Models: presets (tiny, llama-3.1-8b, ...), packaged real models
(smollm2-135m), hub ids, or `default` (a GPU: llama-3.1-8b and smollm2-135m; the CPU: tiny). Exit status 0 when
every scenario of every model passed, 1 when one failed, 2 when the run could not start (bad arguments).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flashcore.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help="model(s), comma-separated or repeated (default: 'default')")
    parser.add_argument("--json", default=None, help="write the flashcore.parity/2 document here")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"])
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights, prompts and targets (default 0)")
    parser.add_argument("--scenarios", default=None, help="comma-separated subset of the registered scenarios")
    parser.add_argument("--list", action="store_true", help="print the registered scenarios and models, then exit")
    return parser


def check_models(names: list[str]) -> str | None:
    """None, or the one-line reason a model name cannot be run (before anything loads)."""
    from flashcore.models import model_names
    for name in names:
        if name not in model_names() and "/" not in name:
            return f"unknown model {name!r} (known: {', '.join(model_names())}, default; or a hub id org/name)"
    return None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (flashcore.ops imports it)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("flashcore.parity: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if not on_gpu:
        from flashcore.ops._common import CPU_PROBLEM
        if CPU_PROBLEM:  # a known failure of every kernel: say so instead of failing each scenario
            print(f"flashcore.parity: the CPU run cannot start: {CPU_PROBLEM}", file=sys.stderr)
            return 2
    from flashcore.parity.scenarios import REGISTRY, SuiteConfig
    from flashcore.parity.suite import format_table, parse_models, run_suite
    if args.list:
        from flashcore.models import model_names
        print("scenarios:\n" + "\n".join(f"  {s.name:<14} {s.title}" for s in REGISTRY.values()))
        print("models: " + ", ".join(model_names()) + " (default: " + ",".join(parse_models(None, "cuda"))
              + " on a GPU, " + ",".join(parse_models(None, "cpu")) + " on the CPU)")
        return 0
    models = parse_models(",".join(args.model or ["default"]), "cuda" if on_gpu else "cpu")
    try:
        why = check_models(models)
        if why:
            raise ValueError(why)
        scenarios = tuple(s for s in (args.scenarios or "").split(",") if s)
        config = SuiteConfig.for_device("cuda" if on_gpu else "cpu", scenarios=scenarios, seed=args.seed)
    except ValueError as exc:
        print(f"flashcore.parity: {exc}", file=sys.stderr)
        return 2
    report = run_suite(models, device=args.device, config=config, json_path=args.json)
    print(format_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
