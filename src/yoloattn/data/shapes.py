"""``shapes``: a synthetic detection dataset of small, dense, occluded objects over clutter.

It is what BiFormer is claimed to help with (seed 001): many small objects, some in dense
clusters, partly hidden behind each other, over a textured background with distractor
strokes, in several classes and scales. Images are generated deterministically from a seed,
written once in YOLO format (images, labels, a data YAML with a train/val split) to a cache
directory outside the repository, and reused by every later call with the same settings. The copy is
published with a manifest and checked on every use: a deleted, truncated or half-written file makes the
next use generate it again (see :func:`yoloattn._cache.published_dir`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .._cache import cache_dir, published_dir

__all__ = ["SHAPES_CLASSES", "shapes", "cache_dir"]

SHAPES_CLASSES = ("circle", "square", "triangle", "cross")
_VERSION = 1  # bump when the generator's output changes, so old caches are not reused


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured clutter: smooth colour noise, a grating, strokes and faint blobs. (size, size, 3) uint8."""
    import cv2

    coarse = rng.uniform(40, 200, (4, 4, 3)).astype(np.float32)
    img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
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


def _shape_mask(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Binary mask (size, size) of one object of class ``cls`` filling its box."""
    import cv2

    mask = np.zeros((size, size), np.uint8)
    c, r = (size - 1) / 2, size / 2
    if cls == 0:
        cv2.circle(mask, (int(round(c)), int(round(c))), max(int(r), 1), 1, -1)
    elif cls == 1:
        mask[:] = 1
    elif cls == 2:
        pts = np.array([[c, 0], [size - 1, size - 1], [0, size - 1]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    else:
        t = max(size // 3, 1)
        mask[(size - t) // 2:(size + t) // 2, :] = 1
        mask[:, (size - t) // 2:(size + t) // 2] = 1
    if rng.random() < 0.5:
        mask = mask.T.copy() if cls != 2 else mask[::-1].copy()  # flipped triangles too
    return mask


def _image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, list]:
    """One image and its YOLO labels [(cls, xc, yc, w, h), ...] normalised to [0, 1]."""
    img = _background(rng, size)
    owner = np.full((size, size), -1, np.int32)  # which object shows at each pixel
    objects = []  # (cls, x0, y0, s, area)
    n_target = int(rng.integers(max(3, max_objects // 3), max_objects + 1))
    clusters = rng.integers(size // 8, size - size // 8, (int(rng.integers(1, 4)), 2))
    for _ in range(n_target * 4):
        if len(objects) >= n_target:
            break
        s = int(np.clip(rng.lognormal(np.log(size / 14), 0.5), 6, size / 4))  # mostly small objects
        if rng.random() < 0.6:  # dense clusters
            centre = clusters[rng.integers(len(clusters))]
            x0, y0 = (centre + rng.normal(0, size / 12, 2) - s / 2).astype(int)
        else:
            x0, y0 = rng.integers(0, size - s, 2)
        x0, y0 = int(np.clip(x0, 0, size - s)), int(np.clip(y0, 0, size - s))
        cls = int(rng.integers(len(SHAPES_CLASSES)))
        mask = _shape_mask(cls, s, rng).astype(bool)
        region = owner[y0:y0 + s, x0:x0 + s]
        covered = np.bincount(region[mask][region[mask] >= 0], minlength=len(objects))
        visible = np.bincount(owner[owner >= 0], minlength=len(objects))
        # occlusion allowed, but every earlier object keeps at least 40% of its area visible
        if any(visible[j] - covered[j] < 0.4 * objects[j][4] for j in np.nonzero(covered)[0]):
            continue
        colour = rng.integers(0, 256, 3)
        colour[rng.integers(3)] = rng.integers(200, 256)  # saturated, so objects differ from the clutter
        patch = img[y0:y0 + s, x0:x0 + s]
        patch[mask] = (0.85 * colour + 0.15 * patch[mask]).astype(np.uint8)
        region[mask] = len(objects)
        objects.append((cls, x0, y0, s, int(mask.sum())))
    labels = []
    for cls, x0, y0, s, _ in objects:  # the full extent of each object, occluded or not
        labels.append((cls, (x0 + s / 2) / size, (y0 + s / 2) / size, s / size, s / size))
    return img, labels


def shapes(n_train: int = 256, n_val: int = 64, imgsz: int = 256, max_objects: int = 24, seed: int = 0,
           root: str | Path | None = None, progress: bool = True) -> Path:
    """Generate (once) the shapes dataset and return the path of its data YAML.

    Args:
        n_train: training images.
        n_val: validation images.
        imgsz: image side in pixels.
        max_objects: most objects in one image.
        seed: random seed; the same arguments always give the same images.
        root: parent directory for the dataset; defaults to ``cache_dir() / 'datasets'``.
        progress: show a progress bar while generating.

    Returns:
        Path to ``data.yaml`` (YOLO format, ``train``/``val`` splits, classes ``SHAPES_CLASSES``).
    """
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("imgsz", imgsz, 32),
                             ("max_objects", max_objects, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    import cv2

    config = dict(n_train=n_train, n_val=n_val, imgsz=imgsz, max_objects=max_objects, seed=seed, version=_VERSION)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    base = Path(root) if root is not None else cache_dir() / "datasets"
    target = base / f"shapes-{key}"

    def build(tmp: Path) -> None:
        jobs = [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)]
        bar = _progress(jobs, progress, f"yoloattn: generating shapes dataset in {target}")
        for split, i in bar:
            # one stream per image: any image can be regenerated alone, and the splits never share one
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            img, labels = _image(rng, imgsz, max_objects)
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
            (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(tmp / "images" / split / f"{i:05d}.png"), img):
                raise OSError(f"could not write {tmp / 'images' / split / f'{i:05d}.png'}")
            (tmp / "labels" / split / f"{i:05d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels))
        names = "\n".join(f"  {i}: {n}" for i, n in enumerate(SHAPES_CLASSES))
        (tmp / "data.yaml").write_text(
            f"# yoloattn shapes dataset, generated by yoloattn.data.shapes({', '.join(f'{k}={v}' for k, v in config.items())})\n"
            f"path: {target}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    return published_dir(target, build, "the shapes dataset") / "data.yaml"


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from ultralytics.utils import TQDM
    except ImportError:
        return items
    return TQDM(items, desc=desc, unit="img")
