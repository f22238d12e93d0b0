#!/bin/bash
# twelfth run, call 3: LM head warmed for every row count (new) against cc32aff (head)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:.; root=$PWD; m=$root/.gpu/qwen3-dummy; t0=$(date +%s)
WORKLOAD=offline STEPS=60 timeout 150 python3 .gpu/mixprof.py 2>&1 | grep -v "it/s\|req/s" > $OUT/mixprof-offline.txt
grep -E "tok/s|GPU span|LM head" $OUT/mixprof-offline.txt
echo "t=$(( $(date +%s) - t0 ))"
WORKLOAD=shared_prefix STEPS=100 timeout 150 python3 .gpu/mixprof.py 2>&1 | grep -v "it/s\|req/s" > $OUT/mixprof-shared.txt
grep -E "tok/s|GPU span" $OUT/mixprof-shared.txt
echo "t=$(( $(date +%s) - t0 ))"
for i in 1 2; do
for v in head new; do
  d=$root; [ $v = head ] && d=$root/.gpu/v_head
  (cd $d && PYTHONPATH=/tmp/site:. timeout 100 python3 bench_suite.py offline --model $m --load-format dummy --results-dir $OUT/$v --skip-baseline 2>&1 | grep -E "SUMMARY|LM head" | cut -c1-120 | sed "s/^/$v /")
done; done
echo "t=$(( $(date +%s) - t0 ))"
for v in head new; do
  d=$root; [ $v = head ] && d=$root/.gpu/v_head
  (cd $d && PYTHONPATH=/tmp/site:. timeout 100 python3 -m benchmarks.step_timeline --workload shared_prefix --num-prompts 1024 --model $m --load-format dummy 2>&1 | grep -v "it/s\|req/s" | grep -E "tok/s|decode|prefill" | sed "s/^/$v /")
done
echo "t=$(( $(date +%s) - t0 ))"
rm -rf $OUT/*/*.png
