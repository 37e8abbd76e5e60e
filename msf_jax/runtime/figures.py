"""The method in pictures: base, up(base), residual and final image of a few samples, side by side.

    fig = components_figure(base, up_base, residual, final, row_labels=["class 0", ...])
    outputs.save_png("components.png", fig)

Inputs are images, not latents: `base`, `up_base` and `final` uint8 (N,h,w,3) (the base at its own,
lower resolution), `residual` float (N,H,W,3) in the [-1, 1] pixel scale (in latent space: the
decoded final minus the decoded up(base)). The residual is much smaller than the image, so it is
shown amplified around mid-grey by one gain for the whole figure, written in its column title.
Arrays only: no JAX, no models (`sample.py` and `demo.py` produce the inputs).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLUMNS = ("base", "up(base)", "residual", "final = up(base) + residual")


def residual_to_uint8(residual: np.ndarray, gain: float | None = None) -> tuple[np.ndarray, float]:
    """float residual (N,H,W,3), pixel scale [-1, 1] -> (uint8 with 0 at mid-grey, the gain used).

    The default gain maps the 99th percentile of |residual| to full contrast (capped at 50x).
    """
    r = np.asarray(residual, np.float32)
    if gain is None:
        scale = float(np.percentile(np.abs(r), 99)) if r.size else 0.0
        gain = float(min(50.0, 1.0 / scale)) if scale > 0 else 1.0
    shown = np.clip(r * gain, -1.0, 1.0)
    return np.clip(np.round(127.5 * shown + 127.5), 0, 255).astype(np.uint8), gain


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _nearest(image: np.ndarray, size: int) -> np.ndarray:
    """(h,w,3) uint8 -> (size,size,3), nearest neighbour (a base keeps its visible blocks)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))


def labelled_grid(columns: list[tuple[str, np.ndarray]], row_labels: list[str] | None = None, *,
                  cell: int = 96, pad: int = 4, font_size: int = 13) -> np.ndarray:
    """Columns of (title, uint8 (N,h,w,3)) -> one (H,W,3) uint8 image with titles and row labels.

    Every image is scaled (nearest) to `cell` x `cell` pixels.
    """
    n = len(columns[0][1])
    if any(len(images) != n for _, images in columns):
        raise ValueError(f"labelled_grid: columns hold {[len(i) for _, i in columns]} images, expected {n} each")
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s: measure.textbbox((0, 0), s, font=font)[2]  # noqa: E731
    label_w = max([text_w(s) for s in row_labels or []], default=0)
    label_w = label_w + 2 * pad if label_w else 0
    titles = [_wrap(title, cell, text_w) for title, _ in columns]
    title_h = (font_size + 3) * max(len(t) for t in titles) + 2 * pad
    width = label_w + len(columns) * (cell + pad) + pad
    height = title_h + n * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, ((_, images), lines) in enumerate(zip(columns, titles)):
        x = label_w + pad + j * (cell + pad)
        for k, line in enumerate(lines):
            draw.text((x + (cell - text_w(line)) // 2, pad + k * (font_size + 3)), line, fill=(0, 0, 0), font=font)
        for i in range(n):
            canvas.paste(Image.fromarray(_nearest(np.asarray(images[i], np.uint8), cell)),
                         (x, title_h + i * (cell + pad)))
    for i, label in enumerate(row_labels or []):
        y = title_h + i * (cell + pad) + (cell - font_size) // 2
        draw.text((pad, y), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _wrap(text: str, width: int, text_w) -> list[str]:
    """Greedy word wrap of a column title to the cell width."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_w(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def components_figure(base: np.ndarray, up_base: np.ndarray, residual: np.ndarray, final: np.ndarray, *,
                      row_labels: list[str] | None = None, cell: int = 96,
                      gain: float | None = None) -> np.ndarray:
    """base (N,h,w,3) u8, up(base) (N,H,W,3) u8, residual (N,H,W,3) float [-1,1] scale, final u8 ->
    (H',W',3) uint8 figure: one row per sample, columns base | up(base) | residual xgain | final."""
    shown, gain = residual_to_uint8(residual, gain)
    titles = list(COLUMNS)
    titles[2] = f"residual (x{gain:.1f})"
    columns = list(zip(titles, (base, up_base, shown, final)))
    return labelled_grid(columns, row_labels, cell=cell)
