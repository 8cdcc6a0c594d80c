"""BiFormer-T/S/B: the official math against yoloattn's automatic backends, forward and forward+backward, peak memory.

    python benchmarks/biformer.py                           # BiFormer-T at 224 (batch 1 and 16), dense at 640
    python benchmarks/biformer.py --cases tiny@224x16,small@224x16
"""

import sys

from yoloattn.bench.biformer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
