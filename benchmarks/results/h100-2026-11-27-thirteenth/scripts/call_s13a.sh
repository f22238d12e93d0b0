#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
OUT=$OUT/check timeout 200 bash benchmarks/gpu_check.sh equivalence 2>&1 | grep -E "passed|failed|FAIL|Error" | tail -5
echo "t=$(( $(date +%s) - t0 ))"
WORKLOAD=shared_prefix timeout 150 python3 .gpu/hosttime.py 2>&1 | grep -v "it/s\|req/s\|warn" | tail -26
WORKLOAD=shared_prefix timeout 150 python3 .gpu/idle.py 2>&1 | grep -v "it/s\|req/s\|warn" | tail -14
echo "t=$(( $(date +%s) - t0 ))"
for w in latency offline shared_prefix; do timeout 200 python3 bench_suite.py $w --model $m --load-format dummy --results-dir $OUT --skip-baseline 2>&1 | grep SUMMARY | cut -c1-170; done
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*.png
