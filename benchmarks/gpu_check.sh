#!/usr/bin/env bash
# One device session, most important first, each step under its own time limit:
#   1. the CUDA-graph training step against the eager one (tests/test_cuda_graphs.py);
#   2. the 32 px throughput benchmark (--quick): plain / ours graphed / ours eager / cache;
#   3. 224 px: our two-stage recipe vs fastai's fine_tune(1) (benchmarks/gpu_224.py);
#   4. real two-stage runs through the worker on CUDA (benchmarks/gpu_check.py).
# Data: a small CIFAR-10 JPEG subset (benchmarks.make_subset: 500 train + 100 test images
# per class), $BENCH_DATA. Wheels the GPU machine lacks (SQLAlchemy for the run store;
# fastai and its helpers for gpu_224's baseline only), $WHEELS, go to /tmp/site, never
# into the project's requirements.
# Usage (device machine, in the repo or a copy of it):
#   OUT=/some/dir BENCH_DATA=... WHEELS=... bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
DATA=${BENCH_DATA:-.benchdata/cifar-subset}
WHEELS=${WHEELS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FINETUNE_LAB_DATA=/tmp/finetune-lab-gpu TORCH_HOME=/tmp/torch-home
PY=${PYTHON:-python3}
if [ -n "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  echo "cpus $(nproc)"; uname -r
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
T0=$SECONDS
timeout 150 $PY -m pytest -q -p no:cacheprovider -rsP tests/test_cuda_graphs.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}; echo "[tests exit $tests at $((SECONDS - T0)) s]"
timeout 200 $PY -m benchmarks.throughput --quick --device cuda --data "$DATA" --images 5000 \
    --json-out "$OUT/throughput_cuda.json" 2>&1 | tee "$OUT/throughput_cuda.log"
bench=${PIPESTATUS[0]}; echo "[throughput exit $bench at $((SECONDS - T0)) s]"
timeout 200 $PY -m benchmarks.gpu_224 --data "$DATA" --work /tmp/gpu224 \
    --json-out "$OUT/gpu_224.json" 2>&1 | tee "$OUT/gpu_224.log"
g224=${PIPESTATUS[0]}; echo "[gpu_224 exit $g224 at $((SECONDS - T0)) s]"
check=0
if [ "${WORKER_CHECK:-1}" = 1 ]; then  # WORKER_CHECK=0 skips it (a rerun after it passed)
  timeout 120 $PY -m benchmarks.gpu_check --data "$DATA" --json-out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
  check=${PIPESTATUS[0]}
fi
echo "tests exit $tests, throughput exit $bench, gpu_224 exit $g224, gpu_check exit $check ($((SECONDS - T0)) s)"
exit $(( tests || bench || g224 || check ))
