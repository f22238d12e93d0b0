#!/bin/bash
# sixteenth run, call 1: the issue-4 figures on HEAD with the HF baselines, then the kernel checks
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site
m=$PWD/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
b() { w=$1; shift; timeout $1 python3 bench_suite.py "$w" --model "$m" --load-format dummy \
      --results-dir $OUT --baseline-num-prompts 64 > $OUT/$w.txt 2>&1
      grep -E "GEMV against|graph|captured" $OUT/$w.txt | sed 's/.*INFO //' | cut -c1-200 | head -8
      grep -E "SUMMARY" $OUT/$w.txt | cut -c1-260; echo "t=$(( $(date +%s) - t0 ))"; }
b latency 150
b offline 200
b shared_prefix 200
timeout $(( 570 - ($(date +%s) - t0) )) python3 benchmarks/kernel_check.py > $OUT/kernels-bf16.txt 2>&1
grep -cE " ok$" $OUT/kernels-bf16.txt; grep -E " no$|FAIL|Error" $OUT/kernels-bf16.txt | head
echo "t=$(( $(date +%s) - t0 ))"
