#!/bin/bash
# eighteenth run, call 5 (nvidia-h200-x2): the tree with longest-first decode launches:
# one GPU against the pool on offline, rr against cache_aware on shared prefix, latency
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; m=.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log --oneline -1 2>/dev/null
bench="python3 bench_suite.py --model $m --load-format dummy --results-dir $OUT --skip-baseline"
s() { grep -E "SUMMARY|Error|rror:" | cut -c1-260; }
for r in 1 2; do
  CUDA_VISIBLE_DEVICES=0 timeout 100 $bench offline 2>&1 | tee $OUT/offline-1gpu-$r.txt | s
  ENABLE_MULTI_DEVICE=1 timeout 120 $bench offline 2>&1 | tee $OUT/pool-offline-2gpu-$r.txt | s
  echo "t=$(( $(date +%s) - t0 ))"
done
for mode in rr cache_aware; do
  ENABLE_MULTI_DEVICE=1 SCHEDULER_MODE=$mode timeout 150 $bench shared_prefix 2>&1 | tee $OUT/pool-shared-$mode.txt | s
  echo "t=$(( $(date +%s) - t0 ))"
done
CUDA_VISIBLE_DEVICES=0 timeout 60 $bench latency 2>&1 | tee $OUT/latency.txt | s
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*.png
