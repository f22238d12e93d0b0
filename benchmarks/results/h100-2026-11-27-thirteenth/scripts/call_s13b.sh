#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.
for w in offline shared_prefix; do WORKLOAD=$w timeout 200 python3 .gpu/mixhost.py 2>&1 | grep -v "it/s\|req/s\|warn" | tail -16; done
