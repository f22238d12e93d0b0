#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 benchmarks/kernel_check.py 2>&1 > $OUT/kernels-bf16.txt; echo "kernel_check rc=$?"
grep -E "linear|proj|no " $OUT/kernels-bf16.txt | grep -v "^ *$" | cut -c1-120 | tail -22
echo "t=$(( $(date +%s) - t0 ))"
OUT=$OUT/check timeout 200 bash benchmarks/gpu_check.sh equivalence 2>&1 | grep -E "passed|failed|FAIL|Error" | tail -5
echo "t=$(( $(date +%s) - t0 ))"
timeout 150 python3 -m benchmarks.bf16_agreement --config model_configs/qwen3-0.6b --results-dir /tmp/r 2>&1 | tail -4
echo "t=$(( $(date +%s) - t0 ))"
b() { timeout 150 python3 bench_suite.py $1 --model $m --load-format dummy --results-dir $OUT --skip-baseline 2>&1 | grep -E "SUMMARY|split-K" | cut -c1-220; }
for r in 1 2; do
  echo "base"; (cd .gpu/v_base && PYTHONPATH=/tmp/site:. b offline)
  echo "new"; b offline
  echo "t=$(( $(date +%s) - t0 ))"
done
echo "base"; (cd .gpu/v_base && PYTHONPATH=/tmp/site:. b latency)
echo "new"; b latency
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*.png
