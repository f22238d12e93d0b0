#!/bin/bash
# shared prefix (radix on/off): the final tree, then HEAD a42477c, on one machine
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy
b() { (cd $1 && PYTHONPATH=/tmp/site:. timeout 150 python3 bench_suite.py $3 --model $m --load-format dummy --results-dir $OUT/$2 --skip-baseline 2>&1 | grep SUMMARY | cut -c1-150 | sed "s|^|$2 |"); }
b .gpu/v_tree tree shared_prefix; b .gpu/v_head head shared_prefix
rm -rf $OUT/*/*.png
