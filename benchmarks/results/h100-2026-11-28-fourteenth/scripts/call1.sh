#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 .gpu/attn_bucket.py 2>&1 | tee $OUT/attn_bucket.txt | grep -v Warn
echo "t=$(( $(date +%s) - t0 ))"
timeout 100 python3 .gpu/gemm_probe.py 2>&1 | tee $OUT/gemm.txt
echo "t=$(( $(date +%s) - t0 ))"
off() { timeout 150 python3 "$@" offline --model $m --load-format dummy --results-dir /tmp/r --skip-baseline 2>&1 | grep SUMMARY | cut -c1-150; }
for r in 1 2; do
  echo "base"; (cd .gpu/v_base && PYTHONPATH=/tmp/site:. off bench_suite.py)
  echo "new pps4"; PPS=4 off .gpu/bench_pps.py
  echo "new pps2"; PPS=2 off .gpu/bench_pps.py
  echo "t=$(( $(date +%s) - t0 ))"
done
