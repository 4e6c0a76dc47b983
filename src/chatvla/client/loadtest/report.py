"""The HTML load-test report: one self-contained file (inline SVG, no scripts, no network, no matplotlib),
so it opens anywhere and can be attached to a ticket as it is.

Charts: client round-trip and server-total latency CDFs, round trip over time (points plus per-second
p50/p99), server batch sizes over time and their distribution (from the scraped `/metrics`). Counts
are shown as integers and breakdowns (errors by kind, rejections by reason, queue depths) as small
tables, because a reader scans a report, not a Python dict.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

W, H = 720, 300
ML, MR, MT, MB = 64, 16, 16, 44  # margins
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd")
# One colour per server stage, shared by its line and its histogram so a reader can pair them. The two
# batch lines often coincide (every reasoning batch goes on to the expert whole), so they also differ in
# style: reasoning a wide translucent band, expert a thin dashed line drawn on top of it.
STAGE_STYLE: dict[str, dict[str, Any]] = {
    "reasoning": {"color": COLORS[2], "width": 5.0, "opacity": 0.45, "dash": ""},
    "expert": {"color": COLORS[3], "width": 1.8, "opacity": 1.0, "dash": "6 4"},
}


def _nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _ticks(vmax: float, n: int = 5) -> list[float]:
    return [vmax * i / n for i in range(n + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"


class _Plot:
    def __init__(self, xmax: float, ymax: float, xlabel: str, ylabel: str) -> None:
        self.xmax, self.ymax = _nice_max(xmax), _nice_max(ymax)
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, str]] = []  # label, colour, SVG style of the line sample ("" = box)
        self.xlabel, self.ylabel = xlabel, ylabel

    def x(self, v: float) -> float:
        return ML + (W - ML - MR) * min(max(v, 0.0), self.xmax) / self.xmax

    def y(self, v: float) -> float:
        return H - MB - (H - MT - MB) * min(max(v, 0.0), self.ymax) / self.ymax

    def line(self, xs: Sequence[float | None], ys: Sequence[float | None], color: str, label: str,
             step: bool = False, width: float = 1.8, opacity: float = 1.0, dash: str = "") -> None:
        pts, segs = [], []
        for x, y in zip(xs, ys):
            if x is None or y is None:
                if pts:
                    segs.append(pts)
                pts = []
                continue
            if step and pts:
                pts.append(f"{self.x(x):.1f},{pts[-1].split(',')[1]}")
            pts.append(f"{self.x(x):.1f},{self.y(y):.1f}")
        if pts:
            segs.append(pts)
        style = f'stroke="{color}" stroke-width="{width:g}"'
        if opacity < 1.0:
            style += f' stroke-opacity="{opacity:g}"'
        if dash:
            style += f' stroke-dasharray="{dash}"'
        for seg in segs:
            self.parts.append(f'<polyline fill="none" {style} points="{" ".join(seg)}"/>')
        self.legend.append((label, color, style))

    def points(self, xs: Sequence[float], ys: Sequence[float], color: str, label: str) -> None:
        self.parts += [f'<circle cx="{self.x(x):.1f}" cy="{self.y(y):.1f}" r="1.4" fill="{color}" '
                       f'fill-opacity="0.35"/>' for x, y in zip(xs, ys)]
        self.legend.append((label, color, ""))

    def bars(self, labels: Sequence[str], values: Sequence[float], color: str) -> None:
        n = max(1, len(values))
        bw = (W - ML - MR) / n
        for i, (lab, v) in enumerate(zip(labels, values)):
            x0 = ML + i * bw + bw * 0.15
            y0 = self.y(v)
            self.parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{bw * 0.7:.1f}" '
                              f'height="{H - MB - y0:.1f}" fill="{color}"/>')
            self.parts.append(f'<text x="{x0 + bw * 0.35:.1f}" y="{H - MB + 14}" text-anchor="middle" '
                              f'font-size="11">{html.escape(lab)}</text>')

    def svg(self, xaxis: bool = True) -> str:
        g = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
             f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="#fafafa" stroke="#ccc"/>']
        for t in _ticks(self.ymax):
            y = self.y(t)
            g.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            g.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(t)}</text>')
        if xaxis:
            for t in _ticks(self.xmax):
                x = self.x(t)
                g.append(f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle" font-size="11">{_fmt(t)}</text>')
        g.append(f'<text x="{(ML + W - MR) / 2}" y="{H - 8}" text-anchor="middle" font-size="12">'
                 f'{html.escape(self.xlabel)}</text>')
        g.append(f'<text transform="translate(14,{(MT + H - MB) / 2}) rotate(-90)" text-anchor="middle" '
                 f'font-size="12">{html.escape(self.ylabel)}</text>')
        g += self.parts
        for i, (label, color, style) in enumerate(self.legend):
            y = MT + 14 + 16 * i
            if style:  # a line: show its width and dashes, not just its colour
                g.append(f'<line x1="{W - MR - 196}" x2="{W - MR - 180}" y1="{y - 4}" y2="{y - 4}" {style}/>')
            else:
                g.append(f'<rect x="{W - MR - 190}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
            g.append(f'<text x="{W - MR - 175}" y="{y}" font-size="11">{html.escape(label)}</text>')
        g.append("</svg>")
        return "\n".join(g)


def _cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    n = len(xs)
    if n > 2000:  # keep the file small: 2000 quantiles are plenty for a curve
        xs = [xs[int(i * (n - 1) / 1999)] for i in range(2000)]
    m = len(xs)
    return xs, [(i + 1) / m for i in range(m)]


def _latency_cdf(report: dict[str, Any]) -> str:
    pts = report["timeline"]["points"]
    rtt = [p[1] for p in pts]
    srv = [p[2] for p in pts]
    if not rtt:
        return "<p>No chunks were received.</p>"
    p99 = report["latency_ms"]["client_rtt_ms"]["p99"] or max(rtt)
    plot = _Plot(p99 * 1.25, 1.0, "latency (ms)", "fraction of chunks")
    for vals, color, label in ((rtt, COLORS[0], "client round trip"), (srv, COLORS[1], "server total")):
        xs, ys = _cdf(vals)
        plot.line(xs, ys, color, label)
    return plot.svg()


def _latency_time(report: dict[str, Any]) -> str:
    tl = report["timeline"]
    pts = tl["points"]
    if not pts:
        return "<p>No chunks were received.</p>"
    ymax = max([p[1] for p in pts] + [v for v in tl["rtt_p99_ms"] if v is not None])
    plot = _Plot(max(report["wall_s"], 1.0), ymax, "time since start (s)", "client round trip (ms)")
    plot.points([p[0] for p in pts], [p[1] for p in pts], COLORS[0], "chunks")
    centers = [t + 0.5 for t in tl["t_s"]]
    plot.line(centers, tl["rtt_p50_ms"], COLORS[2], "p50 per second")
    plot.line(centers, tl["rtt_p99_ms"], COLORS[1], "p99 per second")
    return plot.svg()


def _batch_time(sm: dict[str, Any], wall_s: float) -> str:
    series = {s: sm.get(f"batch_{s}", {}).get("series", []) for s in ("reasoning", "expert")}
    if not any(series.values()):
        return "<p>No batches were observed in the scraped metrics.</p>"
    ymax = max(m for ser in series.values() for _, m, _ in ser)
    plot = _Plot(max(wall_s, 1.0), max(ymax, 1.0), "time since start (s)", "mean batch size per scrape")
    for stage, ser in series.items():
        st = STAGE_STYLE[stage]
        plot.line([t for t, _, _ in ser], [m for _, m, _ in ser], st["color"], f"{stage} stage",
                  width=st["width"], opacity=st["opacity"], dash=st["dash"])
    return plot.svg()


def _batch_hist(sm: dict[str, Any]) -> str:
    hist = sm.get("batch_reasoning", {}).get("histogram") or {}
    if not sum(hist.values()):
        return ""
    labels, prev = [], 0
    for le in hist:  # cumulative-bucket bounds -> size ranges: 1, 2, 3-4, 5-8, ...
        if le == "+Inf":
            labels.append(f">{prev}")
            continue
        hi = int(float(le))
        labels.append(str(hi) if hi == prev + 1 else f"{prev + 1}-{hi}")
        prev = hi
    values = [_count(v) for v in hist.values()]
    plot = _Plot(1.0, max(values), "batch size (reasoning stage)", "batches")
    plot.bars(labels, values, STAGE_STYLE["reasoning"]["color"])  # the colour of the reasoning line above
    return plot.svg(xaxis=False)


class _Html(str):
    """A table cell that is already HTML (a nested table), so `_table` does not escape it."""


def _cell(c: str) -> str:
    return c if isinstance(c, _Html) else html.escape(c)


def _table(rows: list[list[str]], head: list[str] | None = None) -> str:
    """An HTML table; a header row only when there are column names (an empty one is just a grey bar)."""
    th = f"<tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{th}{body}</table>"


def _count(v: float) -> int:
    """Counts arrive as floats from Prometheus samples; a count is shown as the integer it is."""
    return round(v)


def _counts(d: dict[str, float] | None) -> str:
    """A breakdown (errors by kind, rejections by reason, ...) as a two-column table of integer counts."""
    if not d:
        return "none"
    return _Html(_table([[str(k), str(_count(v))] for k, v in sorted(d.items())]))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_html(report: dict[str, Any]) -> str:
    lat, tot, thr = report["latency_ms"], report["totals"], report["throughput"]
    cfg, srv = report["config"], report["server"]
    lat_rows = [[name.replace("_ms", "").replace("_", " "), *(_ms(d[k]) for k in ("p50", "p90", "p99", "max"))]
                for name, d in lat.items()]
    summary = [
        ["server", f"{srv.get('model_id')} ({srv.get('engine')}, profile {srv.get('profile')})"],
        ["target", str(cfg["target"])],
        ["robots", f"{report['robots']['started']} of {cfg['robots']} started, ramp-up {cfg['ramp_up_s']} s"],
        ["duration", f"{report['wall_s']:.1f} s (configured {cfg['duration_s']} s)"],
        ["source", f"{report['source']['kind']}, {report['source']['episodes']} episodes"],
        ["chunks", f"{tot['chunks']} ({thr['chunks_per_s']:.1f}/s overall, {thr['steady_chunks_per_s']:.1f}/s "
                   "after ramp-up)"],
        ["observations sent", f"{tot['observations_sent']} ({thr['observations_per_s']:.1f}/s)"],
        ["stall ticks", f"{tot['stall_ticks']} of {tot['ticks']} ({100 * tot['stall_fraction']:.2f}%)"],
        ["generator late ticks", f"{tot['generator_late_ticks']} (non-zero: the load generator was overloaded)"],
        ["rejections", str(_count(report["rejections"]))],
        ["errors by kind", _counts(report["errors_by_kind"])],
    ]
    sm = report.get("server_metrics") or {}
    if sm.get("batch_reasoning"):
        summary.append(["server batch size (mean)",
                        f"reasoning {_ms(sm['batch_reasoning']['mean'])}, expert {_ms(sm['batch_expert']['mean'])}"])
        summary.append(["server rejected (by reason)", _counts(sm.get("rejected_by_reason"))])
        summary.append(["server max queue depth", _counts(sm.get("queue_depth_max"))])
    sections = [
        "<h2>Latency CDF</h2>", _latency_cdf(report),
        "<h2>Latency over time</h2>", _latency_time(report),
    ]
    if sm.get("snapshots", 0) >= 2:
        sections += ["<h2>Server batch sizes over time</h2>", _batch_time(sm, report["wall_s"]), _batch_hist(sm)]
    else:
        sections += ["<h2>Server batch sizes</h2>",
                     "<p>Server metrics were not scraped (pass <code>--metrics-url http://HOST:PORT/metrics</code>)."
                     "</p>"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>chatvla load test</title>
<style>body{{font-family:sans-serif;max-width:760px;margin:24px auto;color:#222}}
table{{border-collapse:collapse;margin:8px 0}}td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left;
font-size:13px}}th{{background:#f3f3f3}}h2{{font-size:17px;margin-top:28px}}</style></head><body>
<h1>chatvla load test</h1>
{_table(summary)}
<h2>Latency (ms)</h2>
{_table(lat_rows, ["timing", "p50", "p90", "p99", "max"])}
{"".join(sections)}
<p style="font-size:12px;color:#666">Client round trip: observation handed to the policy client until its chunk
arrived. Server stages: the server's own timings carried in each chunk. See docs/operations.md.</p>
</body></html>
"""
