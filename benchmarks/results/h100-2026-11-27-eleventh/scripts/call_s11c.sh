#!/bin/bash
# merge micro A/B (single-pass merge), then latency, shared prefix and offline: HEAD vs tree
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
PYTHONPATH=/tmp/site:. timeout 60 python3 .gpu/merge_ab.py 2>&1 | grep -E "^merge|Error" | tail -8
b() { (cd $1 && PYTHONPATH=/tmp/site:. timeout 150 python3 bench_suite.py $3 --model $m --load-format dummy --results-dir $OUT/$2 --skip-baseline 2>&1 | grep SUMMARY | cut -c1-150 | sed "s|^|$2 |"); }
for r in 1 2; do b .gpu/v_head head latency; b .gpu/v_tree tree latency; done
echo "t=$(( $(date +%s) - t0 ))"
b .gpu/v_head head shared_prefix; b .gpu/v_tree tree shared_prefix
echo "t=$(( $(date +%s) - t0 ))"
b .gpu/v_tree tree offline; b .gpu/v_head head offline
echo "t=$(( $(date +%s) - t0 ))"
rm -rf $OUT/*/*.png
