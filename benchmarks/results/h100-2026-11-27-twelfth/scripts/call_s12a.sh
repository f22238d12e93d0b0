#!/bin/bash
# twelfth run, call 1 (one H100): GPU equivalence on HEAD, cProfile of mixed forwards + schedule
# in shared_prefix and offline, then offline on HEAD.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$OUT/check timeout 220 bash benchmarks/gpu_check.sh equivalence 2>&1 | grep -E "passed|failed|FAIL|Error" | tail -5
echo "t=$(( $(date +%s) - t0 ))"
for w in shared_prefix offline; do
WORKLOAD=$w TOP=30 timeout 150 python3 .gpu/fwprof.py 2>&1 | grep -v "it/s\|req/s" | tail -90 > $OUT/fwprof-$w.txt
grep -E "^KERNELS|tok/s;" $OUT/fwprof-$w.txt
echo "t=$(( $(date +%s) - t0 ))"
done
timeout 100 python3 bench_suite.py offline --model $m --load-format dummy --results-dir $OUT --skip-baseline 2>&1 | grep SUMMARY | cut -c1-170
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*.png
