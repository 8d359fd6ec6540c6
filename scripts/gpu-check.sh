#!/usr/bin/env bash
# The GPU checks, in one call of the device tool (docs/benchmarks.md "GPU" records what it printed):
#   run(command="bash scripts/gpu-check.sh", carry=[".whl"], timeout_s=590)
# .whl/ holds the wheels the GPU image lacks (zlib-ng, cryptography, cffi, pycparser), downloaded
# here for Python 3.12 manylinux x86-64 (the device README's `pip download` line).
# Each step has its own time limit and the script goes on after a failure, so one broken step
# never costs the others' figures; every log lands in $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "wheel install failed"
fi
# The project from the working tree on the image's own torch (not the 2.13 pin).
export PYTHONPATH="$PWD/src:/tmp/site"

step() {  # step NAME SECONDS CMD...: run CMD under a limit, its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - start))s"
}

{
  date -u
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nproc; free -g | head -2; df -h /tmp | tail -1
  python3 -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
  python3 -c 'import torchaux, zlib_ng, cryptography; print("torchaux imports;", cryptography.__version__)'
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

step gpu-tests 110 python3 -m pytest -q -m gpu --timeout 100 -p no:cacheprovider -o addopts="" \
  --strict-markers tests/checkpoint/engine/test_cuda.py tests/training/test_graph_dump.py \
  tests/training/test_combine.py tests/distributed/test_dist_cuda.py \
  tests/cli/bench/suites/test_cuda_suite.py
step bench-cuda 130 env TORCHAUX_BENCH_REPEATS=3 \
  python3 -m torchaux bench --cuda --size-mib 4096 --json "$OUT/bench-cuda.json" -v
step bench-loop-cuda 100 python3 -m torchaux bench --device cuda --size-mib 512 --steps 16 --every 4 --batch 256 \
  --method torch.save --method torchaux.save_async --method "torchaux.save_async(model=)" \
  --json "$OUT/bench-loop-cuda.json" -v
step bench-dist-cuda 110 python3 -m torchaux bench --distributed --device cuda --size-mib 512 --steps 12 --every 3 \
  --json "$OUT/bench-dist-cuda.json" -v
echo "done at $SECONDS s"
