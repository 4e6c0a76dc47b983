"""`chatvla eval` (and `demo`, for the executor settings they share) refuses bad numbers with one line
before starting a server."""

from __future__ import annotations

import pytest

from chatvla.cli.main import main


@pytest.mark.parametrize("flag", [["--latency-ticks", "-1"], ["--first", "-3"]])
def test_negative_latency_or_first_episode_is_one_line(flag, capsys) -> None:
    assert main(["eval", *flag]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "chatvla eval: --first and --latency-ticks must be 0 or more"


def test_latency_and_real_time_exclude_each_other(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "--latency-ticks", "3", "--real-time"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_a_bad_executor_setting_is_one_line(command, capsys) -> None:
    assert main([command, "--executor", "frozen_ticks=two"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == (
        f"chatvla {command}: executor setting 'frozen_ticks=two': 'two' is not a valid int")


def test_the_weights_digest_names_the_weights_not_the_directory(tmp_path) -> None:
    """eval.json's meta.weights_sha256: the same weights anywhere give the same digest, one changed
    byte another, and a seeded preset (no files) none."""
    import shutil

    from chatvla.cli.eval import weights_digest
    from chatvla.model.presets import SHIPPED

    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED["chatvla-tiny-mm"], copy)
    digest = weights_digest("chatvla-tiny-mm")
    assert digest and len(digest) == 16 and weights_digest(str(copy)) == digest
    (copy / "model_card.json").write_text("{}")  # the card is not the weights
    assert weights_digest(str(copy)) == digest
    expert = copy / "expert" / "model.safetensors"
    data = bytearray(expert.read_bytes())
    data[-1] ^= 1
    expert.write_bytes(bytes(data))
    assert weights_digest(str(copy)) != digest
    assert weights_digest("tiny") is None


def test_a_preset_name_has_no_digest_even_beside_a_directory_of_that_name(tmp_path, monkeypatch) -> None:
    """`chatvla serve --model tiny` serves the seeded preset whatever lies in the working directory."""
    import shutil

    from chatvla.cli.eval import weights_digest
    from chatvla.model.presets import SHIPPED

    shutil.copytree(SHIPPED["chatvla-tiny-mm"], tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert weights_digest("tiny") is None and weights_digest("./tiny") == weights_digest("chatvla-tiny-mm")
