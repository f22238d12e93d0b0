#!/bin/bash
# fifteenth run, call 5: GEMV and split-K chosen by streamed CUDA-graph timings (v_new) against 6187997
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
tree() { (cd "$root/.gpu/v_$1" && shift && PYTHONPATH=/tmp/site:. "$@"); }
b() { v=$1; w=$2; tree "$v" timeout 120 python3 bench_suite.py "$w" --model "$m" --load-format dummy \
      --results-dir /tmp/r_$v --skip-baseline > $OUT/$v-$w-$3.txt 2>&1
      grep -E "gemv: linear|split-K linear" $OUT/$v-$w-$3.txt | sed 's/.*INFO //' | cut -c1-200 | head -12
      grep SUMMARY $OUT/$v-$w-$3.txt | cut -c1-160; }
for r in 1 2; do for v in new base; do echo "$v"; b $v latency $r; done; done
echo "t=$(( $(date +%s) - t0 ))"
for v in new base; do echo "$v"; b $v offline 1; done
echo "t=$(( $(date +%s) - t0 ))"
