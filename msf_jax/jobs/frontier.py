"""The cost/quality frontier of a sweep: the Pareto front, the table (CSV, JSON) and the plot (PNG).

Pure functions on a list of result rows (dicts). A row has at least `id`, `family` ("msf" | "dit"),
`label` (short text for the plot), `flops_per_image` and `quality` (lower is better: FID or SWD).
The plot is drawn with Pillow (no matplotlib dependency): quality against FLOPs per image on a log
axis, one marker per setting (MSF circles, DiT squares), the front as a red staircase. Files are
written through `paths` (committed: local names or gs:// URLs).
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from msf_jax.runtime import paths

FAMILY_STYLE = {"msf": ("circle", (31, 119, 180)), "dit": ("square", (255, 127, 14))}
FRONT_COLOR = (214, 39, 40)


# ----------------------------------------------------------------------------------------------
# The Pareto front
# ----------------------------------------------------------------------------------------------
def pareto_front(costs, qualities) -> list[int]:
    """Indices of the points not dominated in (cost, quality), both minimized, sorted by cost.

    Point i is dominated when some j is no worse in both and strictly better in one. Equal points are
    all kept. NaN qualities are never on the front.
    """
    c, q = np.asarray(costs, np.float64), np.asarray(qualities, np.float64)
    if c.shape != q.shape or c.ndim != 1:
        raise ValueError(f"pareto_front: costs {c.shape} and qualities {q.shape} must be equal 1-D shapes")
    ok = np.isfinite(c) & np.isfinite(q)
    front = []
    for i in np.flatnonzero(ok):
        no_worse = ok & (c <= c[i]) & (q <= q[i])
        better = (c < c[i]) | (q < q[i])
        if not np.any(no_worse & better):
            front.append(int(i))
    return sorted(front, key=lambda i: (c[i], q[i]))


def mark_front(rows: list[dict]) -> list[dict]:
    """Copies of `rows` with `on_front` set; returns them in the input order."""
    front = set(pareto_front([r["flops_per_image"] for r in rows], [r["quality"] for r in rows]))
    return [{**r, "on_front": i in front} for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def write_table(rows: list[dict], csv_path: str, json_path: str, extra: dict | None = None) -> None:
    """The rows as CSV (union of their keys, first-seen order) and as JSON {rows, front, **extra}."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths.write_committed_text(csv_path, buf.getvalue())
    front = [r["id"] for r in sorted((r for r in rows if r.get("on_front")),
                                     key=lambda r: (r["flops_per_image"], r["quality"]))]
    paths.write_committed_json(json_path, {**(extra or {}), "rows": rows, "front": front})


def markdown_table(rows: list[dict], metric: str) -> str:
    """The front (and only the front) as a Markdown table, by increasing cost, for READMEs and notes."""
    front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r["flops_per_image"])
    lines = [f"| setting | GFLOP/image | {metric} | images/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['label']} | {r['flops_per_image'] / 1e9:.3f} | {r['quality']:.2f} | "
              f"{r['images_per_s']:.1f} |" for r in front]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The plot
# ----------------------------------------------------------------------------------------------
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round linear tick values covering [lo, hi]."""
    span = max(hi - lo, 1e-12)
    raw = span / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.floor(lo / step) * step
    return [first + k * step for k in range(int(math.ceil((hi - first) / step)) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks in [lo, hi] (log axis); fewer when the range spans many decades."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** e for e in decades for m in mantissas if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 4:
            break
    return ticks or [lo, hi]


def _flops_text(v: float) -> str:
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"


def plot_frontier(rows: list[dict], path: str, *, metric: str, title: str = "",
                  size: tuple[int, int] = (960, 620)) -> str:
    """Quality vs FLOPs per image (log x) as a PNG; `rows` as from `mark_front` (an optional
    `quality_err` draws an error bar). Returns the path."""
    pts = [r for r in rows if np.isfinite(r["flops_per_image"]) and np.isfinite(r["quality"])]
    if not pts:
        raise ValueError("plot_frontier: no finite (flops, quality) points to plot")
    w, h = size
    left, right, top, bottom = 90, 200, 50, 70
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)

    fx = np.array([r["flops_per_image"] for r in pts])
    qy = np.array([r["quality"] for r in pts])
    x_lo, x_hi = fx.min() / 1.25, fx.max() * 1.25
    ey = np.array([r.get("quality_err") or 0.0 for r in pts], np.float64)
    ey = np.where(np.isfinite(ey), ey, 0.0)
    lo_q, hi_q = (qy - ey).min(), (qy + ey).max()
    y_ticks = _nice_ticks(lo_q - 0.05 * (hi_q - lo_q) - 1e-9, hi_q + 0.05 * (hi_q - lo_q) + 1e-9)
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def px(x):
        return left + (math.log(x) - math.log(x_lo)) / (math.log(x_hi) - math.log(x_lo)) * (w - left - right)

    def py(y):
        return h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom)

    # Grid, ticks and axes.
    for v in _log_ticks(x_lo, x_hi):
        x = px(v)
        d.line([x, top, x, h - bottom], fill=(225, 225, 225))
        d.text((x, h - bottom + 6), _flops_text(v), fill="black", font=small, anchor="mt")
    for v in y_ticks:
        y = py(v)
        d.line([left, y, w - right, y], fill=(225, 225, 225))
        d.text((left - 6, y), f"{v:g}", fill="black", font=small, anchor="rm")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text(((left + w - right) / 2, h - 22), "model FLOPs per image (log scale)", fill="black",
           font=font, anchor="mm")
    ylabel = f"{metric} (lower is better)"
    tw = int(d.textlength(ylabel, font=font)) + 4
    label_img = Image.new("RGB", (tw, 20), "white")
    ImageDraw.Draw(label_img).text((2, 2), ylabel, fill="black", font=font)
    label_img = label_img.rotate(90, expand=True)
    img.paste(label_img, (8, int((top + h - bottom) / 2 - tw / 2)))
    if title:
        d.text(((left + w - right) / 2, 22), title, fill="black", font=font, anchor="mm")

    # The front: a staircase through the non-dominated points (by increasing cost).
    front = sorted((r for r in pts if r.get("on_front")), key=lambda r: r["flops_per_image"])
    for a, b in zip(front, front[1:]):
        d.line([px(a["flops_per_image"]), py(a["quality"]), px(b["flops_per_image"]), py(a["quality"]),
                px(b["flops_per_image"]), py(b["quality"])], fill=FRONT_COLOR, width=2)

    # Error bars (rows with `quality_err`: a spread over seeds or samples), then one marker per setting.
    for r in pts:
        err = r.get("quality_err")
        if err and np.isfinite(err):
            x = px(r["flops_per_image"])
            d.line([x, py(r["quality"] - err), x, py(r["quality"] + err)], fill=(120, 120, 120), width=1)
    for r in pts:
        shape, color = FAMILY_STYLE.get(r["family"], ("circle", (90, 90, 90)))
        x, y, s = px(r["flops_per_image"]), py(r["quality"]), 5
        box = [x - s, y - s, x + s, y + s]
        outline = FRONT_COLOR if r.get("on_front") else "black"
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=color, outline=outline,
                                                         width=2 if r.get("on_front") else 1)
    for r in front:
        d.text((px(r["flops_per_image"]) + 7, py(r["quality"]) - 7), r["label"], fill=FRONT_COLOR,
               font=small, anchor="lb")

    # Legend.
    lx, ly = w - right + 16, top + 8
    families = [f for f in FAMILY_STYLE if any(r["family"] == f for r in pts)]
    for fam in families:
        shape, color = FAMILY_STYLE[fam]
        box = [lx, ly, lx + 10, ly + 10]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=color, outline="black")
        d.text((lx + 18, ly + 5), "MSF (base + residual)" if fam == "msf" else "DiT (one stage)",
               fill="black", font=small, anchor="lm")
        ly += 22
    d.line([lx, ly + 5, lx + 10, ly + 5], fill=FRONT_COLOR, width=2)
    d.text((lx + 18, ly + 5), "Pareto front", fill="black", font=small, anchor="lm")

    with paths.committed(path) as tmp:
        img.save(tmp, format="PNG")
    return path
