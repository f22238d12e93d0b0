#!/bin/bash
# twelfth run, final call: 24bc217 (LM head warmed) — GPU equivalence, latency, offline against
# cc32aff (head) alternating, offline with 16k prefill chunks, shared prefix.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
OUT=$OUT/check timeout 200 bash benchmarks/gpu_check.sh equivalence 2>&1 | grep -E "passed|failed|FAIL|Error" | tail -5
echo "t=$(( $(date +%s) - t0 ))"
for i in 1 2; do timeout 60 python3 bench_suite.py latency --model $m --load-format dummy --results-dir $OUT --skip-baseline 2>&1 | grep SUMMARY | cut -c1-150; done
echo "t=$(( $(date +%s) - t0 ))"
for v in new head new head; do
  d=$root; [ $v = head ] && d=$root/.gpu/v_head
  (cd $d && PYTHONPATH=/tmp/site:. timeout 80 python3 bench_suite.py offline --model $m --load-format dummy --results-dir $OUT/$v --skip-baseline 2>&1 | grep -E "SUMMARY" | cut -c1-120 | sed "s/^/$v /")
done
CHUNKED_PREFILL_SIZE=16384 timeout 80 python3 bench_suite.py offline --model $m --load-format dummy --results-dir $OUT/c16k --skip-baseline 2>&1 | grep -E "SUMMARY" | cut -c1-120 | sed "s/^/new+16k /"
echo "t=$(( $(date +%s) - t0 ))"
timeout 170 python3 bench_suite.py shared_prefix --model $m --load-format dummy --results-dir $OUT --skip-baseline 2>&1 | grep SUMMARY | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
rm -rf $OUT/*.png $OUT/*/*.png
