"""One Ultralytics release, checked end to end (run by test_compat_matrix.py with that release on PYTHONPATH).

Prints one JSON line: the release, every shipped YAML built and run at scale n, training one epoch (BRA and DAT),
reloading the checkpoint with plain ``ultralytics.YOLO`` in a fresh process, ONNX export with dynamic shapes
checked against onnxruntime, and YOLOv8n-BRA's GFLOPs at 640 next to torch's FLOP counter.
"""

import json
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def main(workdir: str) -> None:
    import numpy as np
    import torch
    import ultralytics

    import yoloattn
    from yoloattn import YOLO
    from yoloattn.data import shapes
    from yoloattn.yolo.model import shipped_models

    work = Path(workdir)
    out = {"ultralytics": ultralytics.__version__, "yaml": {}, "train": {}, "reload": {}, "onnx": {}}
    for name in shipped_models():
        family, rest = name.split("-", 1)
        try:
            model = YOLO(f"{family}n-{rest}").model.eval()
            with torch.no_grad():
                model(torch.zeros(1, 3, 64, 96))
            out["yaml"][name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported in the matrix
            out["yaml"][name] = _error(e)
    data = shapes(n_train=8, n_val=4, imgsz=64, root=work / "data", progress=False)
    for name in ("yolov8n-bra.yaml", "yolov8n-dat.yaml"):
        stem = name.split(".")[0]
        try:
            model = YOLO(name)
            model.train(data=str(data), epochs=1, imgsz=64, batch=4, workers=0, plots=False, project=str(work),
                        name=stem, exist_ok=True, verbose=False)
            best = Path(model.trainer.best)
            out["train"][name] = "ok" if best.exists() else "no best.pt"
        except Exception as e:  # noqa: BLE001
            out["train"][name] = _error(e) + " | " + traceback.format_exc().strip().splitlines()[-3][:200]
            continue
        check = textwrap.dedent(f"""
            import torch
            from ultralytics import YOLO  # plain Ultralytics: unpickling imports yoloattn
            model = YOLO({str(best)!r})
            kinds = [type(m).__name__ for m in model.model.modules() if type(m).__module__.startswith("yoloattn")]
            model.model(torch.zeros(1, 3, 64, 64))
            print(kinds[0])
        """)
        proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600)
        out["reload"][name] = "ok" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1][:300]
        try:
            import onnxruntime as ort

            path = YOLO(str(best)).export(format="onnx", imgsz=64, dynamic=True, simplify=False)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            net = YOLO(str(best)).model.float().eval()
            worst = 0.0
            for h, w in ((64, 64), (96, 64)):
                x = torch.rand(1, 3, h, w)
                with torch.no_grad():
                    expected = net(x)[0].numpy()
                got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
                worst = max(worst, float(np.abs(got - expected).max()))
            out["onnx"][name] = "ok" if worst < 2e-3 else f"max difference {worst:.2e}"
        except Exception as e:  # noqa: BLE001
            out["onnx"][name] = _error(e)
    try:
        from torch.utils.flop_counter import FlopCounterMode
        from ultralytics.utils.torch_utils import get_flops

        net = YOLO("yolov8n-bra.yaml").model.eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros(1, 3, 640, 640))
        out["gflops_ultralytics"] = round(float(get_flops(net, 640)), 2)
        out["gflops_counted"] = round(counter.get_total_flops() / 1e9, 2)
    except Exception as e:  # noqa: BLE001
        out["gflops_ultralytics"] = _error(e)
    out["yoloattn"] = yoloattn.__version__
    print("COMPAT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
