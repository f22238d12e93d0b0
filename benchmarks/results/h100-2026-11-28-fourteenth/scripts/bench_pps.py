"""bench_suite with LONG_BLOCK_PROGRAMS_PER_SM set from $PPS (A/B of the decode split rule)."""
import os
import sys

sys.path.insert(0, os.getcwd())
import backend.sglang.kernels.triton_ops as T  # noqa: E402

T.LONG_BLOCK_PROGRAMS_PER_SM = int(os.environ["PPS"])
import bench_suite  # noqa: E402

sys.exit(bench_suite.main(sys.argv[1:]))
