#!/usr/bin/env bash
# GPU check, no network needed, a few minutes on one GPU:
#   1. ViT-B/16 (random init, the real architecture) Stage-1 training throughput with bf16
#      autocast at batch 64 and 128, and peak GPU memory;
#   2. evaluation protocol speed with ViT-B/16 (images/s, 1 vs 10 splits);
#   3. a short end-to-end synthetic run (prepare -> train 3 epochs -> baseline and
#      fine-tuned evaluation -> summary table) on the GPU.
# Ends with one summary block to quote. Usage: bash benchmarks/gpu_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-python3}}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
"$PY" benchmarks/bench_train.py --device cuda --models vitb16 --batch-sizes 64 128 --amp bf16 \
    --steps 12 --out "$WORK/train.md"
"$PY" benchmarks/bench_eval.py --device cuda --model vitb16 --subjects 40 --out "$WORK/eval.md"

"$PY" datasets/make_synthetic_hands.py --out "$WORK/raw" --subjects 40
"$PY" datasets/prepare_11k.py --raw "$WORK/raw" > /dev/null
e2e_start=$(date +%s)
"$PY" run_all_finetuned_stage1.py --train --configs 'configs/demo/eval_*.yml' --out "$WORK/summary" \
    --set data_dir="$WORK/raw" --set model=vitb16 --set pretrained=none --set lr=1e-4 \
    --set epochs=3 --set warmup_epochs=1 --set num_workers=8 --set device=cuda \
    --set save_path="$WORK/vitb16.pth" --set log_path="$WORK/logs/train.log" \
    --set results_dir="$WORK/results" > "$WORK/e2e.log" 2>&1 || { tail -40 "$WORK/e2e.log"; exit 1; }
e2e_seconds=$(( $(date +%s) - e2e_start ))

echo
echo "==================== GPU CHECK SUMMARY ===================="
"$PY" -c "import torch; p=torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory/2**30:.0f} GiB, torch {torch.__version__}')"
cat "$WORK/train.md" "$WORK/eval.md"
echo "End-to-end synthetic run (ViT-B/16 random init, 3 epochs, train + 2 evaluations): ${e2e_seconds} s"
cat "$WORK/summary.md"
echo "total: $(( $(date +%s) - started )) s"
echo "============================================================"
