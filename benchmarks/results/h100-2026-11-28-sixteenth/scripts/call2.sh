#!/bin/bash
# sixteenth run, call 2: the fused MLP against three launches, GPU equivalence on HEAD, matmul sweep
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m benchmarks.matmul_sweep --mlp > $OUT/sweep-mlp.txt 2>&1; tail -40 $OUT/sweep-mlp.txt | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
MINISGL_TEST_DEVICE=cuda MINISGL_TEST_TOKENIZER=.gpu/tokenizer timeout 200 python3 -m pytest -q \
  -p no:cacheprovider tests/test_engine.py tests/test_cuda_graph.py \
  -k "not smollm2 and not multi_turn and not stop_string and not multibyte and not overlap_changes" \
  > $OUT/equivalence.txt 2>&1; tail -4 $OUT/equivalence.txt
echo "t=$(( $(date +%s) - t0 ))"
timeout $(( 580 - ($(date +%s) - t0) )) python3 -m benchmarks.matmul_sweep > $OUT/sweep-matmul.txt 2>&1
tail -60 $OUT/sweep-matmul.txt | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
