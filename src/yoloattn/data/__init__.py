"""Built-in datasets."""

from .scenes import FLIP_IDX, LEVELS, SHAPES_CLASSES, TASKS, parse_alias, shapes

__all__ = ["FLIP_IDX", "LEVELS", "SHAPES_CLASSES", "TASKS", "parse_alias", "shapes"]
