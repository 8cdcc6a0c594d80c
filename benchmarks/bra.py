"""BRA: every backend (reference, sdpa, and the CPU kernel of every build this machine runs), YOLOv8n P3/P4/P5 at
640, batch 1 and 8, 2 threads.

    python benchmarks/bra.py                 # the full table (several minutes on 2 cores)
    python benchmarks/bra.py --maps P3 --batches 1 --device cuda --dtype bfloat16
"""

import sys

from yoloattn.bench.layers import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] + ([] if "--layers" in sys.argv else ["--layers", "bra"])))
