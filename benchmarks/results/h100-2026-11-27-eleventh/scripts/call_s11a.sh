#!/bin/bash
# merge kernel micro A/B, then shared prefix (radix on, step_timeline) and offline for
# HEAD (v_head), the merge loop alone (v_merge) and merge + 128-key cascade suffix (tree)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
PYTHONPATH=/tmp/site:. timeout 120 python3 .gpu/merge_ab.py 2>&1 | grep -E "^merge|Error" | tail -8
echo "t=$(( $(date +%s) - t0 ))"
tl() { (cd $1 && PYTHONPATH=/tmp/site:. timeout 120 python3 -m benchmarks.step_timeline --workload shared_prefix --num-prompts 1024 --model $m --load-format dummy 2>&1 | tr '\r' '\n' | grep -E "^shared_prefix:|^decode " | sed "s|^|$2 |"); }
off() { (cd $1 && PYTHONPATH=/tmp/site:. timeout 120 python3 bench_suite.py offline --model $m --load-format dummy --results-dir $OUT/$2 --skip-baseline 2>&1 | grep SUMMARY | cut -c1-110 | sed "s|^|$2 |"); }
for r in 1 2; do
  tl .gpu/v_head head; tl .gpu/v_merge merge; tl . tree
done
echo "t=$(( $(date +%s) - t0 ))"
off .gpu/v_head head; off . tree; off .gpu/v_head head; off . tree
echo "t=$(( $(date +%s) - t0 ))"
rm -rf $OUT/*/*.png
