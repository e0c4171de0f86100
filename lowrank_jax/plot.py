"""PNG plots on matplotlib: the main job's training curve and the benchmarks' line plots.

matplotlib is imported inside the functions (``import lowrank_jax`` stays light) and drawn
on its Agg canvas through :class:`matplotlib.figure.Figure`, never pyplot, so no global
figure state or GUI backend is touched. Output is deterministic: fixed size and dpi, no
``Software`` metadata (matplotlib writes no date into a PNG), and labels are plain text
(``parse_math=False``), so a title may hold any character, ``$`` and ``_`` included.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["line_plot", "plot_metrics", "trailing_mean", "training_plot"]

SIZE_INCHES = (8.0, 4.8)
DPI = 100
_LOSS, _SMOOTH, _EVAL, _LR = "#1f77b4", "#0b3d91", "#d62728", "#7f7f7f"


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    r"""``m_i = mean(v_{max(0, i-w+1)} .. v_i)``: the mean of the last ``window`` values at each step."""
    if int(window) != window or window < 1:
        raise ValueError(f"`window` must be a positive integer, got {window!r}")
    v = np.asarray(values, np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(0, i - int(window))
    return ((c[i] - c[lo]) / (i - lo)).tolist()


def _as_float_array(name: str, values, length: int | None = None) -> np.ndarray:
    v = np.asarray(values, np.float64).reshape(-1)
    if length is not None and len(v) != length:
        raise ValueError(f"`{name}` has {len(v)} values, expected {length} (one per step)")
    return v


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _plain(text):
    """Sets ``parse_math=False`` on a Text, so ``$`` is a dollar sign, not mathtext."""
    text.set_parse_math(False)
    return text


def _legend(ax, handles_from=()):
    handles, labels = ax.get_legend_handles_labels()
    for other in handles_from:
        h, lab = other.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    legend = ax.legend(handles, labels, loc="best", framealpha=0.9, fontsize=9)
    for t in legend.get_texts():
        _plain(t)
    return legend


def _save(fig, path) -> None:
    """Writes ``fig`` as a PNG atomically (a temp file, then ``os.replace``)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    os.replace(tmp, path)


def training_plot(path, steps: Sequence[int], loss: Sequence[float], *, smoothed: Sequence[float] | None = None,
                  smoothed_label: str = "smoothed", eval_steps: Sequence[int] | None = None,
                  eval_loss: Sequence[float] | None = None, lr: Sequence[float] | None = None,
                  title: str = "") -> None:
    """Writes a training curve PNG: raw and smoothed loss, eval points, the learning rate on a right axis.

    Args:
      path: the PNG file to write (replaced atomically).
      steps, loss: one training loss per step; non-finite losses leave a gap.
      smoothed: an optional second curve over ``steps`` (e.g. :func:`trailing_mean`), labelled
        ``smoothed_label``.
      eval_steps, eval_loss: held-out losses, drawn as points; both or neither.
      lr: the learning rate at each step, on a second y axis ("learning rate").
      title: any text.

    The step axis has integer ticks only. Raises ``ValueError`` for empty ``steps``, a series
    whose length differs from ``steps``' (naming it), or ``eval_steps`` without ``eval_loss``.
    """
    from matplotlib.ticker import MaxNLocator

    x = _as_float_array("steps", steps)
    if len(x) == 0:
        raise ValueError("`steps` is empty: nothing to plot")
    y = _as_float_array("loss", loss, len(x))
    if (eval_steps is None) != (eval_loss is None):
        raise ValueError("`eval_steps` and `eval_loss` go together: pass both or neither")
    fig, ax = _figure()
    ax.plot(x, y, color=_LOSS, alpha=0.45 if smoothed is not None else 1.0, linewidth=1.0, label="train loss")
    if smoothed is not None:
        ax.plot(x, _as_float_array("smoothed", smoothed, len(x)), color=_SMOOTH, linewidth=2.0,
                label=f"train loss, {smoothed_label}")
    if eval_steps is not None:
        ex = _as_float_array("eval_steps", eval_steps)
        ax.plot(ex, _as_float_array("eval_loss", eval_loss, len(ex)), "o", color=_EVAL, markersize=6,
                linestyle="-" if len(ex) > 1 else "none", linewidth=1.0, label="eval loss")
    others = []
    if lr is not None:
        ax_lr = ax.twinx()
        ax_lr.plot(x, _as_float_array("lr", lr, len(x)), color=_LR, linestyle="--", linewidth=1.2,
                   label="learning rate")
        ax_lr.set_ylabel("learning rate", color=_LR)
        ax_lr.tick_params(axis="y", colors=_LR)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.set_ylim(bottom=0)
        others.append(ax_lr)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)  # losses as they are, not "+1.08e1" and small deltas
    lo, hi = float(np.min(x)), float(np.max(x))
    ax.set_xlim(lo - 0.5, hi + 0.5) if hi - lo < 2 else ax.set_xlim(lo, hi)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    _plain(ax.set_title(title))
    _legend(ax, others)
    _save(fig, path)


def line_plot(path, series: Mapping[str, Sequence[float]], xs: Sequence[float], *, title: str = "",
              xlabel: str = "", ylabel: str = "", log2_x: bool = False, integer_x: bool = False) -> None:
    """Writes a PNG with one line (and markers) per ``{label: ys}`` entry over the shared ``xs``.

    ``log2_x`` draws x on a base-2 log scale with a tick at every ``xs`` value (batch sizes);
    ``integer_x`` allows integer x ticks only. NaN values leave gaps. Raises ``ValueError`` for no
    series, or a series whose length differs from ``xs``' (naming it).
    """
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

    x = _as_float_array("xs", xs)
    if not series:
        raise ValueError("`series` is empty: nothing to plot")
    fig, ax = _figure()
    for name, ys in series.items():
        ax.plot(x, _as_float_array(f"series[{name!r}]", ys, len(x)), marker="o", markersize=4, label=name)
    if log2_x:
        if np.any(x <= 0):
            raise ValueError(f"`log2_x` needs positive xs, got {x.tolist()}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(x))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{v:g}" for v in x])
    elif integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    _plain(ax.set_title(title))
    _legend(ax)
    _save(fig, path)


def plot_metrics(metrics_path, png_path, *, title: str = "", smooth_window: int | None = None) -> None:
    """Draws :func:`training_plot` from a ``metrics.jsonl`` (:mod:`lowrank_jax.metrics`).

    Train rows give the loss and learning-rate curves, eval rows (``eval_loss``) the points; the
    smoothed curve is the :func:`trailing_mean` over ``smooth_window`` steps (default: a fifth of
    the steps, between 1 and 10). Raises ``ValueError`` if the file has no train rows.
    """
    from lowrank_jax.metrics import read_metrics

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if not train:
        raise ValueError(f"{metrics_path} has no training rows to plot")
    steps = [r["step"] for r in train]
    loss = [math.nan if r["loss"] is None else r["loss"] for r in train]
    window = smooth_window or max(1, min(10, len(train) // 5))
    lrs = [r.get("lr") for r in train]
    training_plot(png_path, steps, loss, smoothed=trailing_mean(loss, window), smoothed_label=f"mean of last {window}",
                  eval_steps=[r["step"] for r in evals] if evals else None,
                  eval_loss=[r["eval_loss"] for r in evals] if evals else None,
                  lr=None if any(v is None for v in lrs) else lrs, title=title)
