#!/usr/bin/env bash
# One GPU session in one command: the GPU tests of the decode kernel and the compiled decode blocks, the kernel
# benchmark (launch-table tuning, then the sweep with SDPA and the previous kernels beside it), then the 8B
# whole-model decode benchmark. Results and logs go to $OUT (default /tmp/flashcore-gpu); stdout gets summaries.
#
#   python benchmarks/make_baseline.py --rev main --out .baseline    # on a machine with the git history
#   OUT=/tmp/out bash benchmarks/gpu_run.sh                           # on the GPU box, from the repository root
set -u
OUT=${OUT:-/tmp/flashcore-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
BASELINE=()
[ -d .baseline/flashcore_before ] && BASELINE=(--baseline .baseline)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $PY -c "import torch, triton, transformers, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'python', platform.python_version(), 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "== $name: rc=$? in $((SECONDS - t0)) s"; }
SELECT=()
[ -n "${PYTEST_K:-}" ] && SELECT=(-k "$PYTEST_K")   # e.g. PYTEST_K="graph or llama" for a shorter session
step pytest timeout "${PYTEST_S:-240}" $PY -m pytest -q -p no:cacheprovider "${SELECT[@]}" \
    tests/ops/test_ops_decode.py tests/integrations/test_compiled_decode.py > "$OUT/pytest.log" 2>&1
tail -n 15 "$OUT/pytest.log"
step bench_attention timeout "${ATTN_S:-300}" $PY benchmarks/bench_attention.py --tune --apply --sweep "${BASELINE[@]}" \
    --json "$OUT/bench_attention.json" > "$OUT/bench_attention.log" 2>&1
grep -v "^tune " "$OUT/bench_attention.log" | grep -v "^decode (" | tail -n 60
step decode_model timeout "${MODEL_S:-240}" $PY benchmarks/bench_decode_model.py --steps 32 \
    --decode-table "$OUT/bench_attention.json" --json "$OUT/decode_model.json" > "$OUT/decode_model.log" 2>&1
tail -n 12 "$OUT/decode_model.log"
