#!/bin/bash
# seventeenth run, call 2 (nvidia-h200-x2): the admission fix (2503169) on shared prefix,
# one GPU and through the pool; offline through the pool; GPU equivalence
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; m=.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
bench="python3 bench_suite.py --model $m --load-format dummy --results-dir $OUT --skip-baseline"
s() { grep -E "SUMMARY|Error|rror:" | cut -c1-260; }
CUDA_VISIBLE_DEVICES=0 timeout 170 $bench shared_prefix 2>&1 | tee $OUT/shared-1gpu.txt | s
echo "t=$(( $(date +%s) - t0 ))"
for mode in rr cache_aware; do
  ENABLE_MULTI_DEVICE=1 SCHEDULER_MODE=$mode timeout 170 $bench shared_prefix 2>&1 | tee $OUT/pool-shared-$mode.txt | s
  echo "t=$(( $(date +%s) - t0 ))"
done
ENABLE_MULTI_DEVICE=1 timeout 100 $bench offline 2>&1 | tee $OUT/pool-offline-2gpu.txt | s
echo "t=$(( $(date +%s) - t0 ))"
CUDA_VISIBLE_DEVICES=0 MINISGL_TEST_DEVICE=cuda MINISGL_TEST_TOKENIZER=.gpu/tokenizer timeout 150 python3 -m pytest -q \
  -p no:cacheprovider tests/test_engine.py tests/test_cuda_graph.py \
  -k "not smollm2 and not multi_turn and not stop_string and not multibyte and not overlap_changes" 2>&1 \
  | tee $OUT/equivalence.txt | tail -3
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*.png
