#!/bin/bash
# fifteenth run, call 1: both fusion patches (gated + qkv) against base
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
tree() { (cd "$root/.gpu/v_$1" && shift && PYTHONPATH=/tmp/site:. "$@"); }
b() { v=$1; w=$2; tree "$v" timeout 150 python3 bench_suite.py "$w" --model "$m" --load-format dummy \
      --results-dir $OUT/r_$v --skip-baseline 2>&1 | grep -E "SUMMARY|split-K|gated" | cut -c1-220; }
tree both timeout 150 python3 benchmarks/kernel_check.py 2>&1 > $OUT/kernels.txt; grep -E " no$|proj|gated|prepare" $OUT/kernels.txt | cut -c1-140
echo "t=$(( $(date +%s) - t0 ))"
(cd .gpu/v_both && ln -sfn ../../.gpu .gpu && MINISGL_TEST_DEVICE=cuda MINISGL_TEST_TOKENIZER=.gpu/tokenizer \
  PYTHONPATH=/tmp/site:. timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py \
  tests/test_cuda_graph.py -k "not smollm2 and not multi_turn and not stop_string and not multibyte and not overlap_changes" 2>&1 | tail -3)
echo "t=$(( $(date +%s) - t0 ))"
tree both timeout 150 python3 -m benchmarks.bf16_agreement --config model_configs/qwen3-0.6b \
  --results-dir $OUT/r_bf16 2>&1 | grep SUMMARY | cut -c1-220
echo "t=$(( $(date +%s) - t0 ))"
for r in 1 2; do for v in base both; do echo "$v"; b $v offline; done; done
echo "t=$(( $(date +%s) - t0 ))"
for v in base both base both; do echo "$v"; b $v latency; done
echo "t=$(( $(date +%s) - t0 ))"
