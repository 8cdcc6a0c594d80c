"""``yoloattn visualize``: where the attention layers of a model look, drawn over the input picture.

- BRA layers: the query window that holds the chosen point (outlined) and the ``topk`` windows routed
  to it, filled in proportion to their routing weight and labelled with it.
- DAT layers: the reference grid (grey) and the sampling points ``pos`` the offset network moved
  them to (one colour per offset group), with an arrow from each reference point to its sample.

The picture is letterboxed to ``imgsz`` like Ultralytics' predictor does, and drawn at that size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["visualize"]

_GROUP_COLOURS = [(0, 200, 255), (255, 80, 80), (80, 255, 80), (255, 0, 255), (255, 255, 0), (0, 128, 255)]


def _letterbox(image: np.ndarray, imgsz: int, stride: int) -> np.ndarray:
    from ultralytics.data.augment import LetterBox

    return LetterBox((imgsz, imgsz), auto=False, stride=stride)(image=image)


def _capture_inputs(model, layer_types, x):
    """Run ``model`` once and return [(layer, its input tensor)] for every layer of ``layer_types``."""
    captured, handles = [], []
    for module in model.modules():
        if isinstance(module, layer_types):
            handles.append(module.register_forward_pre_hook(lambda m, args: captured.append((m, args[0]))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def _draw_bra(canvas: np.ndarray, layer, feat: torch.Tensor, point_xy, stride: float) -> tuple[np.ndarray, str]:
    import cv2

    with torch.no_grad():
        _, r_weight, r_idx, _ = layer(feat, ret_attn_mask=True)
    n_win = layer.n_win
    h_in, w_in = feat.shape[2], feat.shape[3]
    padded_h, padded_w = -(-h_in // n_win) * n_win, -(-w_in // n_win) * n_win
    win_h, win_w = padded_h // n_win * stride, padded_w // n_win * stride  # window size in image pixels
    qx, qy = point_xy
    qj, qi = min(int(qy // win_h), n_win - 1), min(int(qx // win_w), n_win - 1)
    query = qj * n_win + qi
    weights, indices = r_weight[0, query].tolist(), r_idx[0, query].tolist()
    overlay = canvas.copy()
    for weight, idx in zip(weights, indices):
        j, i = divmod(int(idx), n_win)
        x0, y0 = int(i * win_w), int(j * win_h)
        colour = (0, int(80 + 175 * weight), 255)
        cv2.rectangle(overlay, (x0, y0), (int(x0 + win_w) - 1, int(y0 + win_h) - 1), colour, -1)
    out = cv2.addWeighted(overlay, 0.45, canvas, 0.55, 0)
    for weight, idx in zip(weights, indices):
        j, i = divmod(int(idx), n_win)
        x0, y0 = int(i * win_w), int(j * win_h)
        cv2.rectangle(out, (x0, y0), (int(x0 + win_w) - 1, int(y0 + win_h) - 1), (0, 140, 255), 1)
        cv2.putText(out, f"{weight:.3f}", (x0 + 3, y0 + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
    x0, y0 = int(qi * win_w), int(qj * win_h)
    cv2.rectangle(out, (x0, y0), (int(x0 + win_w) - 1, int(y0 + win_h) - 1), (0, 255, 0), 2)
    cv2.circle(out, (int(qx), int(qy)), 4, (0, 255, 0), -1)
    note = (f"BRA n_win={n_win} topk={layer.topk}: query window ({qj},{qi}) routes to "
            + ", ".join(f"({int(k) // n_win},{int(k) % n_win}) w={w:.2f}" for k, w in zip(indices, weights)))
    return out, note


def _draw_dat(canvas: np.ndarray, layer, feat: torch.Tensor, stride: float) -> tuple[np.ndarray, str]:
    import cv2

    with torch.no_grad():
        _, pos, reference = layer.forward_with_points(feat)
    h, w = feat.shape[2], feat.shape[3]

    def to_pixels(p):  # normalised (y, x), align_corners=True over the feature map -> image pixels (x, y)
        fy = (p[..., 0] + 1) / 2 * max(h - 1, 1)
        fx = (p[..., 1] + 1) / 2 * max(w - 1, 1)
        return torch.stack(((fx + 0.5) * stride, (fy + 0.5) * stride), -1)

    out = canvas.copy()
    refs, samples = to_pixels(reference[0]).reshape(layer.n_groups, -1, 2), to_pixels(pos[0]).reshape(layer.n_groups, -1, 2)
    for g in range(layer.n_groups):
        colour = _GROUP_COLOURS[g % len(_GROUP_COLOURS)]
        for (rx, ry), (sx, sy) in zip(refs[g].tolist(), samples[g].tolist()):
            cv2.circle(out, (int(rx), int(ry)), 2, (160, 160, 160), -1)
            cv2.arrowedLine(out, (int(rx), int(ry)), (int(sx), int(sy)), colour, 1, cv2.LINE_AA, tipLength=0.25)
            cv2.circle(out, (int(sx), int(sy)), 3, colour, -1)
    shift = (samples - refs).norm(dim=-1).mean().item()
    note = (f"DAT groups={layer.n_groups} stride={layer.stride}: {refs.shape[1]} sampling points per group, "
            f"mean shift {shift:.1f} px")
    return out, note


def visualize(model="yolov8n-bra.yaml", source=None, imgsz: int = 640, point=None, out="runs/visualize") -> list[Path]:
    """Draw, for each BRA and DAT layer of ``model``, where it attends on ``source``.

    Args:
        model: weights or YAML (shipped names allowed) with BRA and/or DAT layers.
        source: an image path; defaults to Ultralytics' bundled ``bus.jpg``.
        imgsz: letterbox size.
        point: ``"x,y"`` in pixels of the letterboxed image for the BRA query; default: the centre of the
            most confident detection, or the image centre if there is none.
        out: output directory.

    Returns:
        paths of the written PNG files.
    """
    import cv2
    from ultralytics.utils import ASSETS, LOGGER

    from ..nn.bra import BiLevelRoutingAttention
    from ..nn.dat import DAttention
    from .model import YOLO

    source = Path(source) if source is not None else ASSETS / "bus.jpg"
    image = cv2.imread(str(source))
    if image is None:
        raise ValueError(f"source={str(source)!r} is not a readable image file")
    yolo = YOLO(model)
    net = yolo.model.float().eval()
    stride_max = int(max(net.stride)) if hasattr(net, "stride") else 32
    if imgsz % stride_max:
        raise ValueError(f"imgsz={imgsz} must be a multiple of the model's stride {stride_max}")
    boxed = _letterbox(image, imgsz, stride_max)
    x = torch.from_numpy(boxed[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255.0
    captured = _capture_inputs(net, (BiLevelRoutingAttention, DAttention), x)
    if not captured:
        raise ValueError(f"model {model!r} has no BiLevelRoutingAttention or DAttention layer to visualize")

    if point is None:
        pred = yolo.predict(boxed, imgsz=imgsz, verbose=False)[0]
        if len(pred.boxes):
            best = int(pred.boxes.conf.argmax())
            x1, y1, x2, y2 = pred.boxes.xyxy[best].tolist()
            point = ((x1 + x2) / 2, (y1 + y2) / 2)
        else:
            point = (imgsz / 2, imgsz / 2)
    elif isinstance(point, str):
        try:
            point = tuple(float(v) for v in point.split(","))
        except ValueError:
            point = ()
        if len(point) != 2:
            raise ValueError(f"point must be 'x,y' in pixels, got {point!r}")

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    layer_index = {id(m): getattr(m, "i", k) for k, m in enumerate(net.model)} if hasattr(net, "model") else {}
    for k, (layer, feat) in enumerate(captured):
        stride = imgsz / feat.shape[2]
        row = layer_index.get(id(layer), k)
        if isinstance(layer, BiLevelRoutingAttention):
            picture, note = _draw_bra(boxed, layer, feat, point, stride)
            kind = "bra"
        else:
            picture, note = _draw_dat(boxed, layer, feat, stride)
            kind = "dat"
        cv2.putText(picture, f"layer {row} ({kind}, stride {stride:.0f})", (5, imgsz - 8), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5, (255, 255, 255), 1, cv2.LINE_AA)
        path = out_dir / f"{source.stem}_{kind}_layer{row}.png"
        cv2.imwrite(str(path), picture)
        paths.append(path)
        LOGGER.info(f"yoloattn visualize: {path}: {note}")
    return paths
