"""The engine benchmark, as `qwenkit bench` runs it; this script passes its arguments on.

    python benchmarks/bench_engine.py [--model default] [--prompt-tokens 512] [--concurrency 1,4,8,16]
"""

import sys

from qwenkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
