#!/bin/bash
# shared prefix step timeline (radix on): 5476bac vs a7c8d76 (slot-table write skip), twice
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy
tl() { (cd $1 && PYTHONPATH=/tmp/site:. timeout 80 python3 -m benchmarks.step_timeline --workload shared_prefix --num-prompts 1024 --model $m --load-format dummy 2>&1 | tr '\r' '\n' | grep -E "^shared_prefix:|^decode |^prefill" | cut -c1-100 | sed "s|^|$2 |"); }
tl .gpu/v_prev prev; tl . new; tl .gpu/v_prev prev; tl . new
