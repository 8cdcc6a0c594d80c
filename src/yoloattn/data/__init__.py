"""Built-in datasets."""

from .shapes import SHAPES_CLASSES, shapes

__all__ = ["SHAPES_CLASSES", "shapes"]
