"""Whole-model decode latency: flashcore vs PyTorch SDPA, ms per generated token after a long prompt.

    python benchmarks/bench_decode_model.py [--model llama-3.1-8b] [--cache-len 2048] [--steps 64] [--json PATH]

Same process, same weights, same prompt: eager decoding over a DynamicCache, and one decode step captured as a
CUDA graph over a StaticCache (flashcore.parity.latency). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--cache-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_model: needs a CUDA GPU (the CPU runs the kernels in the Triton interpreter)",
              file=sys.stderr)
        return 2
    from flashcore.integrations import NAME, register
    from flashcore.models import load_model
    from flashcore.parity.latency import measure
    from flashcore.parity.suite import environment

    register()
    model = load_model(args.model, device="cuda").model
    latency = measure(model, NAME, cache_len=args.cache_len, steps=args.steps)
    env = environment(torch.device("cuda"))
    print(f"{args.model} bf16 on {env.device}; torch {env.torch}, triton {env.triton}, "
          f"transformers {env.transformers}; batch 1, {args.steps} tokens after a {args.cache_len}-token prompt")
    print(f"{'mode':<12}{'flashcore ms/tok':>18}{'sdpa ms/tok':>14}{'speedup':>10}  note")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for row in latency.rows:
        print(f"{row.mode:<12}{fmt(row.flashcore_ms):>18}{fmt(row.sdpa_ms):>14}{fmt(row.speedup):>10}  {row.note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "environment": asdict(env), "latency": asdict(latency)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
