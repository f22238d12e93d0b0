#!/bin/bash
# The two fusion patches of this run (../gated/gated.patch: SiLU-and-mul inside the split-K
# down projection; ../qkvfuse/qkvfuse.patch: qkv_prepare inside the decode attention kernel),
# each and both, against the tree they apply to, in one call on one H100.
# Prepare here first (from the repository root, .gpu/ made as benchmarks/gpu_check.sh says):
#   R=benchmarks/results/h100-2026-11-28-fourteenth
#   for v in base gated qkv both; do rm -rf .gpu/v_$v; mkdir -p .gpu/v_$v
#     git archive HEAD | tar -x -C .gpu/v_$v; rm -rf .gpu/v_$v/docs .gpu/v_$v/benchmarks/results; done
#   (cd .gpu/v_gated && patch -p1 < ../../$R/gated/gated.patch)
#   (cd .gpu/v_qkv && patch -p1 < ../../$R/qkvfuse/qkvfuse.patch)
#   (cd .gpu/v_both && patch -p1 < ../../$R/qkvfuse/qkvfuse.patch &&
#     patch -p1 < ../../$R/gated/gated.patch)
# (patch, not git apply: inside the repository's tree git apply skips paths outside the
# current folder)
# then run: bash benchmarks/results/h100-2026-11-28-fourteenth/scripts/fusions.sh (carry .gpu)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
tree() { (cd "$root/.gpu/v_$1" && shift && PYTHONPATH=/tmp/site:. "$@"); }
b() { v=$1; w=$2; tree "$v" timeout 150 python3 bench_suite.py "$w" --model "$m" --load-format dummy \
      --results-dir /tmp/r --skip-baseline 2>&1 | grep -E "SUMMARY|split-K" | cut -c1-200; }
tree both timeout 150 python3 benchmarks/kernel_check.py 2>&1 | grep -E " no$|proj \+" | cut -c1-120
(cd .gpu/v_both && ln -sfn ../../.gpu .gpu && MINISGL_TEST_DEVICE=cuda MINISGL_TEST_TOKENIZER=.gpu/tokenizer \
  PYTHONPATH=/tmp/site:. timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py \
  tests/test_cuda_graph.py -k "not smollm2 and not multi_turn and not stop_string and not multibyte and not overlap_changes" 2>&1 | tail -2)
tree both timeout 150 python3 -m benchmarks.bf16_agreement --config model_configs/qwen3-0.6b \
  --results-dir /tmp/r 2>&1 | grep SUMMARY | cut -c1-200
echo "t=$(( $(date +%s) - t0 ))"
for r in 1 2; do for v in base both; do echo "$v"; b $v offline; done; done
for v in qkv gated; do echo "$v"; b $v offline; done
for v in base both base both; do echo "$v"; b $v latency; done
echo "t=$(( $(date +%s) - t0 ))"
