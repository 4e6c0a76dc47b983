"""The model card the server serves (chatvla.server.card): trained or not and measured figures, read
from the model's own files, never failing the server."""

from __future__ import annotations

import json
from pathlib import Path

from chatvla.server.card import CARD_FILE, card_from_directory, eval_figures, model_card

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_EVAL = ROOT / "benchmarks" / "results" / "eval_math_matching.json"


def test_the_shipped_model_is_trained_and_its_card_carries_the_published_eval():
    card = model_card("chatvla-tiny-mm", "torch", "chatvla-tiny-mm")
    assert card["trained"] is True and card["basis"] == CARD_FILE
    # The card's figures are those of the eval the model card in docs/model.md cites: re-shipping a model
    # means updating model_card.json with its new eval.json (this fails until then).
    published = json.loads(SHIPPED_EVAL.read_text())
    assert card["eval"]["figures"] == eval_figures(published)["figures"]
    train_success = next(f for f in card["eval"]["figures"] if (f["set"], f["metric"]) == ("train", "success"))
    assert (train_success["k"], train_success["n"]) == (published["summary"]["train"]["success"]["k"],
                                                        published["summary"]["train"]["success"]["n"])


def test_seeded_presets_and_the_null_engine_are_untrained():
    for name in ("tiny", "tiny-sim", "tiny-bimanual"):
        card = model_card(name, "torch", name)
        assert card["trained"] is False and card["eval"] is None, name
    assert model_card("anything", "null")["trained"] is False


def test_a_checkpoint_directory_speaks_through_its_files(tmp_path):
    assert model_card(str(tmp_path), "torch", "m")["trained"] is None  # nothing to go on: unknown
    assert model_card(str(tmp_path / "missing"), "torch", "m")["trained"] is None
    (tmp_path / "train_log.json").write_text("{}")
    card = model_card(str(tmp_path), "torch", "m")
    assert card["trained"] is True and card["eval"] is None
    (tmp_path / "eval.json").write_text(SHIPPED_EVAL.read_text())
    card = model_card(str(tmp_path), "torch", "m")
    assert card["eval"]["figures"] and card["eval"]["description"].startswith("math matching")
    (tmp_path / CARD_FILE).write_text(json.dumps({"model_id": "m", "trained": False, "summary": "fresh init"}))
    assert model_card(str(tmp_path), "torch", "m") == {"trained": False, "basis": CARD_FILE, "summary": "fresh init",
                                                       "eval": None}


def test_bad_card_files_make_it_unknown_not_an_error(tmp_path):
    path = tmp_path / CARD_FILE
    for text in ("{not json", "[]", '{"trained": "yes"}', "\xff\xfe", json.dumps({"trained": True, "model_id": "x"})):
        path.write_bytes(text.encode("latin-1"))
        card = card_from_directory(tmp_path, "m")
        assert card["trained"] is None and len(card["basis"]) <= 300, text
    path.write_text(json.dumps({"trained": True, "summary": "s" * 10_000,
                                "eval": {"summary": {"a": {f"m{i}": {"k": 1, "n": 2} for i in range(100)}}}}))
    card = card_from_directory(tmp_path, "m")
    assert card["trained"] is True and len(card["summary"]) <= 300 and len(card["eval"]["figures"]) <= 24


def test_eval_figures_skip_what_is_not_a_count():
    doc = {"summary": {"train": {"success": {"k": 3, "n": 0}, "median": 8.7, "ok": {"k": 2, "n": 4, "ci95": [0.1, 0.9]},
                                 "bad": {"k": 5, "n": 4}}}}
    figs = eval_figures(doc)["figures"]
    assert figs == [{"set": "train", "metric": "ok", "k": 2, "n": 4, "rate": 0.5, "ci95": [0.1, 0.9]}]
    assert eval_figures({"summary": {}}) is None and eval_figures([]) is None


def test_the_published_eval_measured_the_shipped_weights():
    """eval.json names the weights it measured (meta.weights_sha256): a re-shipped checkpoint whose
    figures were not measured again fails here, whatever the model's name says."""
    from chatvla.cli.eval import weights_digest

    published = json.loads(SHIPPED_EVAL.read_text())
    assert published["meta"]["weights_sha256"] == weights_digest("chatvla-tiny-mm")
