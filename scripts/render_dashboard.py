#!/usr/bin/env python3
"""Draws the chart's Grafana dashboard as an SVG from a Prometheus scrape, for the docs.

    scripts/render_dashboard.py DASHBOARD.json SCRAPE.txt OUT.svg

Panels are placed as Grafana places them (24 columns, `gridPos`). Each panel shows the series its first
query selects in the scrape: for an instant selector (optionally compared with `== 1`, or subtracted
from `time()`), one row per series with the labels that tell the series apart and the value; rates,
histograms and sums over time cannot be taken from one scrape and are marked so. This is a picture of
the layout and of what the metrics hold, not Grafana's rendering.
"""

import html
import json
import re
import sys
import time

COLUMN = 46
ROW = 28
PAD = 8


def parse_scrape(text):
    series = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)', line)
        if not m:
            continue
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        series.append((m.group(1), labels, value))
    return series


def human(value, unit):
    if unit == "s":
        for size, name in ((86400, "d"), (3600, "h"), (60, "min")):
            if abs(value) >= size:
                return f"{value / size:.1f} {name}"
        return f"{value:.0f} s"
    if unit == "bytes":
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.1f} {name}"
        return f"{value:.0f} B"
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.2f}"


def rows_for(expr, series, now):
    """(label text, value) rows for a simple query; None when one scrape cannot answer it."""
    if re.search(r"\b(rate|increase|histogram_quantile|irate|delta)\s*\(", expr):
        return None
    m = re.search(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr) or re.search(r"([a-zA-Z_:][a-zA-Z0-9_:]+)", expr)
    if not m:
        return None
    name = m.group(1)
    picked = [(labels, value) for (n, labels, value) in series if n == name]
    if "== 1" in expr:
        picked = [(l, v) for (l, v) in picked if v == 1]
    age = re.match(r"^\(?\s*time\(\)\s*-", expr.strip()) is not None
    ratio = re.search(r"/\s*on\s*\([^)]*\)\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", expr)
    if age and ratio:
        limits = {
            (l.get("namespace"), l.get("export")): v for (n, l, v) in series if n == ratio.group(1)
        }
        out = []
        for labels, value in picked:
            limit = limits.get((labels.get("namespace"), labels.get("export")))
            if limit:
                out.append((labels.get("export", name), (now - value) / limit))
        return out
    if expr.strip().startswith("sum("):
        return [("total", sum(v for _, v in picked))]
    out = []
    for labels, value in picked:
        shown = {k: v for k, v in labels.items() if k not in ("namespace",)}
        text = " ".join(f"{v}" for k, v in sorted(shown.items())) or name
        out.append((text, now - value if age else value))
    return out


def unit_of(panel):
    unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit", "")
    return {"s": "s", "dtdurations": "s", "bytes": "bytes", "decbytes": "bytes"}.get(unit, "")


def render(dashboard, series, now):
    panels = dashboard["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width, height = 24 * COLUMN + 2 * PAD, bottom * ROW + 2 * PAD + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="Inter, Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#111217"/>',
        f'<text x="{PAD}" y="{PAD + 18}" fill="#d8d9da" font-size="16">{html.escape(dashboard.get("title", ""))}'
        " — namespace: All, export: All (drawn from a test scrape)</text>",
    ]
    for p in panels:
        g = p["gridPos"]
        x, y = PAD + g["x"] * COLUMN, PAD + 40 + g["y"] * ROW
        w, h = g["w"] * COLUMN - 4, g["h"] * ROW - 4
        title = html.escape(p.get("title", ""))
        if p.get("type") == "row":
            out.append(f'<text x="{x}" y="{y + 18}" fill="#d8d9da" font-size="14" font-weight="bold">{title}</text>')
            continue
        out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="#181b1f" stroke="#2c3235"/>')
        out.append(f'<text x="{x + 8}" y="{y + 18}" fill="#ccccdc" font-weight="bold">{title}</text>')
        out.append(
            f'<text x="{x + w - 8}" y="{y + 18}" fill="#6e7177" text-anchor="end" font-size="10">{html.escape(p.get("type", ""))}</text>'
        )
        targets = p.get("targets") or []
        rows = rows_for(targets[0].get("expr", ""), series, now) if targets else None
        if rows:
            rows.sort()
        if rows is None:
            out.append(
                f'<text x="{x + 8}" y="{y + 42}" fill="#8e8e8e" font-style="italic">over time: '
                f"{html.escape(targets[0].get('expr', '')[:70]) if targets else ''}</text>"
            )
            continue
        unit = unit_of(p)
        line_y = y + 42
        for text, value in rows[: max(1, (h - 40) // 18)]:
            out.append(f'<text x="{x + 8}" y="{line_y}" fill="#d8d9da">{html.escape(text[:60])}</text>')
            out.append(
                f'<text x="{x + w - 8}" y="{line_y}" fill="#73bf69" text-anchor="end" font-weight="bold">{html.escape(human(value, unit))}</text>'
            )
            line_y += 18
        if not rows:
            out.append(f'<text x="{x + 8}" y="{line_y}" fill="#8e8e8e">no series</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    dashboard_path, scrape_path, out_path = sys.argv[1:4]
    dashboard = json.load(open(dashboard_path))
    series = parse_scrape(open(scrape_path).read())
    stamps = [v for (n, _, v) in series if n.endswith("_timestamp_seconds")]
    now = max(stamps) + 3600 if stamps else time.time()
    open(out_path, "w").write(render(dashboard, series, now))


if __name__ == "__main__":
    main()
