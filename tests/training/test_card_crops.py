"""Stage 0 (`training.card_crops`): crops around the rendered cards, labelled token by token, teach the
vision tower alone to read the labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatvla.model.chatvla2 import ChatVLA2
from chatvla.model.presets import get_preset
from chatvla.model.tokenizer import load_tiny_tokenizer
from chatvla.profiles import FRANKA_JOINT
from chatvla.training.batches import patchify
from chatvla.training.card_crops import CROP, TOKEN, CardView, card_crop, card_views, crop_batch
from chatvla.training.data import Dataset, Scene
from chatvla.training.labels import IGNORE, NO_CARD
from chatvla.training.stages import TrainConfig, Trainer


def _coordinates_image() -> np.ndarray:
    """Each pixel holds its own (row, column): a crop tells where it was cut."""
    rows, cols = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)


CARDS = {7: (100.0, 60.0), 30: (160.0, 110.0), 12: (20.0, 210.0)}


def _cut(number: int, rng: np.random.Generator) -> tuple[int, int, np.ndarray]:
    """Where a crop around card `number` of `CARDS` was cut (column, row) and its token labels."""
    crop, labels = card_crop(_coordinates_image(), CARDS, number, rng)
    assert crop.shape == (CROP, CROP, 3)
    return int(crop[0, 0, 1]), int(crop[0, 0, 0]), labels.reshape(CROP // TOKEN, CROP // TOKEN)


def test_the_card_a_crop_is_cut_around_sits_a_token_inside_and_carries_its_number():
    rng = np.random.default_rng(0)
    for _ in range(100):
        x0, y0, grid = _cut(7, rng)
        col, row = CARDS[7][0] - x0, CARDS[7][1] - y0
        assert TOKEN - 1 <= col <= CROP - TOKEN + 1 and TOKEN - 1 <= row <= CROP - TOKEN + 1
        assert grid[int(row // TOKEN), int(col // TOKEN)] == 7
        c30, r30 = CARDS[30][0] - x0, CARDS[30][1] - y0  # the other card, when the crop holds it
        if 0 <= c30 < CROP and 0 <= r30 < CROP:
            assert grid[int(r30 // TOKEN), int(c30 // TOKEN)] == 30
        assert set(np.unique(grid)) <= {NO_CARD, IGNORE, 7, 30}


def test_a_card_at_the_image_edge_gives_a_crop_inside_the_image_that_still_holds_it():
    rng = np.random.default_rng(1)
    for _ in range(20):
        x0, y0, grid = _cut(12, rng)
        assert x0 == 0 and y0 == 224 - CROP
        assert grid[int((210 - y0) // TOKEN), int(20 // TOKEN)] == 12


def test_crops_that_do_not_fit_the_token_grid_or_the_image_are_refused():
    image = _coordinates_image()
    with pytest.raises(ValueError, match="multiple of 28"):
        card_crop(image, CARDS, 7, np.random.default_rng(0), size=100)
    with pytest.raises(ValueError, match="fit"):
        card_crop(image[:84], CARDS, 7, np.random.default_rng(0))


def test_card_views_list_only_cards_inside_an_image_of_scenes_that_say_where_they_are():
    img = np.zeros((224, 224, 3), np.uint8)
    scenes = [Scene({"front": img, "wrist": img}, [], card_pixels={"front": {3: (10.0, 10.0), 4: (230.0, 5.0)},
                                                                   "wrist": {3: (-1.0, 50.0), 4: (50.0, 50.0)}}),
              Scene({"front": img}, [])]
    assert card_views(scenes) == [CardView(0, "front", 3), CardView(0, "wrist", 4)]


def test_a_crop_batch_is_patched_as_the_server_patches_an_image_and_labelled_in_the_towers_order():
    net = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())
    rng = np.random.default_rng(2)
    scenes = [Scene({"front": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)}, [], card_pixels={"front": CARDS})]
    views = card_views(scenes)
    batch = crop_batch(net.prompts, scenes, views, np.random.default_rng(5), 6)
    per_crop = (CROP // 14) ** 2
    assert batch.pixel_values.shape[0] == 6 * per_crop and batch.labels.shape == (6 * 16,)
    assert batch.grid_thw.tolist() == [[1, CROP // 14, CROP // 14]] * 6
    again = np.random.default_rng(5)  # the same draws, one crop at a time
    for i, k in enumerate(again.integers(len(views), size=6)):
        crop, labels = card_crop(scenes[0].images["front"], CARDS, views[int(k)].number, again)
        assert torch.equal(batch.pixel_values[i * per_crop:(i + 1) * per_crop], patchify(net.prompts, crop))
        assert batch.labels[i * 16:(i + 1) * 16].tolist() == labels.tolist()


def test_stage_0_trains_only_the_vision_tower_to_read_rendered_cards_and_hands_over_to_stage_1(rendering, tmp_path):
    from chatvla.training.data import render_scenes

    scenes = render_scenes(FRANKA_JOINT, 3, seed=0, first_task_seed=1_000_000, progress=False)
    torch.manual_seed(0)
    net = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TrainConfig(card_steps=30, card_batch_size=16, save_every=10, stage1_steps=0, stage2_steps=0)
    trainer = Trainer(net, Dataset(FRANKA_JOINT, [], scenes), tmp_path, cfg, progress_bars=False)
    trainer.stage0()
    losses = [v for _, v in trainer.progress.history["stage0/card"]]
    assert np.mean(losses[-1:]) < 0.5 * losses[0], losses
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("vlm.model.visual.") for k in changed), sorted(changed)[:5]
    assert (trainer.progress.stage, trainer.progress.step) == (1, 0)
    fresh = Trainer(ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer()), Dataset(FRANKA_JOINT, [], scenes),
                    tmp_path, cfg, progress_bars=False)
    assert fresh.resume() and fresh.progress.stage == 1  # resumes after stage 0, with what it learnt
    for k, v in trainer.card_probe.state_dict().items():
        assert torch.equal(fresh.card_probe.state_dict()[k], v)
    fresh.stage0()  # done: nothing more
    assert fresh.progress.stage == 1 and "stage0/card" in fresh.progress.history


def test_stage_0_without_scenes_that_show_cards_is_an_error_not_a_silent_skip(tmp_path):
    net = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())
    trainer = Trainer(net, Dataset(FRANKA_JOINT, [], []), tmp_path, TrainConfig(card_steps=5), progress_bars=False)
    with pytest.raises(ValueError, match="needs rendered math-matching scenes"):
        trainer.stage0()
