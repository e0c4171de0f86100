"""A dependency-free PNG line plot (loss curves), so the main job needs no matplotlib.

The image is rasterised with numpy and encoded with zlib; labels use a 3x5
bitmap font scaled up. Enough for a loss curve with labelled axes.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["line_plot_png", "write_png"]

_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", " ": "000000000000000", "a": "000011101101111", "b": "100100111101111",
    "c": "000111100100111", "d": "001001111101111", "g": "111101111001111", "h": "100100111101101",
    "i": "010000010010010", "l": "010010010010011", "n": "000110101101101", "o": "000111101101111",
    "p": "000111101111100", "r": "000111100100100", "s": "000011110001110", "t": "010111010010011",
    "u": "000101101101111", "v": "000101101101010", "x": "000101010010101", "y": "101101111001111",
    "k": "100101110101101", "m": "000111111101101", "f": "011100110100100", "w": "000101101111111",
    ":": "000010000010000", "/": "001001010100100", "(": "010100100100010", ")": "010001001001010",
    "=": "000111000111000",
}


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes an ``[H, W, 3]`` uint8 array as an RGB PNG."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def _text(img, x: int, y: int, text: str, color, scale: int = 2) -> None:
    for i, ch in enumerate(text.lower()):
        bits = _GLYPHS.get(ch, _GLYPHS[" "])
        for k, bit in enumerate(bits):
            if bit == "1":
                r, c = divmod(k, 3)
                y0, x0 = y + r * scale, x + (i * 4 + c) * scale
                img[max(y0, 0):max(y0 + scale, 0), max(x0, 0):max(x0 + scale, 0)] = color


def _line(img, x0, y0, x1, y1, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    h, w, _ = img.shape
    for dx in range(width):
        for dy in range(width):
            ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            img[ys[ok] + dy, xs[ok] + dx] = color


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def line_plot_png(path, series: dict[str, Sequence[float]], *, xs: Sequence[float] | None = None,
                  title: str = "", xlabel: str = "step", ylabel: str = "loss", size=(720, 420)) -> None:
    """Plots one or more series (e.g. ``{"train loss": [...]}``) into a PNG file."""
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 40, 50
    values = [np.asarray(v, np.float64) for v in series.values() if len(v)]
    if not values:
        raise ValueError("nothing to plot: every series is empty")
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(v) for v in values)
    x_values = np.asarray(xs if xs is not None else np.arange(n), np.float64)
    x_lo, x_hi = float(x_values.min()), float(max(x_values.max(), x_values.min() + 1))

    def to_px(x, y):
        px = left + (x - x_lo) / (x_hi - x_lo) * (w - left - right)
        py = top + (hi - y) / (hi - lo) * (h - top - bottom)
        return px, py

    grey, black = (200, 200, 200), (0, 0, 0)
    for k in range(5):  # grid and y ticks
        y = lo + (hi - lo) * k / 4
        _, py = to_px(x_lo, y)
        _line(img, left, py, w - right, py, grey, 1)
        _text(img, 4, int(py) - 5, _fmt(y), black)
    for k in range(5):
        x = x_lo + (x_hi - x_lo) * k / 4
        px, _ = to_px(x, lo)
        _text(img, int(px) - 10, h - bottom + 8, _fmt(x), black)
    _line(img, left, top, left, h - bottom, black, 2)
    _line(img, left, h - bottom, w - right, h - bottom, black, 2)
    for i, (name, v) in enumerate(series.items()):
        v = np.asarray(v, np.float64)
        xv = x_values[: len(v)] if xs is not None else np.arange(len(v), dtype=np.float64)
        color = colors[i % len(colors)]
        pts = [to_px(a, b) for a, b in zip(xv, v) if np.isfinite(b)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            _line(img, x0, y0, x1, y1, color, 2)
        _text(img, w - right - 200, top + 6 + 14 * i, name, color)
    _text(img, left, 12, title, black)
    _text(img, w // 2 - 20, h - 18, xlabel, black)
    _text(img, 4, top - 22, ylabel, black)
    write_png(path, img)
