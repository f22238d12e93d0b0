#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; m=$PWD/.gpu/qwen3-dummy; t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
MINISGL_TEST_DEVICE=cuda MINISGL_TEST_TOKENIZER=.gpu/tokenizer timeout 200 python3 -m pytest -q \
  -p no:cacheprovider tests/test_engine.py tests/test_cuda_graph.py \
  -k "not smollm2 and not multi_turn and not stop_string and not multibyte and not overlap_changes" 2>&1 \
  | tee $OUT/equivalence.txt | tail -2
echo "t=$(( $(date +%s) - t0 ))"
for tree in new base; do
  d=.; [ $tree = base ] && d=.gpu/v_base
  (cd $d && PYTHONPATH=/tmp/site:. timeout 150 python3 $OLDPWD/.gpu/breakdown.py $m 2>/dev/null | grep -v USDT > $OUT/bd-$tree.txt)
  echo "== $tree"; grep -E "^==|batch<=  (64|128|256)|prefill" $OUT/bd-$tree.txt
  echo "t=$(( $(date +%s) - t0 ))"
done
