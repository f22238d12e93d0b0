#!/bin/bash
# sixteenth run, call 3 (same machine as call 2): o_proj and down_proj at 96-256 rows, split-K against cuBLAS
export PYTHONPATH=/tmp/site; python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
timeout 400 python3 -m benchmarks.matmul_sweep --rows 96 128 192 256 --top 6 2>&1 | tee $OUT/sweep-matmul-large.txt | cut -c1-150
