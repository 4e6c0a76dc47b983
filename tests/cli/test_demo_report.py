"""`chatvla demo`'s report: reasoning as plain quoted text, safety interventions with their names."""

from __future__ import annotations

import json
from pathlib import Path

from chatvla.cli.demo import RobotReport, print_report, quoted, safety_text


def test_reasoning_is_plain_quoted_text():
    assert quoted("The board shows 3 + 4 = 7.\nI'll pick the card\t'7'.") == \
        "\"The board shows 3 + 4 = 7. I'll pick the card '7'.\""
    assert quoted("  ") == "-"


def test_safety_counts_are_named():
    assert safety_text({"clip_limits": 80, "watchdog_hold": 13, "stop": 0}) == "clip_limits x80, watchdog_hold x13"
    assert safety_text({}) == "no interventions"


def test_report_prints_names_and_text_not_reprs(capsys):
    r = RobotReport(name="robot0", episodes=1, ticks=150, seconds=10.0, safety_clamped_ticks=93,
                    safety={"clip_limits": 80, "watchdog_hold": 13}, reasoning_sample="I'll add 3 and 4:\n7")
    print_report([r, RobotReport(name="robot1", error="RuntimeError: boom")], "chatvla-tiny-mm")
    out = capsys.readouterr().out
    assert "robot0 safety: clip_limits x80, watchdog_hold x13" in out
    assert "robot0 reasoning sample: \"I'll add 3 and 4: 7\"" in out
    assert "\\n" not in out and "robot1: ERROR RuntimeError: boom" in out


def test_the_tally_is_set_against_the_models_own_measured_figures(tmp_path):
    """The closing line quotes what the checkpoint's card says it completed, so it cannot go stale
    when another model is shipped; a seeded preset is said to be untrained, a card-less one says nothing."""
    from chatvla.cli.demo import measured_note
    from chatvla.model.presets import SHIPPED

    card = json.loads((Path(SHIPPED["chatvla-tiny-mm"]) / "model_card.json").read_text())
    train = card["eval"]["summary"]["train"]["success"]
    assert f"{train['k']}/{train['n']} train-split" in measured_note("chatvla-tiny-mm")
    assert "untrained" in measured_note("tiny")
    assert measured_note(str(tmp_path)) == ""
    (tmp_path / "model_card.json").write_text(json.dumps({"trained": False, "eval": card["eval"]}))
    assert measured_note(str(tmp_path)) == ""  # an untrained card's figures are not quoted
