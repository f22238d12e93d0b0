#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; t0=$(date +%s)
WORKLOAD=offline STEPS=60 timeout 200 python3 .gpu/mixprof.py 2>&1 | grep -v "it/s\|req/s" > $OUT/mixprof-offline.txt; tail -n +1 $OUT/mixprof-offline.txt | head -60
echo "t=$(( $(date +%s) - t0 ))"
WORKLOAD=shared_prefix STEPS=100 timeout 200 python3 .gpu/mixprof.py 2>&1 | grep -v "it/s\|req/s" > $OUT/mixprof-shared.txt
echo "t=$(( $(date +%s) - t0 ))"
