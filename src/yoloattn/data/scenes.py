"""``shapes``: synthetic scenes of circles, squares, triangles and crosses, for every YOLO task.

Every object is a polygon drawn by the generator (a size, a centre and a rotation), so its box, mask
polygon, keypoints and oriented box are exact. Two levels:

- ``easy`` (the default, the main job's data): 2–8 large, well separated objects (12–30% of the image side)
  in saturated colours over a smooth, lightly noisy background. A detector from scratch learns it in minutes.
- ``hard``: 8–24 small objects (median about 1/10 of the side, between 1/20 and 1/5: 8–32 px at imgsz 160,
  COCO's "small"), 60% of them in dense clusters, partly hidden behind each other (every object keeps at least
  40% of its area visible), over textured clutter with object-coloured distractor strokes: what BiFormer's
  authors claim routing helps with. (Version 2 had objects of 1/14 of the side, 6 px at least: at imgsz 160
  from 4 px, too small for a from-scratch YOLO to learn within a CPU study's budget.)

Tasks, from the same scenes (same seeds, same images):

- ``detect``: the full extent of each object (occluded or not) as an axis-aligned box;
- ``segment``: its polygon;
- ``pose``: 4 keypoints in the object's own frame: top, right, bottom, left (a circle's 4 points at 0/90/180/
  270°, a square's edge midpoints, a cross's arm tips, a triangle's apex, base corners and base midpoint),
  visibility 2 where the object shows, 1 where it is occluded, 0 outside the image; ``flip_idx [0, 3, 2, 1]``;
- ``obb``: the object's rotated square (its own frame's bounding box);
- ``classify``: a square crop around each object that keeps at least 60% of its area visible, 64 px, in a
  folder per class.

Images are generated deterministically from a seed, written once in YOLO format to a cache directory outside
the repository, published with a manifest and checked on every use: a deleted, truncated or half-written file
makes the next use generate it again (see :func:`yoloattn._cache.published_dir`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._cache import cache_dir, published_dir

__all__ = ["FLIP_IDX", "LEVELS", "SHAPES_CLASSES", "TASKS", "parse_alias", "shapes"]

SHAPES_CLASSES = ("circle", "square", "triangle", "cross")
TASKS = ("detect", "segment", "pose", "obb", "classify")
LEVELS = ("easy", "hard")
FLIP_IDX = [0, 3, 2, 1]  # top, right, bottom, left -> a horizontal flip swaps right and left
_VERSION = 3  # bump when the generator's output changes, so old caches are not reused
CROP = 64  # classification crops


@dataclass
class _Object:
    cls: int
    cx: float
    cy: float
    size: float
    angle: float  # radians
    colour: tuple

    def _to_image(self, points: np.ndarray) -> np.ndarray:
        """(K, 2) points of the unit square [-0.5, 0.5]² of the object's frame -> image coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        rot = np.array([[c, -s], [s, c]])
        return points * self.size @ rot.T + np.array([self.cx, self.cy])

    def polygon(self) -> np.ndarray:
        if self.cls == 0:  # circle
            t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
            pts = 0.5 * np.stack([np.sin(t), -np.cos(t)], 1)
        elif self.cls == 1:  # square
            pts = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        elif self.cls == 2:  # triangle, apex up
            pts = np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        else:  # cross, arms a third wide
            a, b = 1 / 6, 0.5
            pts = np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                            [-b, -a], [-a, -a]])
        return self._to_image(pts)

    def keypoints(self) -> np.ndarray:
        """(4, 2): top, right, bottom, left in the object's frame."""
        if self.cls == 2:  # apex, right base corner, base midpoint, left base corner
            pts = np.array([[0.0, -0.5], [0.5, 0.5], [0.0, 0.5], [-0.5, 0.5]])
        else:
            pts = np.array([[0.0, -0.5], [0.5, 0.0], [0.0, 0.5], [-0.5, 0.0]])
        return self._to_image(pts)

    def rotated_box(self) -> np.ndarray:
        return self._to_image(np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]))


def _background(rng: np.random.Generator, size: int, level: str) -> np.ndarray:
    """(size, size, 3) uint8: a smooth gradient (easy), or textured clutter with distractor strokes (hard)."""
    import cv2

    coarse = rng.uniform(40, 200, (3 if level == "easy" else 4,) * 2 + (3,)).astype(np.float32)
    img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    if level == "easy":
        img = img * 0.5 + 64  # muted, so saturated objects stand out
        img += rng.normal(0, 6, (size, size, 3)).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.25)
    grating = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq) * rng.uniform(5, 20)
    img += grating[..., None]
    img += rng.normal(0, 12, (size, size, 3)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(8, 20))):  # distractor strokes: thin, object-coloured, not objects
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(img, tuple(map(int, p1)), tuple(map(int, p2)), tuple(map(int, rng.integers(0, 256, 3))),
                 int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(3, 8))):  # faint blobs
        centre, axes = rng.integers(0, size, 2), rng.integers(size // 30 + 2, size // 8 + 3, 2)
        overlay = img.copy()
        cv2.ellipse(overlay, tuple(map(int, centre)), tuple(map(int, axes)), float(rng.uniform(0, 180)), 0, 360,
                    tuple(map(int, rng.integers(0, 256, 3))), -1, cv2.LINE_AA)
        img = cv2.addWeighted(overlay, 0.35, img, 0.65, 0)
    return img


def _mask(obj: _Object, size: int) -> np.ndarray:
    import cv2

    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(obj.polygon() * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _scene(rng: np.random.Generator, size: int, level: str) -> tuple[np.ndarray, list[_Object], np.ndarray]:
    """One image, its objects in drawing order, and the owner map (index of the object showing at each pixel)."""
    import cv2

    img = _background(rng, size, level)
    owner = np.full((size, size), -1, np.int32)
    objects, areas = [], []
    if level == "easy":
        n_target = int(rng.integers(2, 9))
    else:
        n_target = int(rng.integers(8, 25))
        clusters = rng.uniform(size / 8, size - size / 8, (int(rng.integers(1, 4)), 2))
    for _ in range(n_target * 6):
        if len(objects) >= n_target:
            break
        if level == "easy":
            s = float(rng.uniform(0.12, 0.30) * size)
        else:
            s = float(np.clip(rng.lognormal(np.log(size / 10), 0.35), size / 20, size / 5))
        angle = float(rng.uniform(0, math.pi / 2)) if level == "hard" or rng.random() < 0.5 else 0.0
        reach = s * 0.71  # half the diagonal: the object stays inside the image at any rotation
        if level == "hard" and rng.random() < 0.6:  # dense clusters
            centre = clusters[rng.integers(len(clusters))] + rng.normal(0, size / 12, 2)
        else:
            centre = rng.uniform(reach, size - reach, 2)
        cx, cy = (float(np.clip(v, reach, size - reach)) for v in centre)
        colour = rng.integers(0, 256, 3)
        colour[rng.integers(3)] = rng.integers(200, 256)  # saturated, so objects differ from the background
        obj = _Object(int(rng.integers(len(SHAPES_CLASSES))), cx, cy, s, angle, tuple(int(c) for c in colour))
        mask = _mask(obj, size)
        if not mask.any():
            continue
        covered = np.bincount(owner[mask][owner[mask] >= 0], minlength=len(objects))
        if level == "easy" and covered.any():
            continue  # well separated
        if level == "easy":
            grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if (owner[grown] >= 0).any():
                continue
        visible = np.bincount(owner[owner >= 0], minlength=len(objects))
        # occlusion allowed, but every earlier object keeps at least 40% of its area visible
        if any(visible[j] - covered[j] < 0.4 * areas[j] for j in np.nonzero(covered)[0]):
            continue
        layer = img.copy()
        cv2.fillPoly(layer, [np.round(obj.polygon() * 16).astype(np.int32)], obj.colour, lineType=cv2.LINE_AA, shift=4)
        changed = (layer != img).any(-1, keepdims=True)  # the polygon and its anti-aliased edge
        img = np.where(changed, (0.85 * layer + 0.15 * img).astype(np.uint8), img)
        owner[mask] = len(objects)
        objects.append(obj)
        areas.append(int(mask.sum()))
    return img, objects, owner


def _labels(task: str, objects: list[_Object], owner: np.ndarray, size: int) -> list[str]:
    lines = []
    for k, obj in enumerate(objects):
        poly = np.clip(obj.polygon() / size, 0, 1)
        if task == "detect":
            (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
            lines.append(f"{obj.cls} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}")
        elif task == "segment":
            lines.append(f"{obj.cls} " + " ".join(f"{x:.6f} {y:.6f}" for x, y in poly))
        elif task == "obb":
            box = np.clip(obj.rotated_box() / size, 0, 1)
            lines.append(f"{obj.cls} " + " ".join(f"{x:.6f} {y:.6f}" for x, y in box))
        elif task == "pose":
            (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
            parts = [f"{obj.cls} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}"]
            for x, y in obj.keypoints():
                xi, yi = int(round(x)), int(round(y))
                if not (0 <= x < size and 0 <= y < size):
                    parts.append("0 0 0")
                    continue
                shown = owner[min(yi, size - 1), min(xi, size - 1)] == k
                parts.append(f"{x / size:.6f} {y / size:.6f} {2 if shown else 1}")
            lines.append(" ".join(parts))
    return lines


def _crops(img: np.ndarray, objects: list[_Object], owner: np.ndarray, size: int):
    """(class, 64x64 crop) of every object that keeps at least 60% of its area visible."""
    import cv2

    for k, obj in enumerate(objects):
        area = _mask(obj, size).sum()
        if area == 0 or (owner == k).sum() < 0.6 * area:
            continue
        half = obj.size * 0.71 * 1.2
        x0, y0 = int(max(0, obj.cx - half)), int(max(0, obj.cy - half))
        x1, y1 = int(min(size, obj.cx + half)), int(min(size, obj.cy + half))
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        yield obj.cls, cv2.resize(img[y0:y1, x0:x1], (CROP, CROP), interpolation=cv2.INTER_AREA)


def parse_alias(name: str) -> dict | None:
    """``'shapes'``, ``'shapes-hard'``, ``'shapes-seg'``, ``'shapes-pose-hard'``, ... -> shapes() arguments, or None."""
    text = str(name)
    if text.endswith((".yaml", ".yml")):
        text = text.rsplit(".", 1)[0]
    parts = text.split("-")
    if parts[0] != "shapes":
        return None
    aliases = {"seg": "segment", "segment": "segment", "pose": "pose", "obb": "obb", "cls": "classify",
               "classify": "classify", "detect": "detect"}
    task, level = "detect", "easy"
    for part in parts[1:]:
        if part in aliases:
            task = aliases[part]
        elif part in LEVELS:
            level = part
        else:
            return None
    return {"task": task, "level": level}


def shapes(n_train: int = 256, n_val: int = 64, imgsz: int = 256, seed: int = 0, task: str = "detect",
           level: str = "easy", root: str | Path | None = None, progress: bool = True) -> Path:
    """Generate (once) a shapes dataset and return its data YAML (for ``classify``: its folder).

    Args:
        n_train: training images (scenes).
        n_val: validation images.
        imgsz: image side in pixels.
        seed: random seed; the same arguments always give the same images.
        task: ``'detect'``, ``'segment'``, ``'pose'``, ``'obb'`` or ``'classify'``.
        level: ``'easy'`` (clear, learnable scenes) or ``'hard'`` (small, dense, occluded objects over clutter).
        root: parent directory for the dataset; defaults to ``cache_dir() / 'datasets'``.
        progress: show a progress bar while generating.

    Returns:
        Path to ``data.yaml`` (YOLO format, ``train``/``val`` splits, classes ``SHAPES_CLASSES``), or for
        ``classify`` to the folder holding ``train/<class>`` and ``val/<class>``.
    """
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("imgsz", imgsz, 32)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    import cv2

    config = dict(n_train=n_train, n_val=n_val, imgsz=imgsz, seed=seed, task=task, level=level, version=_VERSION)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    base = Path(root) if root is not None else cache_dir() / "datasets"
    target = base / f"shapes-{task}-{level}-{key}"

    def build(tmp: Path) -> None:
        jobs = [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)]
        bar = _progress(jobs, progress, f"yoloattn: generating the shapes {task} data ({level}) in {target}")
        for split, i in bar:
            # one stream per image: any image can be regenerated alone, and the splits never share one
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            img, objects, owner = _scene(rng, imgsz, level)
            if task == "classify":
                for k, (cls, crop) in enumerate(_crops(img, objects, owner, imgsz)):
                    folder = tmp / split / SHAPES_CLASSES[cls]
                    folder.mkdir(parents=True, exist_ok=True)
                    _write_image(cv2, folder / f"{i:05d}_{k}.png", crop)
                continue
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
            (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
            _write_image(cv2, tmp / "images" / split / f"{i:05d}.png", img)
            lines = _labels(task, objects, owner, imgsz)
            (tmp / "labels" / split / f"{i:05d}.txt").write_text("".join(line + "\n" for line in lines))
        if task == "classify":
            for split in ("train", "val"):  # every class folder exists, even if a tiny split has none of a class
                for name in SHAPES_CLASSES:
                    (tmp / split / name).mkdir(parents=True, exist_ok=True)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            return
        names = "\n".join(f"  {i}: {n}" for i, n in enumerate(SHAPES_CLASSES))
        extra = f"kpt_shape: [4, 3]\nflip_idx: {FLIP_IDX}\n" if task == "pose" else ""
        (tmp / "data.yaml").write_text(
            f"# yoloattn shapes {task} data ({level}), generated by yoloattn.data.shapes("
            f"{', '.join(f'{k}={v}' for k, v in config.items())})\n"
            f"path: {target}\ntrain: images/train\nval: images/val\n{extra}names:\n{names}\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    folder = published_dir(target, build, f"the shapes {task} dataset ({level})")
    return folder if task == "classify" else folder / "data.yaml"


def _write_image(cv2, path: Path, img: np.ndarray) -> None:
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from ultralytics.utils import TQDM
    except ImportError:
        return items
    return TQDM(items, desc=desc, unit="img")
