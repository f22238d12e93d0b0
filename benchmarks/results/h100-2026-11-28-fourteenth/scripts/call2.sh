#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python3 .gpu/splitk_probe.py 2>&1 | tee $OUT/splitk.txt | grep -v "^TOP\|^o \|^down \|Warn"
echo "t=$(( $(date +%s) - t0 ))"
b() { timeout 150 python3 bench_suite.py $1 --model $m --load-format dummy --results-dir /tmp/r --skip-baseline 2>&1 | grep SUMMARY | cut -c1-150; }
for r in 1 2; do
  echo "base"; (cd .gpu/v_base && PYTHONPATH=/tmp/site:. b offline)
  echo "new"; b offline
  echo "t=$(( $(date +%s) - t0 ))"
done
echo "base"; (cd .gpu/v_base && PYTHONPATH=/tmp/site:. b latency)
echo "new"; b latency
echo "t=$(( $(date +%s) - t0 ))"
