"""The rendered-scene cache: what comes back is what was rendered, a run finds only its own scenes,
and a torn cache is rendered again instead of read."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from chatvla.profiles import FRANKA_JOINT
from chatvla.training.scene_cache import cache_name, load_scenes, save_scenes


@pytest.fixture(scope="module")
def scenes(rendering):
    from chatvla.training.data import render_scenes

    return render_scenes(FRANKA_JOINT, 3, seed=4, progress=False)


def test_cached_scenes_come_back_as_rendered(scenes, tmp_path):
    name = cache_name("math_matching", FRANKA_JOINT.name, 3, 4, 1_000_000)
    assert load_scenes(tmp_path, name) is None
    save_scenes(scenes, tmp_path, name)
    back = load_scenes(tmp_path, name)
    assert back is not None and len(back) == len(scenes)
    for a, b in zip(scenes, back):
        assert list(a.images) == list(b.images)
        for cam in a.images:
            assert b.images[cam].dtype == np.uint8 and np.array_equal(a.images[cam], b.images[cam])
        assert (a.pairs, a.instruction, a.reasoning) == (b.pairs, b.instruction, b.reasoning)
        assert a.card_pixels == b.card_pixels and a.card_places == b.card_places
    assert load_scenes(tmp_path, cache_name("math_matching", FRANKA_JOINT.name, 3, 5, 1_000_000)) is None


def test_a_torn_cache_is_not_read(scenes, tmp_path, capsys):
    name = "s"
    save_scenes(scenes, tmp_path, name)
    (tmp_path / "s.json").write_text('{"format_version": 1, "cameras": ["front"], "scenes": [{}]}')
    assert load_scenes(tmp_path, name) is None
    assert "rendering again" in capsys.readouterr().err
    (tmp_path / "s.json").unlink()
    assert load_scenes(tmp_path, name) is None  # images without their index


def test_train_renders_once_and_then_reads_the_cache(scenes, tmp_path, monkeypatch, capsys):
    import chatvla.training.data as data
    from chatvla.cli.train import rendered_scenes

    calls = []

    def render(profile, n, **kw):
        calls.append(n)
        return scenes[:n]

    monkeypatch.setattr(data, "render_scenes", render)
    args = argparse.Namespace(task="math_matching", scenes=2, seed=4, quiet=True)
    first = rendered_scenes(args, FRANKA_JOINT, Path(tmp_path))
    again = rendered_scenes(args, FRANKA_JOINT, Path(tmp_path))
    assert calls == [2] and len(first) == len(again) == 2
    assert "2 rendered scenes from" in capsys.readouterr().err
    args.seed = 5  # other scenes: rendered, not read
    rendered_scenes(args, FRANKA_JOINT, Path(tmp_path))
    assert calls == [2, 2]
