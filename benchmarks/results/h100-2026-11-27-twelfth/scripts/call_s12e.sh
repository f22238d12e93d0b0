#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
for w in offline shared_prefix; do
WORKLOAD=$w timeout 150 python3 .gpu/idle.py 2>&1 | grep -v "it/s\|req/s\|warn" | tail -16
echo "t=$(( $(date +%s) - t0 ))"
done
