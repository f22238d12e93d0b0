#!/bin/bash
# twelfth run, call 9: the final code — GPU equivalence, shared-prefix step timeline
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
OUT=$OUT/check timeout 200 bash benchmarks/gpu_check.sh equivalence 2>&1 | grep -E "passed|failed|FAIL|Error" | tail -5
echo "t=$(( $(date +%s) - t0 ))"
timeout 100 python3 -m benchmarks.step_timeline --workload shared_prefix --num-prompts 1024 --model $m --load-format dummy 2>&1 | grep -v "it/s\|req/s" | grep -E "tok/s|decode|prefill"
echo "t=$(( $(date +%s) - t0 ))"
