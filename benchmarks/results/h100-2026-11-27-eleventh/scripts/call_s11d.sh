#!/bin/bash
# no Triton compile after the warm-up (cold cache): shared prefix, then offline
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; t0=$(date +%s)
for w in shared_prefix offline; do
  rm -rf /tmp/tc-$w; TRITON_CACHE_DIR=/tmp/tc-$w WORKLOAD=$w TOP=1 timeout 200 python3 .gpu/fwprof.py 2>&1 | grep -E "^KERNELS|tok/s;|Error" | sed "s|^|$w |"
  echo "t=$(( $(date +%s) - t0 ))"
done
