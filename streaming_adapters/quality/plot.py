"""The per-layer error plot as a standalone SVG (no plotting package: matplotlib is not a dependency).

Two panels over the decoder layers: relative L2 norm of the hidden-state error (log scale: it grows by
orders of magnitude through a quantized model) and 1 - cosine (log scale).  Opens in any browser.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

W, H, PAD = 640, 220, 56  # one panel: 640 x 220 px, 56 px for the axis labels


def _panel(y0: int, values: list[float], title: str, color: str) -> list[str]:
    vals = [max(v, 1e-12) for v in values]
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    hi = hi if hi > lo else lo + 1
    n = len(vals)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = PAD + (W - 2 * PAD) * (i / max(n - 1, 1))
        y = y0 + H - PAD / 2 - (H - PAD) * (math.log10(v) - lo) / (hi - lo)
        return x, y

    out = [f'<text x="{W / 2}" y="{y0 + 16}" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<rect x="{PAD}" y="{y0 + PAD / 2}" width="{W - 2 * PAD}" height="{H - PAD}" fill="none" stroke="#888"/>']
    for e in range(lo, hi + 1):
        _, y = xy(0, 10.0 ** e)
        out.append(f'<line x1="{PAD}" x2="{W - PAD}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{PAD - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">1e{e}</text>')
    for i in range(n):
        x, _ = xy(i, vals[i])
        out.append(f'<text x="{x:.1f}" y="{y0 + H - 8}" text-anchor="middle" font-size="10">{i}</text>')
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(vals)))
    out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
    out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in (xy(i, v) for i, v in enumerate(vals))]
    return out


def write_svg(path: str | Path, layers: list[dict], title: str) -> Path:
    """``layers``: the report's per-layer entries (``rel_l2``, ``cosine``)."""
    body = _panel(0, [r["rel_l2"] for r in layers], f"{title}: relative L2 error of the hidden state after each "
                  "layer", "#c0392b")
    body += _panel(H + 10, [1.0 - r["cosine"] for r in layers], "1 - cosine (mean over tokens); x: decoder layer",
                   "#2471a3")
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{2 * H + 10}" font-family="sans-serif">'
           f'<rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>\n")
    p = Path(path)
    p.write_text(svg)
    return p
