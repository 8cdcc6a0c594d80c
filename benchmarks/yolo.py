"""Whole-model latency: YOLOv8n vs YOLOv8n-BRA vs YOLOv8n-DAT at 640, batch 1, 2 CPU threads.

    python benchmarks/yolo.py
    python benchmarks/yolo.py --models yolov8n.yaml,yolov10n-bra.yaml --imgsz 320
"""

import sys

from yoloattn.bench.models import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
