"""Time flashcore's attention kernels beside PyTorch SDPA (enable_gqa=True) on LLaMA-3.1-8B heads.

    python benchmarks/bench_attention.py --json docs/bench_attention.json

Shapes: Hq 32, Hkv 8, D 128, bf16. Decode: B in {1, 8} x a full cache of {512, 2048, 8192, 32768} keys;
causal prefill at 2048 and 8192 (B=1). Each figure is a median:
  - "do_bench": triton.testing.do_bench (L2 flushed before each call; includes the host launch cost of a call);
  - "host": host time of one eager call (mean over 200 calls issued back to back without a sync);
  - "graph": CUDA-graph replay of calls over rotating cache copies (so the cache is not L2-resident),
    divided by the calls per replay: what a graphed whole-model decode step pays.
HBM floor = KV bytes / measured device-to-device copy bandwidth (bytes read + written / time).
--sweep then times a few launch configurations of each kernel (for tuning).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from flashcore.ops import decode_attention, prefill_attention
from flashcore.ops import decode as decode_mod
from flashcore.ops import prefill as prefill_mod

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
L2_BYTES = 50 * 2**20


@dataclass
class Row:
    op: str
    batch: int
    seq: int
    flashcore_us: float
    sdpa_us: float
    flashcore_graph_us: float | None = None
    sdpa_graph_us: float | None = None
    hbm_floor_us: float | None = None
    flashcore_host_us: float | None = None
    sdpa_host_us: float | None = None
    flashcore_tflops: float | None = None
    sdpa_tflops: float | None = None

    @property
    def speedup(self) -> float:
        fc = self.flashcore_graph_us or self.flashcore_us
        sd = self.sdpa_graph_us or self.sdpa_us
        return sd / fc


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**29, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def graph_us(calls, reps: int = 50) -> float:
    """Median time per call of a CUDA graph replaying `calls` (a list of thunks) back to back."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm up / compile outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.05:  # 50 ms of replays: clocks ramp up from idle before timing
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    times.sort()
    return times[len(times) // 2]


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


def decode_sets(batch: int, seq: int):
    """Enough independent (q, k, v, kv_lens) sets that cycling through them defeats the L2 cache."""
    kv_bytes = 2 * batch * HKV * seq * D * 2
    count = max(1, min(32, math.ceil(4 * L2_BYTES / kv_bytes)))
    sets = []
    for _ in range(count):
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=DTYPE)
        k = torch.randn(batch, HKV, seq, D, device="cuda", dtype=DTYPE)
        v = torch.randn(batch, HKV, seq, D, device="cuda", dtype=DTYPE)
        sets.append((q, k, v, torch.full((batch,), seq, device="cuda", dtype=torch.int32)))
    return sets, kv_bytes


def bench_decode(batch: int, seq: int, bandwidth: float) -> Row:
    sets, kv_bytes = decode_sets(batch, seq)
    fc = [lambda s=s: decode_attention(s[0], s[1], s[2], s[3]) for s in sets]
    sd = [lambda s=s: F.scaled_dot_product_attention(s[0], s[1], s[2], enable_gqa=True) for s in sets]
    q, k, v, lens = sets[0]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    err = (fc[0]().float() - ref).abs().max().item()
    assert err < 2e-2, f"decode B={batch} S={seq}: max error {err}"
    row = Row("decode", batch, seq,
              flashcore_us=do_bench(fc[0], warmup=25, rep=200, return_mode="median") * 1e3,
              sdpa_us=do_bench(sd[0], warmup=25, rep=200, return_mode="median") * 1e3,
              flashcore_graph_us=graph_us(fc), sdpa_graph_us=graph_us(sd),
              hbm_floor_us=kv_bytes / bandwidth * 1e6,
              flashcore_host_us=host_us(fc[0]), sdpa_host_us=host_us(sd[0]))
    del sets
    return row


def bench_prefill(batch: int, seq: int) -> Row:
    q = torch.randn(batch, HQ, seq, D, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, HKV, seq, D, device="cuda", dtype=DTYPE)
    v = torch.randn(batch, HKV, seq, D, device="cuda", dtype=DTYPE)
    flops = 4 * batch * HQ * seq * seq * D / 2  # causal: half the score matrix
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err = (prefill_attention(q, k, v).float() - ref.float()).abs().max().item()
    assert err < 3e-2, f"prefill S={seq}: max error vs sdpa {err}"
    fc_ms = do_bench(lambda: prefill_attention(q, k, v), warmup=50, rep=400, return_mode="median")
    sd_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                     warmup=50, rep=400, return_mode="median")
    return Row("prefill", batch, seq, flashcore_us=fc_ms * 1e3, sdpa_us=sd_ms * 1e3,
               flashcore_tflops=flops / (fc_ms * 1e-3) / 1e12, sdpa_tflops=flops / (sd_ms * 1e-3) / 1e12)


def sweep_prefill(configs, seqs=(2048, 8192)) -> list[dict]:
    original = prefill_mod._prefill_config
    results = []
    for cfg in configs:
        prefill_mod._prefill_config = lambda *a, cfg=cfg: dict(cfg)
        try:
            for seq in seqs:
                row = bench_prefill(1, seq)
                results.append(dict(cfg, seq=seq, us=row.flashcore_us, tflops=row.flashcore_tflops,
                                    sdpa_tflops=row.sdpa_tflops))
                print(f"sweep prefill {cfg} S={seq}: {row.flashcore_tflops:.0f} TFLOP/s "
                      f"(SDPA {row.sdpa_tflops:.0f}, ratio {row.flashcore_tflops / row.sdpa_tflops:.2f})", flush=True)
        except Exception as exc:  # a config that does not compile or fit is reported, not fatal
            print(f"sweep prefill {cfg}: failed: {str(exc).splitlines()[0][:200]}", flush=True)
        finally:
            prefill_mod._prefill_config = original
    return results


def sweep_decode(configs, shapes=((1, 2048), (1, 32768), (8, 8192))) -> list[dict]:
    original = decode_mod._decode_config
    results = []
    for cfg in configs:
        decode_mod._decode_config = lambda *a, cfg=cfg: dict(cfg)
        try:
            for batch, seq in shapes:
                sets, kv_bytes = decode_sets(batch, seq)
                us = graph_us([lambda s=s: decode_attention(s[0], s[1], s[2], s[3]) for s in sets])
                results.append(dict(cfg, batch=batch, seq=seq, graph_us=us))
                print(f"sweep decode {cfg} B={batch} S={seq}: {us:.1f} us", flush=True)
        except Exception as exc:
            print(f"sweep decode {cfg}: failed: {str(exc).splitlines()[0][:200]}", flush=True)
        finally:
            decode_mod._decode_config = original
    return results


PREFILL_SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, masked_stages=3, use_tma=False),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, masked_stages=2, use_tma=False),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, masked_stages=1, use_tma=False),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, masked_stages=1, use_tma=False),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, masked_stages=1, use_tma=True),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, masked_stages=3, use_tma=False, warp_spec=True),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, masked_stages=1, use_tma=True, warp_spec=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, masked_stages=1, use_tma=True, warp_spec=True),
]
DECODE_SWEEP = [
    dict(BLOCK_N=64, num_warps=4, num_stages=3, min_chunk=256, waves=2),
    dict(BLOCK_N=64, num_warps=4, num_stages=3, min_chunk=128, waves=4),
    dict(BLOCK_N=128, num_warps=4, num_stages=3, min_chunk=256, waves=2),
    dict(BLOCK_N=64, num_warps=8, num_stages=3, min_chunk=256, waves=1),
]


def print_table(rows: list[Row]) -> None:
    print(f"{'op':8} {'B':>2} {'seq':>6} | {'fc us':>8} {'sdpa us':>8} | {'fc graph':>8} {'sdpa graph':>10} "
          f"{'speedup':>7} {'HBM floor':>9} {'fc/floor':>8} | {'fc host':>7} {'sdpa host':>9} | "
          f"{'fc TFLOP/s':>10} {'sdpa TFLOP/s':>12}")
    for r in rows:
        fmt = lambda x, w, p=1: f"{x:{w}.{p}f}" if x is not None else " " * (w - 1) + "-"  # noqa: E731
        ratio = (r.flashcore_graph_us / r.hbm_floor_us) if r.hbm_floor_us else None
        print(f"{r.op:8} {r.batch:>2} {r.seq:>6} | {fmt(r.flashcore_us, 8)} {fmt(r.sdpa_us, 8)} | "
              f"{fmt(r.flashcore_graph_us, 8)} {fmt(r.sdpa_graph_us, 10)} {fmt(r.speedup, 7, 2)} "
              f"{fmt(r.hbm_floor_us, 9)} {fmt(ratio, 8, 2)} | {fmt(r.flashcore_host_us, 7)} "
              f"{fmt(r.sdpa_host_us, 9)} | {fmt(r.flashcore_tflops, 10, 0)} "
              f"{fmt(r.sdpa_tflops, 12, 0)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", choices=["decode", "prefill"], help="time one op only")
    parser.add_argument("--sweep", action="store_true", help="then time a few launch configurations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    bandwidth = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    if args.only != "prefill":
        for batch in (1, 8):
            for seq in (512, 2048, 8192, 32768):
                rows.append(bench_decode(batch, seq, bandwidth))
    if args.only != "decode":
        for seq in (2048, 8192):
            try:
                rows.append(bench_prefill(1, seq))
            except Exception as exc:  # keep the decode rows and the sweeps if the default prefill fails
                print(f"prefill S={seq} failed: {str(exc).splitlines()[0][:300]}", flush=True)
    print_table(rows)
    sweeps = {}
    if args.sweep:  # after the table, so that the table is timed on a cool card
        if args.only != "decode":
            sweeps["prefill"] = sweep_prefill(PREFILL_SWEEP)
        if args.only != "prefill":
            sweeps["decode"] = sweep_decode(DECODE_SWEEP[1:2])
        print_table(rows)
    if args.json:
        doc = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   python=platform.python_version(), copy_bandwidth_tb_s=bandwidth / 1e12,
                   shapes=dict(hq=HQ, hkv=HKV, head_dim=D, dtype=str(DTYPE)),
                   rows=[dict(asdict(r), speedup=r.speedup) for r in rows], sweeps=sweeps)
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
