#!/bin/bash
# fifteenth run, call 2: each fusion alone against base, alternating
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
tree() { (cd "$root/.gpu/v_$1" && shift && PYTHONPATH=/tmp/site:. "$@"); }
b() { v=$1; w=$2; tree "$v" timeout 150 python3 bench_suite.py "$w" --model "$m" --load-format dummy \
      --results-dir /tmp/r_$v --skip-baseline 2>&1 | grep -E "SUMMARY|split-K" | cut -c1-900; }
for r in 1 2; do for v in base qkv gated; do echo "$v"; b $v offline; done; done
echo "t=$(( $(date +%s) - t0 ))"
for r in 1 2; do for v in base qkv gated; do echo "$v"; b $v latency; done; done
echo "t=$(( $(date +%s) - t0 ))"
