"""What the server can honestly say about the model it serves: trained or not, and its measured figures.

An operator at the debug page (or any `/v1/model` reader) must not mistake a seeded test preset for a
trained policy, nor a trained one for a solved task. The facts come from the model's own files, never
from the server or the page:

- a seeded preset (`tiny`, ...) is built from a seed: untrained, known without reading anything;
- a checkpoint directory (a shipped one, e.g. `chatvla-tiny-mm`, or a path) may hold `model_card.json`
  (`trained`, a one-line `summary`, and `eval`: the `meta`/`summary` sections of the `eval.json` that
  `chatvla eval` writes); without one, `train_log.json` (written by `chatvla train` into its output,
  which is the checkpoint) says it was trained and `eval.json` gives the figures;
- anything else is "unknown", said as such.

Reading never fails the server: a broken or oversized file makes the card say why it is unknown.
This module stays torch-free; the preset tables are imported only for engines that load a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CARD_FILE = "model_card.json"
TRAIN_LOG_FILE = "train_log.json"
EVAL_FILE = "eval.json"
# eval.json holds every episode (~70 KB for 150); anything far larger is not a file we wrote.
_MAX_FILE_BYTES = 4 << 20
_MAX_TEXT = 300
_MAX_FIGURES = 24


def _text(value: Any) -> str:
    s = str(value) if value is not None else ""
    return s if len(s) <= _MAX_TEXT else s[: _MAX_TEXT - 1] + "…"


def _card(trained: bool | None, basis: str, summary: str, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"trained": trained, "basis": _text(basis), "summary": _text(summary), "eval": evaluation}


def eval_figures(doc: Any) -> dict[str, Any] | None:
    """The counted figures of an `eval.json`-shaped document (`{"meta": ..., "summary": {set: {metric:
    {"k", "n", "rate", "ci95"}}}}`) as a flat, bounded list the page can show without knowing the
    metric names. None if it holds no counted figure."""
    if not isinstance(doc, dict) or not isinstance(doc.get("summary"), dict):
        return None
    figures: list[dict[str, Any]] = []
    for set_name, metrics in doc["summary"].items():
        if not isinstance(metrics, dict):
            continue
        for metric, v in metrics.items():
            if not (isinstance(v, dict) and isinstance(v.get("k"), int) and isinstance(v.get("n"), int)):
                continue
            if v["n"] <= 0 or not 0 <= v["k"] <= v["n"]:
                continue
            fig: dict[str, Any] = {"set": _text(set_name), "metric": _text(metric), "k": v["k"], "n": v["n"],
                                   "rate": v["k"] / v["n"]}
            ci = v.get("ci95")
            if (isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci)
                    and all(math.isfinite(x) for x in ci)):
                fig["ci95"] = [float(ci[0]), float(ci[1])]
            figures.append(fig)
            if len(figures) >= _MAX_FIGURES:
                break
        if len(figures) >= _MAX_FIGURES:
            break
    if not figures:
        return None
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    return {"description": _text(meta.get("description", "")), "command": _text(meta.get("command", "")),
            "figures": figures}


def _read_json(path: Path) -> Any:
    if path.stat().st_size > _MAX_FILE_BYTES:
        raise ValueError(f"{path.name} is larger than {_MAX_FILE_BYTES} bytes")
    return json.loads(path.read_text(encoding="utf-8"))


def card_from_directory(directory: Path, model_id: str) -> dict[str, Any]:
    """The card of a checkpoint directory, from its own files (see the module docstring)."""
    card_path = directory / CARD_FILE
    try:
        if card_path.is_file():
            doc = _read_json(card_path)
            if not isinstance(doc, dict) or not isinstance(doc.get("trained"), bool):
                return _card(None, f"{CARD_FILE} has no true/false `trained`", "training status unknown")
            named = doc.get("model_id")
            if isinstance(named, str) and named and model_id and named != model_id:
                return _card(None, f"{CARD_FILE} describes {named!r}, not {model_id!r}", "training status unknown")
            return _card(doc["trained"], CARD_FILE, doc.get("summary", ""), eval_figures(doc.get("eval")))
        if (directory / TRAIN_LOG_FILE).is_file():
            evaluation = eval_figures(_read_json(directory / EVAL_FILE)) if (directory / EVAL_FILE).is_file() else None
            return _card(True, TRAIN_LOG_FILE, "trained with `chatvla train` (no model card written)", evaluation)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _card(None, f"model card unreadable: {type(e).__name__}", "training status unknown")
    return _card(None, f"no {CARD_FILE} or {TRAIN_LOG_FILE} in the checkpoint", "training status unknown")


def model_card(model: str, engine: str, model_id: str = "") -> dict[str, Any]:
    """The card for `chatvla serve --model MODEL --engine ENGINE`. Never raises."""
    if engine == "null":
        return _card(False, "null engine", "no model: the null engine returns deterministic fake reasoning and "
                     "actions (for transport tests)")
    try:
        from chatvla.model.presets import PRESETS, SEEDED_PRESETS, SHIPPED
    except ImportError:  # an engine without the model package: say nothing we cannot back
        PRESETS, SEEDED_PRESETS, SHIPPED = {}, (), {}
    if model in SHIPPED:
        return card_from_directory(Path(SHIPPED[model]), model_id)
    if model in SEEDED_PRESETS:
        return _card(False, "seeded preset", f"{model}: random weights drawn from a seed (for tests); it solves no "
                     "task")
    if model in PRESETS:
        return _card(None, "preset configuration", "training status unknown")
    try:
        if Path(model).is_dir():
            return card_from_directory(Path(model), model_id)
    except OSError:
        pass
    return _card(None, "not a checkpoint directory", "training status unknown")
