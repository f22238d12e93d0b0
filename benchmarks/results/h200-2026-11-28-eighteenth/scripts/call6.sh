#!/bin/bash
# eighteenth run, call 6 (nvidia-h200): the session's final tree: GPU equivalence, latency, offline
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; m=.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
bench="python3 bench_suite.py --model $m --load-format dummy --results-dir $OUT --skip-baseline"
s() { grep -E "SUMMARY|Error|rror:" | cut -c1-260; }
MINISGL_TEST_DEVICE=cuda MINISGL_TEST_TOKENIZER=.gpu/tokenizer timeout 200 python3 -m pytest -q \
  -p no:cacheprovider tests/test_engine.py tests/test_cuda_graph.py \
  -k "not smollm2 and not multi_turn and not stop_string and not multibyte and not overlap_changes" 2>&1 \
  | tee $OUT/equivalence.txt | tail -2
echo "t=$(( $(date +%s) - t0 ))"
timeout 60 $bench latency 2>&1 | tee $OUT/latency.txt | s
timeout 100 $bench offline 2>&1 | tee $OUT/offline.txt | s
echo "t=$(( $(date +%s) - t0 ))"
rm -f $OUT/*.png
