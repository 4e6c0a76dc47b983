"""`chatvla inspect FILE [--plot out.png] [--html out.html] [--video out.mp4] [--json]`: what happened in a
recorded episode.

Meant for the first look after a run on a robot PC: it reads crashed (truncated) files too, saying so,
and imports matplotlib only when a plot is asked for and imageio-ffmpeg only when a video is. The viewer
(--html, --video) is chatvla.client.viewer; stalled and safety-clamped ticks are counted by
chatvla.client.tick_counts, the definitions `chatvla demo` prints too.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from chatvla.client.recording import Episode, EpisodeFormatError, read_episode
from chatvla.client.tick_counts import STALLED, count_ticks, tick_statuses

REASONING_SAMPLES = 3
REASONING_CHARS = 160


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="summarise and plot a recorded episode file")
    p.add_argument("file", type=Path, help="episode file written by chatvla record")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write a plot of the executed actions per joint")
    p.add_argument("--html", type=Path, metavar="HTML",
                   help="write a self-contained viewer page: tick slider, every camera, per-joint plots, reasoning")
    p.add_argument("--video", type=Path, metavar="MP4",
                   help="write a video: every camera per tick with action vs state, reasoning and stall/safety "
                   "marks (needs the video extra)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    return p


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(ep: Episode) -> dict[str, Any]:
    """Everything the text report shows, as plain data (the --json output)."""
    h, recs = ep.header, ep.records
    p = h.profile
    ticks = [r.tick for r in recs]
    times = [r.timestamp for r in recs]
    duration = (times[-1] - times[0]) if len(times) > 1 else 0.0
    chunks = [(r.tick, r.chunk) for r in recs if r.chunk is not None]
    lags = [float(t - c.tick) for t, c in chunks]
    interventions: dict[str, int] = {}
    for r in recs:
        for name in r.interventions:
            interventions[name] = interventions.get(name, 0) + 1
    stages: dict[str, list[float]] = {}
    for _, c in chunks:
        for k, v in c.timings.items():
            stages.setdefault(k, []).append(v)
    counts = count_ticks([r.stall for r in recs], [r.interventions for r in recs])
    reasoning = [(t, c.seq, c.reasoning) for t, c in chunks if c.reasoning.strip()]
    with_text = len(reasoning)
    if len(reasoning) > REASONING_SAMPLES:  # first, middle, last: how the story went
        idx = np.linspace(0, len(reasoning) - 1, REASONING_SAMPLES).round().astype(int)
        reasoning = [reasoning[i] for i in idx]
    acts = (
        np.stack([r.action for r in recs if r.action is not None]) if any(r.action is not None for r in recs) else None
    )
    ranges = []
    for i, name in enumerate(p.action_names):
        lo, hi = p.action_lower[i], p.action_upper[i]
        entry: dict[str, Any] = {"name": name, "limit_lower": lo, "limit_upper": hi}
        if acts is not None:
            col = acts[:, i].astype(np.float64)
            entry.update(min=float(col.min()), max=float(col.max()), mean=float(col.mean()))
        ranges.append(entry)
    return {
        "file": None,
        "format_version": h.version,
        "created_utc": datetime.fromtimestamp(h.created_unix, timezone.utc).isoformat(timespec="seconds"),
        "software": dict(h.software),
        "closed_cleanly": ep.footer is not None,
        "truncated_bytes": ep.truncated_bytes,
        "outcome": dict(ep.footer.outcome) if ep.footer else None,
        "profile": {
            "name": p.name,
            "action_space": p.action_space,
            "action_dim": p.action_dim,
            "state_dim": p.state_dim,
            "chunk_size": p.chunk_size,
            "control_rate_hz": p.control_rate_hz,
        },
        "cameras": list(h.cameras),
        "image_encoding": h.image_encoding,
        "instruction": h.instruction,
        "task": dict(h.task),
        "ticks": len(recs),
        "first_tick": ticks[0] if ticks else None,
        "last_tick": ticks[-1] if ticks else None,
        "missing_ticks": (ticks[-1] - ticks[0] + 1 - len(ticks)) if ticks else 0,
        "duration_s": duration,
        "achieved_rate_hz": (len(recs) - 1) / duration if duration > 0 else None,
        "chunks_received": len(chunks),
        "chunk_lag_ticks_p50": _percentile(lags, 50),
        "chunk_lag_ticks_max": max(lags) if lags else None,
        "server_ms_mean": {k: float(np.mean(v)) for k, v in sorted(stages.items())},
        "stall_ticks": counts.stalled_ticks,
        "startup_ticks": counts.startup_ticks,
        "safety_clamped_ticks": counts.safety_clamped_ticks,
        "held_without_action": sum(r.action is None for r in recs),
        "interventions": dict(sorted(interventions.items())),
        "chunks_with_reasoning": with_text,
        "reasoning_samples": [{"tick": t, "seq": s, "text": txt} for t, s, txt in reasoning],
        "action_ranges": ranges,
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(s: dict[str, Any]) -> str:
    pr = s["profile"]
    status = "closed cleanly" if s["closed_cleanly"] else "NOT closed (writer crashed or still running)"
    if s["truncated_bytes"]:
        status += f"; truncated tail of {s['truncated_bytes']} bytes ignored"
    lines = [
        f"episode      {s['file']}  (format v{s['format_version']}, {status})",
        f"created      {s['created_utc']}  chatvla {s['software'].get('chatvla', '?')}",
        f"profile      {pr['name']}: {pr['action_space']}, action {pr['action_dim']}, state {pr['state_dim']}, "
        f"chunk {pr['chunk_size']}, {pr['control_rate_hz']:g} Hz",
        f"cameras      {', '.join(s['cameras']) or '-'} ({s['image_encoding']})",
        f"instruction  {s['instruction']!r}",
        f"task         {json.dumps(s['task'], sort_keys=True) if s['task'] else '-'}",
        f"outcome      {json.dumps(s['outcome'], sort_keys=True) if s['outcome'] else '-'}",
        f"ticks        {s['ticks']} (tick {s['first_tick']}..{s['last_tick']}, {s['missing_ticks']} missing), "
        f"{s['duration_s']:.2f} s, achieved {_fmt(s['achieved_rate_hz'], '.1f')} Hz",
        f"chunks       {s['chunks_received']} received, arrival lag p50 {_fmt(s['chunk_lag_ticks_p50'], '.1f')} / "
        f"max {_fmt(s['chunk_lag_ticks_max'], '.0f')} ticks",
    ]
    if s["server_ms_mean"]:
        lines.append("server ms    " + ", ".join(f"{k} {v:.1f}" for k, v in s["server_ms_mean"].items()) + " (mean)")
    pct = 100.0 * s["stall_ticks"] / s["ticks"] if s["ticks"] else 0.0
    lines.append(f"stalls       {s['stall_ticks']} stalled ticks ({pct:.1f}%), {s['startup_ticks']} start-up ticks "
                 f"before the first chunk, {s['held_without_action']} held with no action")
    iv = s["interventions"]
    lines.append(f"safety       {s['safety_clamped_ticks']} safety-clamped ticks; "
                 + (", ".join(f"{k} x{v}" for k, v in iv.items()) if iv else "no interventions"))
    n_text = s["chunks_with_reasoning"]
    lines.append("reasoning    " + (f"{n_text} chunks carry text; samples:" if n_text else "-"))
    for r in s["reasoning_samples"]:
        text = " ".join(r["text"].split())
        if len(text) > REASONING_CHARS:
            text = text[: REASONING_CHARS - 3] + "..."
        lines.append(f"  tick {r['tick']} (seq {r['seq']}): {text}")
    lines.append("actions      executed: min / mean / max   [profile limits]")
    width = max(len(r["name"]) for r in s["action_ranges"])
    for r in s["action_ranges"]:
        lines.append(
            f"  {r['name']:<{width}}  {_fmt(r.get('min')):>8} / {_fmt(r.get('mean')):>8} / {_fmt(r.get('max')):>8}"
            f"   [{r['limit_lower']:.3f}, {r['limit_upper']:.3f}]"
        )
    return "\n".join(lines)


def plot_actions(ep: Episode, out: Path) -> None:
    """One panel per action dimension: executed action over ticks, chunk arrivals as faint lines,
    stalled ticks in red and profile limits dashed (when in view), so a hold, a jerk at a chunk
    boundary or a joint riding its limit is visible at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = ep.header.profile
    recs = [r for r in ep.records if r.action is not None]
    dims = p.action_dim
    ncols = 2 if dims > 4 else 1
    nrows = -(-dims // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 1.7 * nrows + 0.8), sharex=True, squeeze=False)
    ticks = np.array([r.tick for r in recs])
    acts = np.stack([r.action for r in recs]) if recs else np.zeros((0, dims))
    arrivals = [r.tick for r in ep.records if r.chunk is not None]
    stalls = {r.tick for r, st in zip(ep.records, tick_statuses(r.stall for r in ep.records)) if st == STALLED}
    for i in range(nrows * ncols):
        ax = axes[i // ncols][i % ncols]
        if i >= dims:
            ax.axis("off")
            continue
        for t in arrivals:
            ax.axvline(t, color="0.85", lw=0.6, zorder=0)
        ax.plot(ticks, acts[:, i], lw=1.2, color="C0")
        st = np.array([k for k, t in enumerate(ticks) if t in stalls], dtype=int)
        if st.size:
            ax.plot(ticks[st], acts[st, i], "o", ms=2.5, color="C3", label="stall")
        ax.axhline(p.action_lower[i], ls="--", lw=0.7, color="0.5")
        ax.axhline(p.action_upper[i], ls="--", lw=0.7, color="0.5")
        if len(acts):  # zoom on the motion; a limit line shows only when the motion comes near it
            lo, hi = float(acts[:, i].min()), float(acts[:, i].max())
            pad = max(0.15 * (hi - lo), 0.02 * (p.action_upper[i] - p.action_lower[i]))
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(p.action_names[i], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("tick", fontsize=8)
    if stalls:
        axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{p.name}: executed actions ({len(recs)} ticks, {len(arrivals)} chunks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    try:
        ep = read_episode(args.file, allow_truncated=True)
    except FileNotFoundError:
        print(f"error: {args.file}: no such file", file=sys.stderr)
        return 1
    except EpisodeFormatError as e:
        print(f"error: {args.file}: {e}", file=sys.stderr)
        return 1
    if args.video:
        from chatvla.client.viewer.video import require_encoder

        require_encoder()  # a missing extra ends here with the install hint, before any work
    summary = summarize(ep)
    summary["file"] = str(args.file)
    outputs: list[tuple[str, str]] = []
    if args.plot:
        plot_actions(ep, args.plot)
        summary["plot"] = str(args.plot)
        outputs.append(("plot", str(args.plot)))
    if args.html or args.video:
        outputs += write_viewers(ep, html=args.html, video=args.video, title=args.file.name)
        summary.update({k: v for k, v in outputs if k in ("html", "video")})
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(format_summary(summary))
        for kind, where in outputs:
            print(f"{kind:<12} {where}")
    return 0


def write_viewers(ep: Episode, *, html: Path | None = None, video: Path | None = None,
                  title: str = "") -> list[tuple[str, str]]:
    """Write the HTML and/or video viewer of `ep`; returns (kind, path) of each file written, for the
    report. Shared with `chatvla demo`, which writes both next to every episode it records."""
    from chatvla.client.viewer import build_view, write_html, write_video

    view = build_view(ep)
    out: list[tuple[str, str]] = []
    if html is not None:
        write_html(view, html, title=title)
        out.append(("html", str(html)))
    if video is not None:
        write_video(view, video)
        out.append(("video", str(video)))
    return out
