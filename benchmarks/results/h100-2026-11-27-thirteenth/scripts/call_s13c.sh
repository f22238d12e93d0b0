#!/bin/bash
# logits straight into the decode graphs' static buffer: equivalence, then offline A/B alternating
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
export PYTHONPATH=/tmp/site:.
OUT=$OUT/check timeout 200 bash benchmarks/gpu_check.sh equivalence 2>&1 | grep -E "passed|failed|FAIL|Error" | tail -5
echo "t=$(( $(date +%s) - t0 ))"
ab() { # $1 = dir, $2 = label, $3 = workload
  (cd $1 && PYTHONPATH=/tmp/site:. timeout 200 python3 bench_suite.py $3 --model $m --load-format dummy --results-dir $OUT/$2 --skip-baseline 2>&1 | grep SUMMARY | cut -c1-150 | sed "s/^/$2 /")
}
for i in 1 2; do ab .gpu/v_base base offline; ab . new offline; done
ab . new latency
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*/*.png
