"""Time flashcore's attention kernels beside PyTorch SDPA (enable_gqa=True), in one process on one card.

    python benchmarks/bench_attention.py --tune --apply --sweep --baseline .kx/.baseline --json out.json

Decode is timed the way a model step sees it: a CUDA graph holding one call per layer over 32 separate caches
(fewer where 32 would not fit in --layer-gib), replayed; the figure is the median replay time divided by the
layers. SDPA reads the whole cache with no mask (kv_lens = the cache length for flashcore too).
  --tune     times each candidate launch configuration (decode.DecodeConfig) on one shape per cell of the
             launch table (rows = batch * KV heads, keys = cache slots) at 32:32, 32:8 and 64:8 heads (one
             table per query-head group, GROUP_EDGES) and prints the table it would pick (pick_table);
  --apply    installs that table for the rest of the run (what the sweep then measures);
  --sweep    the decode sweep (GQA 32:8 at B 1..64 and caches 512..131072; GQA 8:1 (64:8) and MHA (32:32)),
             eager host time per call and do_bench (L2 flushed) at two shapes, causal prefill at 2048..16384;
  --prefill-sweep  causal prefill also with each of PREFILL_CANDIDATES (prefill.PrefillConfig) beside SDPA;
  --baseline DIR  also times DIR/flashcore_before (benchmarks/make_baseline.py: the kernels of another revision).
HBM floor = KV bytes / measured device-to-device copy bandwidth (bytes read + written). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from flashcore.ops import decode as decode_mod
from flashcore.ops import decode_attention, prefill_attention
from flashcore.ops import prefill as prefill_mod
from flashcore.ops.decode import DecodeConfig
from flashcore.ops.prefill import PrefillConfig

D = 128
DTYPE = torch.bfloat16
LLAMA = (32, 8)  # Hq, Hkv of LLaMA-3.1-8B
ROW_EDGES = (16, 128, 256, 2**62)          # launch-table cells: rows = batch * KV heads ...
KEY_EDGES = (4096, 16384, 65536, 2**62)     # ... and cache slots; per cell one measured (batch, cache): cell_shape
GROUP_EDGES = {(32, 32): 1, LLAMA: 4, (64, 8): 2**62}  # per query-head group (the kernel's M dimension) a
                                                       # table of its own: MHA, groups <= 4 (32:8), larger (8:1)
CELL_ROWS_KEYS = {(r, k): (rows, keys if keys <= 32768 or rows <= 64 else 65536)
                  for r, rows in zip(ROW_EDGES, (8, 64, 256, 512))
                  for k, keys in zip(KEY_EDGES, (2048, 8192, 32768, 131072))}


def cell_shape(heads, cell) -> tuple[int, int]:
    """(batch, cache) measured for a launch-table cell at these heads; batch 0 where no batch reaches the cell."""
    rows, keys = CELL_ROWS_KEYS[cell]
    return rows // heads[1], keys
CANDIDATES = [
    DecodeConfig(),                                                     # the default
    DecodeConfig(min_chunk=128, waves=4),                               # more, shorter splits
    DecodeConfig(min_chunk=512, waves=1),                               # fewer, longer splits
    DecodeConfig(waves=6),                                              # several waves at large batch
    DecodeConfig(num_stages=2),                                         # less shared memory
    DecodeConfig(num_stages=2, min_chunk=512, waves=1),
    DecodeConfig(num_stages=2, min_chunk=128, waves=4),
    DecodeConfig(pdl=True),                                             # programmatic dependent launch
    DecodeConfig(num_stages=2, pdl=True),
    DecodeConfig(num_warps=8),                                          # more loads in flight per program
    DecodeConfig(num_warps=8, min_chunk=512, waves=1),
]
SWEEP = ([(LLAMA, b, s) for b, s in [(1, 512), (1, 2048), (1, 8192), (1, 32768), (1, 131072), (8, 2048), (8, 8192),
                                      (8, 32768), (32, 2048), (32, 8192), (64, 512), (64, 4096)]]
         + [((64, 8), b, s) for b, s in [(1, 8192), (8, 8192), (32, 2048)]]
         + [((32, 32), b, s) for b, s in [(1, 8192), (8, 2048), (32, 2048)]])
HOST_SHAPES = [(1, 2048), (8, 8192)]
PREFILL_SEQS = (2048, 4096, 8192, 16384)
PREFILL_CALLS = 8  # calls per timed graph
PREFILL_CANDIDATES = [  # --prefill-sweep: D 128 configurations (the installed table is timed first)
    PrefillConfig(),
    PrefillConfig(heads_fast=True),
    PrefillConfig(block_m=64, num_warps=4),
    PrefillConfig(block_m=64, num_warps=4, heads_fast=True),
    PrefillConfig(heads_fast=True, warp_spec=True),
]


def log(*parts) -> None:
    print(*parts, flush=True)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**29, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def graph_us(calls, reps: int = 30) -> float:
    """Median time of a CUDA graph replaying `calls` (thunks) back to back, divided by len(calls)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # compile / plan outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.05:  # clocks ramp up from idle before timing
        graph.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return sorted(times)[len(times) // 2]


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per eager call: calls issued back to back, timed on the CPU (the GPU runs behind)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


class Layers:
    """One decode query and a full KV cache per layer: `count` layers, as many as --layer-gib holds (<= 32)."""

    def __init__(self, heads, batch: int, seq: int, budget_bytes: int, count: int = 32):
        hq, hkv = heads
        self.heads, self.batch, self.seq = heads, batch, seq
        self.kv_bytes = 2 * batch * hkv * seq * D * 2
        self.count = max(1, min(count, budget_bytes // self.kv_bytes))
        self._ref = None
        self.sets = []
        for _ in range(self.count):
            q = torch.randn(batch, hq, 1, D, device="cuda", dtype=DTYPE)
            k = torch.randn(batch, hkv, seq, D, device="cuda", dtype=DTYPE)
            v = torch.randn(batch, hkv, seq, D, device="cuda", dtype=DTYPE)
            self.sets.append((q, k, v, torch.full((batch,), seq, device="cuda", dtype=torch.int32)))

    def calls(self, fn):
        return [lambda s=s: fn(*s) for s in self.sets]

    def max_error(self, fn) -> float:
        """Max |fn - fp32 reference| over batch row 0 of the first layer (the reference once, on that row only)."""
        q, k, v, lens = self.sets[0]
        if self._ref is None:
            self._ref = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float(), enable_gqa=True)
        return (fn(q, k, v, lens)[:1].float() - self._ref).abs().max().item()


def sdpa_decode(q, k, v, lens):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def install_table(table) -> None:
    decode_mod.GPU_TABLE = tuple(table)
    decode_mod._PLANS.clear()  # plans keep the configuration they were made with


def table_rows(table) -> list[dict]:
    return [dict(most_group=group, most_rows=rows, most_keys=keys, **vars(cfg)) for group, rows, keys, cfg in table]


def load_table(path: str) -> list:
    """The launch table a --tune run wrote to its --json document ("table")."""
    with open(path) as fh:
        rows = json.load(fh)["table"]
    return [(r.pop("most_group"), r.pop("most_rows"), r.pop("most_keys"), DecodeConfig(**r)) for r in rows]


def tune(budget: int) -> list[dict]:
    """Each candidate on each cell's shape, for each GROUP_EDGES grouping: one result row per measurement."""
    original = decode_mod.GPU_TABLE
    results = []
    try:
        for heads in GROUP_EDGES:
            for batch, seq in sorted({cell_shape(heads, cell) for cell in CELL_ROWS_KEYS}):
                if batch == 0:
                    continue
                layers = Layers(heads, batch, seq, budget)
                for cfg in CANDIDATES:
                    install_table([(2**62, 2**62, 2**62, cfg)])
                    try:
                        err = layers.max_error(decode_attention)
                        if not err < 2e-2:
                            raise AssertionError(f"max error {err}")
                        us = graph_us(layers.calls(decode_attention), reps=20)
                    except Exception as exc:  # a candidate that fails is reported, not fatal
                        log(f"tune {heads} B={batch} S={seq} {cfg}: failed: {str(exc).splitlines()[0][:200]}")
                        continue
                    results.append(dict(vars(cfg), hq=heads[0], hkv=heads[1], batch=batch, seq=seq,
                                        layers=layers.count, graph_us=us))
                    log(f"tune {heads} B={batch:>2} S={seq:>6} {cfg}: {us:7.2f} us")
                del layers
                torch.cuda.empty_cache()
    finally:
        install_table(original)
    return results


def pick_table(results: list[dict]) -> list[tuple]:
    """The launch table from tune()'s rows: per grouping and cell the fastest candidate, the default unless the
    fastest is >= 3% faster (the table keeps no choice that timing noise could have made)."""
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    table = []
    for (hq, hkv), group_edge in GROUP_EDGES.items():
        for (rows_edge, keys_edge) in CELL_ROWS_KEYS:
            batch, seq = cell_shape((hq, hkv), (rows_edge, keys_edge))
            timed = {DecodeConfig(**{k: r[k] for k in fields}): r["graph_us"] for r in results
                     if (r["hq"], r["hkv"], r["batch"], r["seq"]) == (hq, hkv, batch, seq)}
            best = min(timed, key=timed.get, default=DecodeConfig())
            keep = best if timed.get(best, math.inf) < 0.97 * timed.get(DecodeConfig(), math.inf) else DecodeConfig()
            table.append((group_edge, rows_edge, keys_edge, keep))
    return table


def decode_row(heads, batch: int, seq: int, bandwidth: float, budget: int, impls: dict) -> dict:
    layers = Layers(heads, batch, seq, budget)
    row = dict(hq=heads[0], hkv=heads[1], batch=batch, seq=seq, layers=layers.count,
               hbm_floor_us=layers.kv_bytes / bandwidth * 1e6)
    for name, fn in impls.items():
        try:
            err = layers.max_error(fn)
            if not err < 2e-2:
                raise AssertionError(f"max error {err}")
            row[f"{name}_graph_us"] = graph_us(layers.calls(fn))
        except Exception as exc:
            row[f"{name}_graph_us"] = None
            log(f"decode {name} {heads} B={batch} S={seq}: failed: {str(exc).splitlines()[0][:200]}")
    del layers
    torch.cuda.empty_cache()
    return row


def host_row(batch: int, seq: int, impls: dict) -> dict:
    layers = Layers(LLAMA, batch, seq, 0, count=1)
    q, k, v, lens = layers.sets[0]
    row = dict(batch=batch, seq=seq)
    for name, fn in impls.items():
        call = lambda fn=fn: fn(q, k, v, lens)  # noqa: E731
        row[f"{name}_host_us"] = min(host_us(call) for _ in range(3))
        row[f"{name}_do_bench_us"] = do_bench(call, warmup=25, rep=200, return_mode="median") * 1e3
    return row


def prefill_row(seq: int, configs) -> dict:
    """Causal prefill at B=1, GQA 32:8, TFLOP/s of flashcore (each of `configs`, None = the installed one) and
    of SDPA, on the same tensors; each config checked against SDPA first. Timed as PREFILL_CALLS calls in one
    CUDA graph (GPU time: an eager call's host overhead, 50-100 µs for a triton launch on the box's CPU, would
    otherwise show at short lengths, where the whole kernel takes ~90 µs)."""
    hq, hkv = LLAMA
    q = torch.randn(1, hq, seq, D, device="cuda", dtype=DTYPE)
    k = torch.randn(1, hkv, seq, D, device="cuda", dtype=DTYPE)
    v = torch.randn(1, hkv, seq, D, device="cuda", dtype=DTYPE)
    flops = 4 * hq * seq * seq * D / 2  # causal: half the score matrix
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    sd_us = graph_us([sdpa] * PREFILL_CALLS)
    row = dict(seq=seq, sdpa_tflops=flops / sd_us / 1e6, configs=[])
    original = prefill_mod.GPU_PREFILL[D]
    try:
        for cfg in configs:
            if cfg is not None:
                prefill_mod.GPU_PREFILL[D] = ((2**62, cfg),)
            entry = dict(vars(prefill_mod.prefill_config(D, seq, DTYPE, on_gpu=True)), table=cfg is None)
            try:
                err = (prefill_attention(q, k, v).float() - sdpa().float()).abs().max().item()
                if not err < 3e-2:
                    raise AssertionError(f"max error vs sdpa {err}")
                fc_us = graph_us([lambda: prefill_attention(q, k, v)] * PREFILL_CALLS)
                entry.update(flashcore_tflops=flops / fc_us / 1e6, ratio=sd_us / fc_us)
            except Exception as exc:  # a configuration that fails to compile or to match is reported
                entry.update(flashcore_tflops=None, ratio=None, error=str(exc).splitlines()[0][:200])
            row["configs"].append(entry)
    finally:
        prefill_mod.GPU_PREFILL[D] = original
    first = row["configs"][0]
    row.update(flashcore_tflops=first["flashcore_tflops"], ratio=first["ratio"])
    return row


def prefill_sweep(seqs, candidates) -> list[dict]:
    """prefill_row at each length: the installed table, then each candidate."""
    rows = []
    for seq in seqs:
        rows.append(prefill_row(seq, [None, *candidates]))
        for entry in rows[-1]["configs"]:
            shown = {k: v for k, v in entry.items() if k not in ("flashcore_tflops", "ratio", "error")}
            result = (f"{entry['flashcore_tflops']:.0f} TFLOP/s, {entry['ratio']:.3f}x SDPA"
                      if entry["ratio"] else f"failed: {entry['error']}")
            log(f"prefill S={seq} sdpa {rows[-1]['sdpa_tflops']:.0f}: {result} {shown}")
        torch.cuda.empty_cache()
    return rows


def print_decode(rows: list[dict], names: list[str]) -> None:
    fmt = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    log("| Hq:Hkv | B | cache | layers | " + " | ".join(f"{n} µs" for n in names)
        + " | SDPA / flashcore | HBM floor µs | flashcore / floor |")
    log("|---|---:|---:|---:|" + "---:|" * (len(names) + 3))
    for r in rows:
        fc, sd = r.get("flashcore_graph_us"), r.get("sdpa_graph_us")
        log(f"| {r['hq']}:{r['hkv']} | {r['batch']} | {r['seq']} | {r['layers']} | "
            + " | ".join(fmt(r.get(f"{n}_graph_us"), 2) for n in names)
            + f" | {fmt(sd / fc if fc and sd else None, 2)} | {fmt(r['hbm_floor_us'], 2)} | "
            f"{fmt(fc / r['hbm_floor_us'] if fc else None, 2)} |")


def table_source(table) -> str:
    """The table as decode.py spells it (only the fields that differ from DecodeConfig's defaults)."""
    edge = lambda n: "2**62" if n >= 2**62 else str(n)  # noqa: E731
    lines = ["GPU_TABLE: tuple[tuple[int, int, int, DecodeConfig], ...] = ("]
    for group, rows, keys, cfg in table:
        changed = ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
                            if getattr(cfg, f.name) != f.default)
        lines.append(f"    ({edge(group)}, {edge(rows)}, {edge(keys)}, DecodeConfig({changed})),")
    return "\n".join(lines + [")"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--apply", action="store_true", help="use the tuned table for the rest of the run")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--prefill-sweep", action="store_true", help="time each PREFILL_CANDIDATES config")
    parser.add_argument("--baseline", help="a directory holding flashcore_before (benchmarks/make_baseline.py)")
    parser.add_argument("--layer-gib", type=float, default=30.0, help="GPU memory for one shape's caches")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    budget = int(args.layer_gib * 2**30)
    impls = {"flashcore": decode_attention, "sdpa": sdpa_decode}
    if args.baseline:
        sys.path.insert(0, args.baseline)
        impls["before"] = importlib.import_module("flashcore_before.ops").decode_attention

    bandwidth = copy_bandwidth()
    log(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    doc = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), copy_bandwidth_tb_s=bandwidth / 1e12, head_dim=D, dtype=str(DTYPE))

    def save() -> None:  # after every phase: a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(doc, fh, indent=1, default=str)

    if args.tune:
        doc["tune"] = tune(budget)
        table = pick_table(doc["tune"])
        doc["table"] = table_rows(table)
        log(table_source(table))
        if args.apply:
            install_table(table)
    doc["applied_table"] = table_rows(decode_mod.GPU_TABLE)
    save()
    if args.sweep:
        doc["decode"] = []
        for heads, batch, seq in SWEEP:
            doc["decode"].append(decode_row(heads, batch, seq, bandwidth, budget, impls))
            r = doc["decode"][-1]
            log(f"decode {heads} B={batch} S={seq}: " + ", ".join(
                f"{n} {r[f'{n}_graph_us']:.2f}" for n in impls if r[f"{n}_graph_us"] is not None))
        save()
        doc["host"] = [host_row(b, s, impls) for b, s in HOST_SHAPES]
        for r in doc["host"]:
            log(f"host B={r['batch']} S={r['seq']}: " + ", ".join(
                f"{n} {r[f'{n}_host_us']:.1f} us host / {r[f'{n}_do_bench_us']:.1f} us do_bench" for n in impls))
        save()
        print_decode(doc["decode"], list(impls))
    if args.sweep or args.prefill_sweep:
        doc["prefill"] = prefill_sweep(PREFILL_SEQS, PREFILL_CANDIDATES if args.prefill_sweep else [])
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
