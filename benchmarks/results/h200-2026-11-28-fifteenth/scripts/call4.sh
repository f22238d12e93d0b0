#!/bin/bash
# fifteenth run, call 4: is a small-batch decode step bound by the host or the device?
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; m=.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
lscpu | grep -E "Model name|MHz" | head -3
bench="python3 bench_suite.py --model $m --load-format dummy --results-dir /tmp/r --skip-baseline"
timeout 90 $bench latency 2>&1 | grep SUMMARY | cut -c1-200
for b in 1 8 32; do
  timeout 150 python3 -m benchmarks.step_profile --model $m --load-format dummy --batch $b \
    --new-tokens 256 --top 40 --kernels 30 > $OUT/step-profile-b$b.txt 2>&1
  grep -E "wall|device time|kernels:" $OUT/step-profile-b$b.txt
  echo "t=$(( $(date +%s) - t0 ))"
done
timeout 90 $bench latency 2>&1 | grep SUMMARY | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
