"""PNG figures for the report (matplotlib, Agg): sweep line plots (Table 6, Figure 3) and the Figure-2 example grid.

Every function returns PNG bytes and is deterministic: matplotlib's default settings plus :data:`RC` (whatever the
user's matplotlibrc says), no pyplot state, and no Software/date metadata in the file.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.png import decode_png

DPI = 100
RC: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "image.interpolation": "nearest",
    "axes.prop_cycle": "cycler(color=['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2'])",
}
NO_LABEL_COLOUR = (224, 224, 192)  # unlabelled pixels and pixels a view did not see (the PASCAL VOC "void" colour)
RIGHT, WRONG = "#1a7f37", "#cf222e"


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(RC)
        yield


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, colours: int | None = 256) -> bytes:
    """The figure as PNG bytes without metadata; ``colours``: reduce to an adaptive palette of that many colours
    (median cut, no dithering: deterministic, and 3-5x smaller for noisy adversarial images)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    if colours is None:
        return buf.getvalue()
    from PIL import Image

    with Image.open(io.BytesIO(buf.getvalue())) as img:
        small = img.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def palette(n: int) -> np.ndarray:
    """``n x 3`` uint8 colours of label maps (PASCAL VOC's bit-interleaved colour map; class 0 is black)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def colourise(labels: np.ndarray, no_label: int) -> np.ndarray:
    """H x W label map -> H x W x 3 uint8 with :func:`palette`; ``no_label`` pixels get :data:`NO_LABEL_COLOUR`."""
    lab = labels.astype(np.int64)
    valid = lab != no_label
    top = int(lab[valid].max()) + 1 if valid.any() else 1
    rgb = palette(top)[np.where(valid, lab, 0)]
    rgb[~valid] = NO_LABEL_COLOUR
    return rgb


# ------------------------------------------------------------------------------------------------ line plots
@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]  # in the plotted unit (%, or a score)
    reference: bool = False  # a defense outside the sweep: a dashed horizontal line at its value


def line_plot(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str, integer_x: bool = False) -> bytes:
    """Metric vs the swept parameter, one line per series (markers at the measured points)."""
    with _style():
        fig = _figure(5.0, 3.4)
        ax = fig.add_subplot(1, 1, 1)
        xs = sorted({x for s in series if not s.reference for x in s.x})
        for s in series:
            if s.reference:
                if s.y and xs:
                    ax.plot([xs[0], xs[-1]], [s.y[0]] * 2, linestyle="--", linewidth=1, label=s.label)
            else:
                ax.plot(s.x, s.y, marker="o", markersize=4, linewidth=1.5, label=s.label)
        ax.set_title(title, parse_math=False)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xs:
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" if not integer_x else str(int(x)) for x in xs])
        ax.grid(True, linewidth=0.4, alpha=0.5)
        if series:
            ax.legend(loc="best", frameon=False)
        fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.14)
        return _png(fig)


def pareto_plot(rows: Sequence[Mapping[str, Any]], *, metric: str, title: str) -> bytes:
    """``equi tune``'s front: robust vs clean metric (%) of every screened candidate with its 95% intervals; the
    Pareto front joined by a line, the baseline as a square, confirmed points as open diamonds at their confirmed
    robust value, the chosen one as a star."""

    def pct(v: Any) -> float:
        return float("nan") if v is None else 100.0 * float(v)

    with _style():
        fig = _figure(5.0, 3.6)
        ax = fig.add_subplot(1, 1, 1)
        for r in rows:
            x, y = pct(r["clean"]), pct(r["robust_screen"])
            xerr = [[x - pct(r.get("clean_ci_low") or r["clean"])], [pct(r.get("clean_ci_high") or r["clean"]) - x]]
            yerr = [
                [y - pct(r.get("robust_screen_ci_low") or r["robust_screen"])],
                [pct(r.get("robust_screen_ci_high") or r["robust_screen"]) - y],
            ]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="#bbbbbb", elinewidth=0.6, zorder=1)
            marker = "s" if r.get("baseline") else "o"
            colour = "#d62728" if r.get("on_front") else "#1f77b4"
            ax.plot([x], [y], marker=marker, color=colour, markersize=5, linestyle="none", zorder=3)
            ax.annotate(str(r["candidate"]), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6)
            if r.get("robust_confirmed") is not None:
                yc = pct(r["robust_confirmed"])
                ax.plot([x], [yc], marker="D", mfc="none", color="#2ca02c", markersize=5, linestyle="none", zorder=3)
                ax.plot([x, x], [y, yc], color="#2ca02c", linewidth=0.6, linestyle=":", zorder=2)
            if r.get("chosen"):
                yc = pct(r["robust_confirmed"]) if r.get("robust_confirmed") is not None else y
                ax.plot([x], [yc], marker="*", color="#ff7f0e", markersize=12, linestyle="none", zorder=4)
        front = sorted((pct(r["clean"]), pct(r["robust_screen"])) for r in rows if r.get("on_front"))
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color="#d62728", linewidth=1, zorder=2)
        ax.set_title(title, parse_math=False)
        ax.set_xlabel(f"clean {metric} (%), validation split")
        ax.set_ylabel(f"robust {metric} (%)")
        ax.grid(True, linewidth=0.4, alpha=0.5)
        handles = [
            ax.plot([], [], "o", color="#d62728", label="Pareto front (screen attack)")[0],
            ax.plot([], [], "o", color="#1f77b4", label="dominated")[0],
            ax.plot([], [], "s", color="#555555", label="baseline (as configured)")[0],
            ax.plot([], [], "D", mfc="none", color="#2ca02c", label="confirmed (strong attacks, worst)")[0],
            ax.plot([], [], "*", color="#ff7f0e", markersize=10, label="chosen")[0],
        ]
        ax.legend(handles=handles, loc="best", frameon=False)
        fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.14)
        return _png(fig)


# ------------------------------------------------------------------------------------------------ example grid
STATE_TITLES = {"clean": "clean", "attacked": "attacked", "restored": "restored"}


def _text_cell(ax, text: str, colour: str) -> None:
    # parse_math=False: a class name is text, never mathtext ("$" in a name must not raise or be typeset).
    text = text if len(text) <= 14 else text[:13] + "…"
    size = 14 if len(text) <= 4 else 9 if len(text) <= 8 else 6
    ax.text(
        0.5, 0.5, text, ha="center", va="center", fontsize=size, color=colour, transform=ax.transAxes, parse_math=False
    )
    ax.set_facecolor("#f6f8fa")


def example_grid(rows: Sequence[Mapping[str, Any]], *, title: str, class_names: Sequence[str] | None = None) -> bytes:
    """Figure-2 grid: per sample three rows (clean / attacked / restored), columns the input image, the ground truth
    (dense tasks), the prediction F(x) and each view's prediction g^-1 F(g x). Classification predictions are
    written as class names (``class_names``; indices without them; green: correct, red: wrong); label maps are drawn
    with :func:`palette`."""
    from tasks.png import NO_LABEL_8

    rows = list(rows)
    if not rows:
        raise ValueError("example_grid: no example rows")

    def class_name(cls: int) -> str:
        return str(class_names[cls]) if class_names and 0 <= cls < len(class_names) else str(cls)

    dense = rows[0]["task"] != "classification"
    views = list(rows[0].get("view_names") or [])
    # Classifier logits have no layout: g^-1 is the identity on them, so a view's prediction is F(g x).
    view_head = "g⁻¹F(gx)" if dense else "F(gx)"
    head = ["input"] + (["ground truth"] if dense else []) + ["F(x)"]
    head += [f"{view_head}\n{v.replace(' (', chr(10) + '(')}" for v in views]
    n_rows, n_cols = 3 * len(rows), len(head)
    size = 1.05
    with _style():
        fig = _figure(0.5 + n_cols * size, 0.65 + n_rows * size)
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        for c, text in enumerate(head):
            axes[0, c].set_title(text, fontsize=6)
        for i, ex in enumerate(rows):
            no_label = int(ex.get("ignore_label") if ex.get("ignore_label") is not None else NO_LABEL_8)
            label = int(ex["label"]) if ex.get("label") is not None else -1

            def show_map(ax, png: bytes | None, no_label: int = no_label) -> None:
                if png is None:
                    ax.axis("off")
                else:
                    ax.imshow(colourise(decode_png(png), no_label))

            def show_class(ax, cls: int, label: int = label) -> None:
                _text_cell(ax, class_name(cls), RIGHT if cls == label else WRONG)

            for s, state in enumerate(("clean", "attacked", "restored")):
                r = 3 * i + s
                img = decode_png(ex[f"{state}_image"])
                axes[r, 0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
                shown = class_name(label)[:14]
                suffix = f"\nlabel {shown}" if state == "clean" and not dense else ""
                axes[r, 0].set_ylabel(f"#{ex['position']} {STATE_TITLES[state]}{suffix}", fontsize=7, parse_math=False)
                c = 1
                if dense:
                    show_map(axes[r, 1], ex.get("label_map") if state == "clean" else None)
                    c = 2
                    show_map(axes[r, c], ex.get(f"{state}_pred_map"))
                    for k, png in enumerate(ex.get(f"{state}_view_pred_maps") or []):
                        show_map(axes[r, c + 1 + k], png)
                else:
                    show_class(axes[r, c], int(ex[f"{state}_pred"]))
                    for k, cls in enumerate(ex.get(f"{state}_view_preds") or []):
                        show_class(axes[r, c + 1 + k], int(cls))
        # Wrapped to the figure's width (about 15 characters an inch at 8 pt): a narrow grid keeps its whole title.
        lines = textwrap.wrap(title, max(12, int((0.5 + n_cols * size) * 15))) or [""]
        fig.suptitle("\n".join(lines), fontsize=8, y=0.995, va="top", parse_math=False)
        top = 1 - (0.5 + 0.12 * len(lines)) / (0.65 + n_rows * size)
        left = 0.4 / (0.5 + n_cols * size)
        fig.subplots_adjust(left=left, right=0.99, bottom=0.02, top=top, wspace=0.08, hspace=0.12)
        return _png(fig)
