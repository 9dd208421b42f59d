"""The demo's HTML page: the subject photos, the validation grids, the generated images and the loss curve.

One self-contained file next to its images (relative links), so the output folder can be opened or copied as it
is. The loss curve is inline SVG drawn here: no plotting library needed.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td { padding: 2px 12px 2px 0; vertical-align: top; }
td:first-child { color: #666; white-space: nowrap; } code { font-size: 0.95em; }
.images { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #555; max-width: 256px; }
figure img { width: 256px; image-rendering: pixelated; border: 1px solid #ccc; }
.note { background: #fff7e0; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
"""


def loss_curve_svg(points: Sequence[tuple[int, float]], width: int = 640, height: int = 260) -> str:
    """The loss over the training steps as an SVG line chart with labelled axes."""
    if not points:
        return "<p>No progress events were recorded.</p>"
    left, right, top, bottom = 60, 16, 12, 40
    last_step = max(s for s, _ in points)  # the x axis starts at step 0, whenever the first event came
    losses = [v for _, v in points]
    y0, y1 = min(losses), max(losses)
    pad = (y1 - y0) * 0.1 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(step: float) -> float:
        return left + step / (last_step or 1) * plot_w

    def y(loss: float) -> float:
        return top + (y1 - loss) / (y1 - y0) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="training loss by step" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>',
    ]
    for i in range(5):  # horizontal grid lines with their loss values
        value = y0 + (y1 - y0) * i / 4
        level = f"{y(value):.1f}"
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{level}" y2="{level}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
    for step in sorted({0, last_step // 2, last_step}):
        parts.append(f'<text x="{x(step):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{step}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">step</text>')
    parts.append(
        f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
        'text-anchor="middle">loss</text>'
    )
    coordinates = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    parts.append(f'<polyline points="{coordinates}" fill="none" stroke="#1f6fd1" stroke-width="2"/>')
    parts.extend(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="#1f6fd1"/>' for s, v in points)
    parts.append("</svg>")
    return "\n".join(parts)


def write_page(
    out_dir: Path,
    *,
    title: str,
    note: str,
    facts: Sequence[tuple[str, str]],
    galleries: Sequence[tuple[str, Sequence[tuple[Path, str]]]],
    loss_points: Sequence[tuple[int, float]],
) -> Path:
    """Writes out_dir/index.html. `facts`: (name, value) rows; `galleries`: (heading, [(image, caption)])."""
    page = out_dir / "index.html"
    rows = "\n".join(f"<tr><td>{_e(name)}</td><td><code>{_e(value)}</code></td></tr>" for name, value in facts)
    sections = [f"<h2>Loss</h2>\n{loss_curve_svg(loss_points)}"]
    for heading, images in galleries:
        figures = "\n".join(
            f'<figure><img src="{_e(_relative(path, out_dir))}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
            for path, caption in images
        )
        sections.append(f'<h2>{_e(heading)}</h2>\n<div class="images">\n{figures or "<p>none</p>"}\n</div>')
    body = "\n".join(sections)
    page.write_text(
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n"
        + (f'<p class="note">{_e(note)}</p>\n' if note else "")
        + f"<table>\n{rows}\n</table>\n{body}\n</body>\n</html>\n"
    )
    return page


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
