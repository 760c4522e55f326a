"""Quality under compression: runs `centroidkv eval` (see python/centroidkv/eval/cli.py).

    python benchmarks/eval_quality.py --quick
    python benchmarks/eval_quality.py --tasks passkey,niah_single,prose --lengths 1024,2048 --samples 10
"""
import sys

from centroidkv.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
