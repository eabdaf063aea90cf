# pytest-benchmark suite: `pytest benchmarks --benchmark-json=out.json` (LVOPT_BENCH_SIZE=small
# by default; default for the full sizes). The files import the shared harness by name.
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
