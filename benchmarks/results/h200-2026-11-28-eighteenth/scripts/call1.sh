#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; m=.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 400 python3 .gpu/breakdown.py $m 2>&1 | grep -v "it/s\|%|\|USDT" | tee $OUT/breakdown.txt
echo "t=$(( $(date +%s) - t0 ))"
