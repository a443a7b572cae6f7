#!/usr/bin/env bash
# The GPU path in one go, for a machine with a CUDA GPU (never part of the tests or CI):
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. bf16 LoRA and QLoRA training on the support-intents example (100 steps each), with tokens/s and peak memory;
# 2. the same through TRL, for the throughput table (bench/train_throughput.py, cuda);
# 3. two processes of data parallelism (NCCL) against one;
# 4. if vllm is installed: the exported production model served by vLLM (--enable-lora) against our server;
# 5. a non-Llama family (Qwen3 at Qwen3-0.6B's shape, random weights: the machine cannot download any) trained and
#    evaluated in bf16, its tokens/s and peak memory printed beside the Llama-shaped LoRA run of step 1.
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
.venv/bin/python bench/random_family.py "$OUT/qwen3-0.6b" --family qwen3 --size 0.6b
$T train $C --fresh --set output_dir="$OUT/qwen3" --set model.name="$OUT/qwen3-0.6b" --set training.method=lora \
  --set training.max_steps=100 --set model.device=cuda --set model.dtype=bfloat16 2>&1 | tee "$OUT/train-qwen3.log" | tail -14
$T eval $C -v fine-tuned --set output_dir="$OUT/qwen3" --set model.name="$OUT/qwen3-0.6b" --set model.device=cuda \
  --set model.dtype=bfloat16 --set evaluation.max_samples=200 2>&1 | tee "$OUT/eval-qwen3.log" | tail -8
for f in lora qwen3; do
  echo "$f: $(grep -E 'tokens_per_s|peak_memory_mb' "$OUT/train-$f.log" | tr -s ' ' | tr '\n' ' ')"
done
echo "results in $OUT"
