"""DAT next to BRA and a 3x3 conv of the same width: YOLOv8n P3/P4/P5 at 640, batch 1 and 8, 2 threads.

    python benchmarks/dat.py
    python benchmarks/dat.py --maps P3 --batches 1
"""

import sys

from yoloattn.bench.layers import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] + ([] if "--layers" in sys.argv else ["--layers", "dat,bra,conv3x3"])))
