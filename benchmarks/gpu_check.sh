#!/usr/bin/env bash
# One call on a CUDA machine (see docs/BENCHMARKS.md): Triton kernels against torch at real
# shapes, the engine's float32 greedy equivalence with HF on the GPU, then the GPU workloads.
# Expects the carried folder .gpu/ (git-ignored through .git/info/exclude), made here with:
#   mkdir -p .gpu/tokenizer .gpu/qwen3-dummy .gpu/whl
#   cp ~/.cache/mini-sglang/smollm2-135m-instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tokenizer/
#   cp .gpu/tokenizer/* model_configs/qwen3-0.6b/config.json .gpu/qwen3-dummy/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .gpu/whl pytest pluggy iniconfig pytest-timeout \
#     diffusers importlib_metadata     # diffusers for `image`
# Usage: benchmarks/gpu_check.sh [kernels] [equivalence] [bf16] [latency] [offline] [shared_prefix]
#        [sweep] [matmul] [timeline] [pool] [image] [fp8] [piecewise]
# `image` runs model_configs/z-image-turbo (the pipeline's architecture, no weights: they are
# random, --load-format dummy) with the carried tokenizer standing in for Qwen's.
# `fp8` runs the kernel checks, the bf16 agreement and the three workloads with K/V in 8 bits
# (KV_CACHE_DTYPE=fp8_e4m3).
# `piecewise` runs offline and shared_prefix without and then with PIECEWISE_CUDA_GRAPH=1.
# `pool` needs two GPUs (device kind nvidia-h100-x2): offline on one GPU, then through a pool
# of one engine per GPU (worker processes, then threads of one process), then shared_prefix
# through the pool with rr and with cache_aware.
set -uo pipefail
OUT=${OUT:-/tmp/minisgl-gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && \
    export PYTHONPATH=/tmp/site
fi
steps=${*:-kernels equivalence latency offline shared_prefix}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
model=.gpu/qwen3-dummy
for step in $steps; do
  echo "=== $step ==="
  case $step in
    kernels)
      python3 benchmarks/kernel_check.py 2>&1 | tee "$OUT/kernels-bf16.txt"
      python3 benchmarks/kernel_check.py --dtype float32 2>&1 | tee "$OUT/kernels-fp32.txt" ;;
    equivalence)
      MINISGL_TEST_DEVICE=cuda MINISGL_TEST_TOKENIZER=.gpu/tokenizer python3 -m pytest -q \
        -p no:cacheprovider tests/test_engine.py tests/test_cuda_graph.py \
        -k "not smollm2 and not multi_turn and not stop_string and not multibyte and not overlap_changes" 2>&1 \
        | tee "$OUT/equivalence.txt" ;;
    bf16)
      python3 -m benchmarks.bf16_agreement --config model_configs/qwen3-0.6b \
        --results-dir "$OUT" 2>&1 | tee "$OUT/bf16-agreement.txt" ;;
    sweep)
      python3 -m benchmarks.attention_sweep 2>&1 | tee "$OUT/sweep-decode.txt"
      python3 -m benchmarks.attention_sweep --extend 2>&1 | tee "$OUT/sweep-extend.txt" ;;
    matmul)
      python3 -m benchmarks.matmul_sweep 2>&1 | tee "$OUT/sweep-matmul.txt" ;;
    timeline)
      for workload in offline shared_prefix; do
        python3 -m benchmarks.step_timeline --workload $workload --model "$model" \
          --load-format dummy 2>&1 | tee "$OUT/timeline-$workload.txt"
      done ;;
    image)
      pipeline=/tmp/minisgl-z-image-turbo
      rm -rf "$pipeline" && cp -r model_configs/z-image-turbo "$pipeline" && \
        cp -r .gpu/tokenizer "$pipeline/tokenizer"
      python3 bench_suite.py image --model "$pipeline" --load-format dummy \
        --results-dir "$OUT" 2>&1 | tee "$OUT/image.txt" ;;
    pool)
      bench="python3 bench_suite.py --model $model --load-format dummy --results-dir $OUT --skip-baseline"
      $bench offline 2>&1 | tee "$OUT/pool-offline-1gpu.txt"
      ENABLE_MULTI_DEVICE=1 $bench offline 2>&1 | tee "$OUT/pool-offline-2gpu.txt"
      ENABLE_MULTI_DEVICE=1 ENGINE_PROCESSES=0 $bench offline 2>&1 \
        | tee "$OUT/pool-offline-2gpu-threads.txt"
      for mode in rr cache_aware; do
        ENABLE_MULTI_DEVICE=1 SCHEDULER_MODE=$mode $bench shared_prefix 2>&1 \
          | tee "$OUT/pool-shared-$mode.txt"
      done ;;
    piecewise)
      for flag in 0 1; do
        for workload in offline shared_prefix; do
          PIECEWISE_CUDA_GRAPH=$flag python3 bench_suite.py $workload --model "$model" \
            --load-format dummy --results-dir "$OUT" --skip-baseline 2>&1 \
            | tee "$OUT/piecewise$flag-$workload.txt"
        done
      done ;;
    fp8)
      python3 benchmarks/kernel_check.py --kv-dtype fp8_e4m3 2>&1 | tee "$OUT/kernels-fp8.txt"
      python3 -m benchmarks.bf16_agreement --config model_configs/qwen3-0.6b --kv-dtype fp8_e4m3 \
        --results-dir "$OUT" 2>&1 | tee "$OUT/fp8-agreement.txt"
      for workload in latency offline shared_prefix; do
        KV_CACHE_DTYPE=fp8_e4m3 python3 bench_suite.py $workload --model "$model" \
          --load-format dummy --results-dir "$OUT" --skip-baseline 2>&1 | tee "$OUT/fp8-$workload.txt"
      done ;;
    latency|offline|shared_prefix)
      python3 bench_suite.py "$step" --model "$model" --load-format dummy \
        --results-dir "$OUT" ${BENCH_ARGS:---baseline-num-prompts 64} 2>&1 \
        | tee "$OUT/$step.txt" ;;
  esac
done
