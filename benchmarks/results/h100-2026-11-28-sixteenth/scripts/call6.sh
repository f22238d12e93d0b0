#!/bin/bash
# sixteenth run, call 6: bf16 agreement with HF float32 on the final code
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)"
timeout 300 python3 -m benchmarks.bf16_agreement --config model_configs/qwen3-0.6b --results-dir $OUT 2>&1 \
  | tee $OUT/bf16-agreement.txt | grep -v "^INFO" | tail -15
