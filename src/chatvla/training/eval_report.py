"""The evaluation report: a filmstrip PNG of a few episodes and a short self-contained HTML page."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

THUMB = 160
MAX_FRAMES = 8


def filmstrip(films: Mapping[str, Sequence[tuple[float, np.ndarray, str, bool]]], path: Path) -> Path | None:
    """One row per episode: front-camera frames every ~1.5 s, captioned with time and reasoning."""
    rows = sorted(films.items())
    if not rows:
        return None
    cols = min(MAX_FRAMES, max(len(f) for _, f in rows))
    cap = 30
    sheet = Image.new("RGB", (cols * THUMB, len(rows) * (THUMB + cap) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, frames) in enumerate(rows):
        y = r * (THUMB + cap)
        ok = frames[0][3] if frames else False
        draw.text((4, y + 2), f"{name}: {'success' if ok else 'fail'}", fill=(0, 110, 0) if ok else (170, 0, 0))
        said = next((r for _, _, r, _ in frames if r), "")
        if said:
            draw.text((110, y + 2), said[:90], fill=(0, 0, 0))
        step = max(1, len(frames) // cols)
        for c, (t, img, _, _) in enumerate(list(frames)[::step][:cols]):
            sheet.paste(Image.fromarray(img).resize((THUMB, THUMB)), (c * THUMB, y + cap))
            draw.text((c * THUMB + 3, y + cap + 3), f"{t:.1f}s", fill=(255, 255, 0))
    sheet.save(path)
    return path


def _pct(r: Mapping[str, Any]) -> str:
    if not r or r.get("rate") is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.0f}% ({r['k']}/{r['n']}; 95% CI {100 * lo:.0f}-{100 * hi:.0f}%)"


MATH_LEGEND = ("reasoning correct = states the right sum and card; place = the card's place within 2 cm; "
               "override mode supplies the text (naming a wrong card), so its reasoning columns are empty.")
TOY_LEGEND = ("reasoning correct = names the right subject, relation and reference; places = the subject's place "
              "and its destination within 2 cm; override mode supplies the text (naming another relation), so "
              "its reasoning columns are empty.")


def _what(o: Mapping[str, Any]) -> str:
    """The episode's task: the board for math matching, "subject relation reference" for toys."""
    if "board" in o:
        return f"{o['board']}={o['answer']}"
    return html.escape(f"{o['subject']} {o['relation']} {o['reference']}")


def _named(o: Mapping[str, Any]) -> Any:
    """What an override episode's text names: a card or a relation."""
    return o.get("override_card", o.get("override_relation"))


def html_report(summary: Mapping[str, Any], meta: Mapping[str, Any], outcomes: Sequence[Mapping[str, Any]],
                film: Path | None, path: Path) -> Path:
    rows = []
    for mode, s in summary.items():
        rows.append(
            f"<tr><td>{mode}</td><td>{s['episodes']}</td><td>{_pct(s['success'])}</td>"
            f"<td>{_pct(s.get('reasoning_correct_first', {}))}</td>"
            f"<td>{_pct(s.get('reasoning_place_within_2cm_first', {}))}</td>"
            f"<td>{s.get('reasoning_correct_all_chunks', '-')}</td>"
            f"<td>{s.get('reasoning_place_within_2cm_all_chunks', '-')}</td>"
            f"<td>{s['seconds_to_success_median'] if s['seconds_to_success_median'] is not None else '-'}</td>"
            f"<td>{_pct(s.get('override_followed', {}))}</td><td>{s['stall_ticks_mean']}</td>"
            f"<td>{s.get('episodes_with_failed_requests', '-')}</td></tr>")
    img = ""
    if film is not None and film.is_file():
        b64 = base64.b64encode(film.read_bytes()).decode()
        img = f'<h2>Filmstrip</h2><img alt="filmstrip" src="data:image/png;base64,{b64}">'
    toy = meta.get("task") == "toy_placement"
    eps = "".join(
        f"<tr><td>{o['mode']}</td><td>{o['seed']}</td><td>{_what(o)}</td>"
        f"<td>{html.escape(o['reasoning_first'])}</td><td>{'yes' if o['success'] else 'no'}</td>"
        f"<td>{'' if _named(o) is None else _named(o)}</td>"
        f"<td>{'' if o['override_followed'] is None else ('yes' if o['override_followed'] else 'no')}</td>"
        f"<td>{html.escape(o['error'])}</td></tr>" for o in outcomes)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>chatvla eval</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px;font-size:13px}}</style></head><body>
<h1>Closed-loop evaluation: {html.escape(str(meta.get('model', '')))}</h1>
<p>{html.escape(str(meta.get('description', '')))}</p>
<p>clock: {html.escape(str(meta.get('clock', 'wall')))}</p>
<p>{TOY_LEGEND if toy else MATH_LEGEND}</p>
<table><tr><th>mode</th><th>episodes</th><th>task success</th><th>reasoning correct (first)</th>
<th>{'places' if toy else 'card place'} right (first)</th><th>reasoning correct (all chunks)</th>
<th>place right (all chunks)</th><th>median s to success</th>
<th>override {'followed' if toy else 'card placed'}</th><th>stall ticks / episode</th>
<th>episodes with failed requests</th></tr>{''.join(rows)}</table>
{img}
<h2>Episodes</h2><table><tr><th>mode</th><th>seed</th><th>{'task' if toy else 'board'}</th><th>first reasoning</th>
<th>success</th><th>override {'relation' if toy else 'card'}</th><th>override {'followed' if toy else 'placed'}</th>
<th>error</th></tr>{eps}</table>
</body></html>"""
    path.write_text(page)
    return path

