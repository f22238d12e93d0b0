#!/bin/bash
# twelfth run, call 8: CHUNKED_PREFILL_SIZE default 16384 for in-process engines on large cards
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
for c in 0 8192 0 8192; do
  CHUNKED_PREFILL_SIZE=$c timeout 80 python3 bench_suite.py offline --model $m --load-format dummy --results-dir $OUT/c$c --skip-baseline 2>&1 | grep -E "SUMMARY" | cut -c1-120 | sed "s/^/chunk=$c /"
done
echo "t=$(( $(date +%s) - t0 ))"
timeout 170 python3 bench_suite.py shared_prefix --model $m --load-format dummy --results-dir $OUT --skip-baseline 2>&1 | grep -E "SUMMARY|piecewise" | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
rm -rf $OUT/*.png $OUT/*/*.png
