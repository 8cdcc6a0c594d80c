"""Whole models: YOLOv8n vs YOLOv8n-BRA vs YOLOv8n-DAT, inference at 640 (batch 1) and training steps (8 at 320,
4 at 640), 2 CPU threads; `--build x86-64-v3` runs BRA's AVX2 kernel build.

    python benchmarks/yolo.py
    python benchmarks/yolo.py --models yolov8n.yaml,yolov10n-bra.yaml --modes inference --imgsz 320
"""

import sys

from yoloattn.bench.models import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
