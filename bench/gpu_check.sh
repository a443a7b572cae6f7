#!/usr/bin/env bash
# The GPU path in one go, for a machine with a CUDA GPU (never part of the tests or CI):
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. bf16 LoRA and QLoRA training on the support-intents example (100 steps each), with tokens/s and peak memory;
# 2. the same through TRL, for the throughput table (bench/train_throughput.py, cuda);
# 3. two processes of data parallelism (NCCL) against one;
# 4. if vllm is installed: the exported production model served by vLLM (--enable-lora) against our server.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-check}
mkdir -p "$OUT"
T=.venv/bin/tunewise
C=examples/support-intents/tunewise.yaml
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
for m in lora qlora; do
  $T train $C --fresh --set output_dir="$OUT/$m" --set training.method=$m --set training.max_steps=100 --set model.device=cuda \
    --set model.dtype=bfloat16 2>&1 | tee "$OUT/train-$m.log" | tail -14
done
.venv/bin/pip install -q -r bench/requirements.txt
.venv/bin/python bench/train_throughput.py --workload banking --impls tunewise,trl --steps 30 2>&1 | tee "$OUT/throughput.txt" | tail -20
$T train $C --fresh --set output_dir="$OUT/ddp1" --set training.max_steps=50 --set model.device=cuda 2>&1 | tail -3
$T train $C --fresh --processes 2 --set output_dir="$OUT/ddp2" --set training.max_steps=50 --set model.device=cuda 2>&1 | tail -3 || true
if .venv/bin/python -c "import vllm" 2>/dev/null; then
  $T export $C production --out "$OUT/export" && bash "$OUT/export/serve.sh" &
  echo "vLLM started from $OUT/export; compare its answers with tunewise serve on the same prompts"
fi
echo "results in $OUT"
