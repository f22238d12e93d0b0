#!/bin/bash
# eighteenth run, call 7 (nvidia-h200): the warm-up with longest-first decode batches, with and
# without CUDA graphs; latency and offline on the final tree
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; m=.gpu/qwen3-dummy; t0=$(date +%s)
bench="python3 bench_suite.py --model $m --load-format dummy --results-dir $OUT --skip-baseline"
s() { grep -E "SUMMARY|Error|rror:|Traceback" | cut -c1-260; }
CUDA_GRAPH=0 MODEL_LOCAL_DIR=$m LOAD_FORMAT=dummy timeout 120 python3 smoke_test.py --raw --max-new-tokens 16 hi 2>&1 | tee $OUT/smoke-eager.txt | grep -E "rror|Traceback|warm|tok/s" | cut -c1-200; echo "smoke rc=${PIPESTATUS[0]}"
echo "t=$(( $(date +%s) - t0 ))"
timeout 60 $bench latency 2>&1 | tee $OUT/latency.txt | s
timeout 100 $bench offline 2>&1 | tee $OUT/offline.txt | s
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*.png
