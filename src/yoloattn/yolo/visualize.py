"""``yoloattn visualize``: where the attention layers of a model look, drawn over the input picture.

- BRA layers: for each query point, the router's affinity of the point's window to every window (the
  region-level logits it ranks) as a heat map, the query window outlined in green and its ``topk`` routed
  windows outlined and numbered by rank, with their logits and routing weights printed to 4 decimals.
  Several points make several panels of one figure.
- DAT layers: the reference grid (grey crosses) and the sampling points the offset network moved them to,
  coloured by the length of their offset, with a colour bar.

Points are in pixels of the original image (``point=x,y`` or several, ``point=x1,y1,x2,y2``, or
``point=grid`` for a 3×3 grid); by default the centres of the most confident detections. The picture is
letterboxed to ``imgsz`` as Ultralytics' predictor does, and drawn back on the original image. Files go to
``project/name`` (default ``runs/visualize/exp``, numbered like ``predict``'s unless ``exist_ok=True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["visualize"]


def _letterbox(image: np.ndarray, imgsz: int, stride: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """The canvas Ultralytics' predictor feeds the model, the scale and the (x, y) padding of the original on it."""
    from ultralytics.data.augment import LetterBox

    canvas = LetterBox((imgsz, imgsz), auto=False, stride=stride)(image=image)
    h, w = image.shape[:2]
    ratio = min(imgsz / h, imgsz / w)
    pad = ((imgsz - round(w * ratio)) / 2, (imgsz - round(h * ratio)) / 2)
    return canvas, ratio, pad


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


def _parse_points(point, image_shape) -> list[tuple[float, float]] | None:
    if point is None:
        return None
    h, w = image_shape[:2]
    if isinstance(point, str) and point.strip().lower() == "grid":
        return [(w * fx, h * fy) for fy in (0.25, 0.5, 0.75) for fx in (0.25, 0.5, 0.75)]
    values = point if isinstance(point, (list, tuple)) else str(point).replace(";", ",").split(",")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if not numbers or len(numbers) % 2:
        raise ValueError(f"point must be 'x,y' (or several pairs 'x1,y1,x2,y2', or 'grid') in pixels of the original "
                         f"image, got {point!r}")
    points = list(zip(numbers[::2], numbers[1::2]))
    outside = [p for p in points if not (0 <= p[0] < w and 0 <= p[1] < h)]
    if outside:
        raise ValueError(f"point {outside[0]} is outside the {w}x{h} image (x in [0, {w}), y in [0, {h}))")
    return points


def _digits(values) -> int:
    """Decimals that tell ``values`` apart (4 at least, 12 at most): untrained routers' logits differ in the 8th."""
    vals = sorted(set(float(v) for v in values))
    gaps = [b - a for a, b in zip(vals, vals[1:]) if b > a]
    if not gaps:
        return 4
    return int(min(12, max(4, np.ceil(-np.log10(min(gaps))) + 1)))


def _to_original(xy, ratio, pad):
    return (xy[0] - pad[0]) / ratio, (xy[1] - pad[1]) / ratio


def _draw_bra(image, layer, feat, points, ratio, pad, imgsz, title):
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    with torch.no_grad():
        logits = layer.routing(feat)[0]  # (P, P)
    n_win, topk = layer.n_win, layer.topk
    h_feat, w_feat = feat.shape[2], feat.shape[3]
    stride = imgsz / h_feat
    win_h = -(-h_feat // n_win) * stride  # a window's size on the canvas (the map is padded to whole windows)
    win_w = -(-w_feat // n_win) * stride
    cols = min(3, len(points))
    rows = -(-len(points) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 5.2 * rows), squeeze=False, layout="constrained")
    notes = []
    for k, (px, py) in enumerate(points):
        ax = axes[k // cols][k % cols]
        cx, cy = px * ratio + pad[0], py * ratio + pad[1]  # on the canvas
        qj, qi = min(int(cy // win_h), n_win - 1), min(int(cx // win_w), n_win - 1)
        query = qj * n_win + qi
        row = logits[query]
        top = torch.topk(row, topk)
        weights = torch.softmax(top.values, -1)
        heat = row.view(n_win, n_win).numpy()
        # the heat map covers the padded window grid, mapped back onto the original image
        x0, y0 = _to_original((0, 0), ratio, pad)
        x1, y1 = _to_original((n_win * win_w, n_win * win_h), ratio, pad)
        ax.imshow(image[..., ::-1])
        im = ax.imshow(heat, extent=(x0, x1, y1, y0), cmap="inferno", alpha=0.55, interpolation="nearest")
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
        for rank, (idx, w) in enumerate(zip(top.indices.tolist(), weights.tolist()), start=1):
            j, i = divmod(idx, n_win)
            ox, oy = _to_original((i * win_w, j * win_h), ratio, pad)
            ax.add_patch(patches.Rectangle((ox, oy), win_w / ratio, win_h / ratio, fill=False, lw=2, ec="#00b0ff",
                                           clip_on=True))
            ax.text(max(ox, 0) + 3, max(oy, 0) + 3, f"{rank}", color="white", fontsize=9, va="top", ha="left",
                    clip_on=True, bbox=dict(boxstyle="round,pad=0.15", fc="#00b0ff", ec="none"))
        qx, qy = _to_original((qi * win_w, qj * win_h), ratio, pad)
        ax.add_patch(patches.Rectangle((qx, qy), win_w / ratio, win_h / ratio, fill=False, lw=2.5, ec="#00e676"))
        ax.plot(px, py, marker="+", color="#00e676", ms=14, mew=2.5)
        dl, dw = _digits(row.tolist()), _digits(weights.tolist())
        ranked = "; ".join(f"{r}: ({i // n_win},{i % n_win}) logit {v:.{dl}f} w {w:.{dw}f}" for r, (i, v, w) in
                           enumerate(zip(top.indices.tolist(), top.values.tolist(), weights.tolist()), start=1))
        ax.set_title(f"point ({px:.0f}, {py:.0f}) -> window ({qj},{qi})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        from matplotlib.ticker import FormatStrFormatter

        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="router logit")
        span = max(float(row.max() - row.min()), 1e-12)
        bar.ax.yaxis.set_major_formatter(FormatStrFormatter(f"%.{int(min(12, max(2, np.ceil(-np.log10(span / 4)) + 1)))}f"))
        notes.append(f"point ({px:.0f},{py:.0f}) window ({qj},{qi}): logits of all windows "
                     f"[{row.min().item():.{dl}f}, {row.max().item():.{dl}f}]; routed {ranked}")
    for k in range(len(points), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"{title}: BRA n_win={n_win} topk={topk}\ngreen: query window, blue: routed windows by rank",
                 fontsize=10)  # two lines: one is wider than a single panel
    return fig, notes


def _draw_dat(image, layer, feat, ratio, pad, imgsz, title):
    import matplotlib.pyplot as plt

    with torch.no_grad():
        _, pos, reference = layer.forward_with_points(feat)
    h, w = feat.shape[2], feat.shape[3]
    stride = imgsz / h

    def to_original(p):  # normalised (y, x), align_corners=True over the map -> original pixels (x, y)
        fy = (p[..., 0] + 1) / 2 * max(h - 1, 1)
        fx = (p[..., 1] + 1) / 2 * max(w - 1, 1)
        cx, cy = (fx + 0.5) * stride, (fy + 0.5) * stride
        return torch.stack(((cx - pad[0]) / ratio, (cy - pad[1]) / ratio), -1)

    refs = to_original(reference[0]).reshape(-1, 2).numpy()
    samples = to_original(pos[0]).reshape(-1, 2).numpy()
    shift = np.linalg.norm(samples - refs, axis=-1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5 * image.shape[0] / image.shape[1] + 0.6), layout="constrained")
    ax.imshow(image[..., ::-1])
    ax.scatter(refs[:, 0], refs[:, 1], marker="+", s=30, c="#bdbdbd", lw=1, label="reference grid")
    sc = ax.scatter(samples[:, 0], samples[:, 1], c=shift, cmap="viridis", s=22, edgecolors="black", linewidths=0.4,
                    label="sampling points")
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02, label="offset length, pixels of the original image")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{title}: DAT, {layer.n_groups} offset group(s), stride {layer.stride}", fontsize=10)
    rows, cols = image.shape[:2]
    outside = int(((samples[:, 0] < 0) | (samples[:, 0] >= cols) | (samples[:, 1] < 0) | (samples[:, 1] >= rows)).sum())
    if outside:  # matplotlib clips them away: say so on the picture, not only in the printed note
        ax.text(0.01, 0.01, f"{outside} of {len(samples)} sampling points outside the picture", transform=ax.transAxes,
                fontsize=8, va="bottom", bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.8, ec="none"))
    note = (f"{len(refs)} sampling points; offset length mean {shift.mean():.1f} px, max {shift.max():.1f} px "
            f"(original image); {outside} outside the picture")
    return fig, [note]


def visualize(model="yolov8n-bra.yaml", source=None, imgsz: int = 640, point=None, project="runs/visualize",
              name="exp", exist_ok: bool = False, trusted: bool | None = None) -> list[Path]:
    """Draw, for each BRA and DAT layer of ``model``, where it attends on ``source``.

    Args:
        model: weights (``best.pt``) or a YAML (shipped names allowed; an untrained model is warned about).
        source: an image path; defaults to Ultralytics' bundled ``bus.jpg``.
        imgsz: letterbox size, a multiple of the model's stride.
        point: query point(s) for BRA in pixels of the original image: ``'x,y'``, ``'x1,y1,x2,y2'``, ``'grid'``;
            default: the centres of the (up to 3) most confident detections, or the image centre.
        project, name, exist_ok: output directory ``project/name`` (numbered when it exists, as for ``predict``).
        trusted: load ``model`` without the safe checkpoint check (a file you trust).

    Returns:
        paths of the written PNG files.
    """
    import cv2
    from ultralytics.utils import ASSETS, LOGGER
    from ultralytics.utils.files import increment_path

    from .._plots import save
    from ..nn.bra import BiLevelRoutingAttention
    from ..nn.dat import DAttention
    from .model import YOLO

    source = Path(source) if source is not None else ASSETS / "bus.jpg"
    image = cv2.imread(str(source))
    if image is None:
        raise ValueError(f"source={str(source)!r} is not a readable image file")
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or imgsz < 32:
        raise ValueError(f"imgsz must be an integer >= 32, got {imgsz!r}")
    points = _parse_points(point, image.shape)
    yolo = YOLO(model, trusted=trusted)
    if str(model).lower().endswith((".yaml", ".yml")):
        LOGGER.warning(f"yoloattn visualize: {model} is a model YAML, so its layers are untrained: the picture shows "
                       "the routing and sampling of random weights. Pass trained weights (model=best.pt).")
    net = yolo.model.float().eval()
    stride_max = int(max(net.stride)) if hasattr(net, "stride") else 32
    if imgsz % stride_max:
        raise ValueError(f"imgsz={imgsz} must be a multiple of the model's stride {stride_max}")
    canvas, ratio, pad = _letterbox(image, imgsz, stride_max)
    x = torch.from_numpy(canvas[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255.0
    captured = _capture_inputs(net, (BiLevelRoutingAttention, DAttention), x)
    if not captured:
        raise ValueError(f"model {model!r} has no BiLevelRoutingAttention or DAttention layer to visualize")
    if points is None:
        pred = yolo.predict(image, imgsz=imgsz, verbose=False)[0]
        boxes = pred.boxes
        if len(boxes):
            order = boxes.conf.argsort(descending=True)[:3].tolist()
            points = [(((b[0] + b[2]) / 2), ((b[1] + b[3]) / 2)) for b in (boxes.xyxy[i].tolist() for i in order)]
        else:
            points = [(image.shape[1] / 2, image.shape[0] / 2)]

    out_dir = Path(increment_path(Path(project) / name, exist_ok=exist_ok))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    layer_index = {id(m): getattr(m, "i", k) for k, m in enumerate(net.model)} if hasattr(net, "model") else {}
    for k, (layer, feat) in enumerate(captured):
        row = layer_index.get(id(layer), k)
        stride = imgsz / feat.shape[2]
        title = f"{source.name}, layer {row} (stride {stride:.0f})"
        if isinstance(layer, BiLevelRoutingAttention):
            fig, notes = _draw_bra(image, layer, feat, points, ratio, pad, imgsz, title)
            kind = "bra"
        else:
            fig, notes = _draw_dat(image, layer, feat, ratio, pad, imgsz, title)
            kind = "dat"
        path = save(fig, out_dir / f"{source.stem}_{kind}_layer{row}.png")
        paths.append(path)
        for note in notes:
            LOGGER.info(f"yoloattn visualize: layer {row} ({kind}): {note}")
    LOGGER.info(f"yoloattn visualize: results saved to {out_dir}")
    return paths
