#!/bin/bash
# sixteenth run, call 4: offline three times as it is, against CHUNKED_PREFILL_SIZE=16384, alternating
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site
m=$PWD/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
b() { tag=$1; shift; env "$@" timeout 110 python3 bench_suite.py offline --model "$m" --load-format dummy \
      --results-dir $OUT/r --skip-baseline > $OUT/offline-$tag.txt 2>&1
      echo "$tag $(grep SUMMARY $OUT/offline-$tag.txt | cut -c1-90) t=$(( $(date +%s) - t0 ))"; }
b base1 X=1; b chunk16k1 CHUNKED_PREFILL_SIZE=16384; b base2 X=1; b chunk16k2 CHUNKED_PREFILL_SIZE=16384; b base3 X=1
rm -rf $OUT/r
