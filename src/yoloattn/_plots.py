"""Saving charts a person can read: no text drawn over other text.

:func:`save` lays a figure out, moves apart annotation labels that collide, and reports (raises in tests)
any tick label, axis label, title, legend or annotation whose box still overlaps another's.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["overlapping_texts", "save"]


def _tick_labels(axis):
    """The tick labels matplotlib draws: those of ticks inside the view limits (it skips the others)."""
    low, high = sorted(axis.get_view_interval())
    eps = (high - low) * 1e-9
    return [tick.label1 for tick in axis.get_major_ticks()
            if low - eps <= tick.get_loc() <= high + eps and tick.label1.get_text() and tick.label1.get_visible()]


def _texts(fig):
    texts = []
    for ax in fig.axes:
        texts += _tick_labels(ax.xaxis) + _tick_labels(ax.yaxis)
        texts += [t for t in (ax.xaxis.label, ax.yaxis.label, ax.title) if t.get_text()]
        texts += [t for t in ax.texts if t.get_text()]
        legend = ax.get_legend()
        if legend is not None:
            texts += [t for t in legend.get_texts() if t.get_text()]
    return texts


def _renderer(fig):
    if not hasattr(fig.canvas, "get_renderer"):  # a figure made without a drawing backend: give it Agg's canvas
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of visible texts of ``fig`` whose rendered boxes overlap."""
    renderer = _renderer(fig)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _texts(fig) if t.get_visible()]
    pairs = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            if box_a.overlaps(box_b) and box_a.width > 0 and box_b.width > 0:
                pairs.append((a, b))
    return pairs


def _spread_annotations(fig, steps: int = 60) -> None:
    """Nudge colliding annotations of each axis apart vertically (in display space) until they are clear."""
    renderer = _renderer(fig)
    for ax in fig.axes:
        notes = [t for t in ax.texts if t.get_text() and hasattr(t, "xyann")]
        for _ in range(steps):
            moved = False
            boxes = [t.get_window_extent(renderer) for t in notes]
            for i in range(len(notes)):
                for j in range(i + 1, len(notes)):
                    if boxes[i].overlaps(boxes[j]):
                        upper = j if boxes[j].y0 >= boxes[i].y0 else i
                        x, y = notes[upper].xyann
                        notes[upper].xyann = (x, y + 6)
                        moved = True
            if not moved:
                break
            fig.canvas.draw()


def save(fig, path: Path | str, dpi: int = 120) -> Path:
    """Lay out and save ``fig`` to ``path`` (closed afterwards); returns the path."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:
        fig.tight_layout()
    _spread_annotations(fig)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
