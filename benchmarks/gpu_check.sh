#!/usr/bin/env bash
# One device session: CUDA correctness check through the real trainer (AMP on), then the
# throughput benchmark's GPU figures (--quick). Data: a small CIFAR-10 JPEG subset carried
# in .benchdata/cifar-subset (500 train + 100 test images per class), or $BENCH_DATA.
# Usage (device machine, repo root):  OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
DATA=${BENCH_DATA:-.benchdata/cifar-subset}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FINETUNE_LAB_DATA=/tmp/finetune-lab-gpu TORCH_HOME=/tmp/torch-home
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc;
  $PY -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)"; } 2>&1 | tee "$OUT/env.txt"
$PY -m benchmarks.gpu_check --data "$DATA" --json-out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
check=${PIPESTATUS[0]}
$PY -m benchmarks.throughput --quick --device cuda --data "$DATA" --images 5000 \
    --json-out "$OUT/throughput_cuda.json" 2>&1 | tee "$OUT/throughput_cuda.log"
bench=${PIPESTATUS[0]}
echo "gpu_check exit $check, throughput exit $bench"
exit $(( check || bench ))
