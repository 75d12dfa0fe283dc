#!/usr/bin/env bash
# GPU check on a CUDA machine without the project's venv (its own torch + wheels carried in .whl/):
# the training-throughput benchmark with bf16 AMP, then a small end-to-end train/evaluate on the GPU.
# Usage (repo root): OUT=/some/dir bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-/tmp/resdx-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# 1. Throughput: (a) model alone, (b) ResDx data path, (c) MONAI-tutorial path; defaults, then GPU-sized batches.
python3 benchmarks/train.py --device cuda --amp --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
python3 benchmarks/train.py --device cuda --amp --batch-3d 16 --batch-2d 64 --cases 64 --workers 8 --only 3d \
  --json "$OUT/bench_gpu_big.json" 2>&1 | tee "$OUT/bench_gpu_big.txt"

# 2. End to end on the GPU: demo cohort -> ingest -> train (bf16, cudnn.benchmark) -> evaluate.
cat > /tmp/gpu_params.yaml <<YAML
synthesize: {out_dir: /tmp/g/demo, manifest: /tmp/g/demo.csv, n_patients: 150, workers: 12}
data: {manifest: /tmp/g/demo.csv, class_names: [no lesion, lesion]}
ingest: {out_dir: /tmp/g/ingested, cache_dir: /tmp/g/cache, workers: 12, spacing: [5.0, 5.0, 5.0]}
model: {name: resnet10}
train: {out_dir: /tmp/g/models, state_dir: /tmp/g/state, epochs: 15, lr: 0.0003, device: cuda}
evaluate: {out_dir: /tmp/g/reports}
mlflow: {enabled: false}
YAML
( time python3 -m pipeline.cli synthesize --params /tmp/gpu_params.yaml ) 2>&1 | tail -12
( time python3 -m pipeline.cli ingest --params /tmp/gpu_params.yaml ) 2>&1 | tail -16
( time python3 -m pipeline.cli train --params /tmp/gpu_params.yaml ) 2>&1 | tee "$OUT/train_gpu.txt" | tail -14
( time python3 -m pipeline.cli evaluate --params /tmp/gpu_params.yaml ) 2>&1 | tee "$OUT/eval_gpu.txt" | tail -10
cp /tmp/g/models/history.csv "$OUT/history_gpu.csv"
