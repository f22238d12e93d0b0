#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
bench="python3 bench_suite.py --model $m --load-format dummy --results-dir $OUT --skip-baseline"
timeout 120 $bench offline 2>&1 | grep SUMMARY | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
ENABLE_MULTI_DEVICE=1 timeout 200 $bench offline 2>&1 | grep -E "SUMMARY|Error|error" | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
timeout 60 $bench latency 2>&1 | grep SUMMARY | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*.png
