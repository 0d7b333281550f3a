"""Whole-model decode latency: flashcore vs PyTorch SDPA, ms per generated token after a long prompt.

    python benchmarks/bench_decode_model.py [--model llama-3.1-8b] [--cache-len 2048] [--steps 64] [--json PATH]
                                            [--compiled] [--generate-compiled] [--decode-table JSON]

Same process, same weights, same prompt: eager decoding over a DynamicCache, and one decode step captured as a
CUDA graph over a StaticCache (flashcore.parity.latency). --compiled adds the same CUDA-graph step with the
elementwise blocks around attention compiled (flashcore.integrations.compiled: fused RMSNorm, rotary embedding
and SwiGLU), for flashcore and for SDPA. --generate-compiled adds HF generate() with a static cache, which
torch.compiles the decode step itself, for flashcore and for eager attention (SDPA is left out there: it takes
~573 ms/token on this path). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


class _StepClock:
    """A logits processor that only reads the clock: generate() calls it once per generated token."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def generate_compiled_ms(model, prompt: torch.Tensor, steps: int) -> float:
    """ms/token of generate() with a static cache (which torch.compiles the decode step): the clock is read at
    every token; the prefill step is excluded. A first identical call compiles (same shapes: no recompile)."""
    from transformers import LogitsProcessorList

    def run() -> list[float]:
        clock = _StepClock()
        model.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                       cache_implementation="static", pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        return clock.times

    run()
    times = run()
    return (times[-1] - times[1]) * 1e3 / (len(times) - 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--cache-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--generate-compiled", action="store_true")
    parser.add_argument("--decode-table", help="a bench_attention.py --tune --json document: use its launch table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_model: needs a CUDA GPU (the CPU runs the kernels in the Triton interpreter)",
              file=sys.stderr)
        return 2
    from flashcore.integrations import NAME, register, set_attention
    from flashcore.models import load_model
    from flashcore.parity.latency import measure
    from flashcore.parity.suite import environment

    if args.decode_table:
        from bench_attention import install_table, load_table
        install_table(load_table(args.decode_table))
    register()
    model = load_model(args.model, device="cuda").model
    latency = measure(model, NAME, cache_len=args.cache_len, steps=args.steps)
    env = environment(torch.device("cuda"))
    print(f"{args.model} bf16 on {env.device}; torch {env.torch}, triton {env.triton}, "
          f"transformers {env.transformers}; batch 1, {args.steps} tokens after a {args.cache_len}-token prompt")
    extra = {}
    print(f"{'mode':<12}{'flashcore ms/tok':>18}{'sdpa ms/tok':>14}{'speedup':>10}  note")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for row in latency.rows:
        print(f"{row.mode:<12}{fmt(row.flashcore_ms):>18}{fmt(row.sdpa_ms):>14}{fmt(row.speedup):>10}  {row.note}")
    if args.generate_compiled:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.cache_len), generator=g).to("cuda")
        for attn in (NAME, "eager"):
            try:
                extra[f"generate_compiled_{attn}"] = generate_compiled_ms(set_attention(model, attn), prompt, args.steps)
                print(f"generate(static cache, auto-compile) {attn:<8} {extra[f'generate_compiled_{attn}']:.2f} "
                      "ms/token")
            except Exception as exc:  # noqa: BLE001 - report and go on
                extra[f"generate_compiled_{attn}"] = None
                print(f"generate(static cache, auto-compile) {attn:<8} failed: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "environment": env.model_dump(), "latency": latency.model_dump(),
                       "extra_ms_per_token": extra}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
