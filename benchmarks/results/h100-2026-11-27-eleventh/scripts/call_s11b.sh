#!/bin/bash
# kernels + GPU equivalence on the tree, merge micro A/B, latency HEAD vs tree (twice)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
OUT=$OUT/check timeout 330 bash benchmarks/gpu_check.sh kernels equivalence 2>&1 | grep -E "merge|decode|cascade|passed|failed|FAIL|Error" | tail -14
echo "t=$(( $(date +%s) - t0 ))"
export PYTHONPATH=/tmp/site
PYTHONPATH=/tmp/site:. timeout 60 python3 .gpu/merge_ab.py 2>&1 | grep -E "^merge|Error" | tail -8
lat() { (cd $1 && PYTHONPATH=/tmp/site:. timeout 60 python3 bench_suite.py latency --model $m --load-format dummy --results-dir $OUT/$2 --skip-baseline 2>&1 | grep SUMMARY | cut -c1-100 | sed "s|^|$2 |"); }
for r in 1 2; do lat .gpu/v_head head; lat .gpu/v_tree tree; done
echo "t=$(( $(date +%s) - t0 ))"
rm -rf $OUT/*/*.png
