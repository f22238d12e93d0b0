#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=.
timeout 300 python3 .gpu/attn_probe.py 2>&1 | tee $OUT/attn_probe.txt
