#!/bin/bash
# mixed steps' one-token rows read q / write out at their token rows in the kernels: equivalence, A/B
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
export PYTHONPATH=/tmp/site:.
OUT=$OUT/check timeout 200 bash benchmarks/gpu_check.sh equivalence 2>&1 | grep -E "passed|failed|FAIL|Error" | tail -5
echo "t=$(( $(date +%s) - t0 ))"
ab() { (cd $1 && PYTHONPATH=/tmp/site:. timeout 200 python3 bench_suite.py $3 --model $m --load-format dummy --results-dir $OUT/$2 --skip-baseline 2>&1 | grep SUMMARY | cut -c1-170 | sed "s/^/$2 /"); }
ab . new shared_prefix; ab .gpu/v_base base shared_prefix
ab .gpu/v_base base offline; ab . new offline
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*/*.png
