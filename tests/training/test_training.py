"""`chatvla train`: inputs exactly as served, held-out data refused, resumable and reproducible, and a
smoke run whose checkpoint a real server serves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from chatvla.client.recording import EpisodeWriter
from chatvla.model.chatvla2 import ChatVLA2
from chatvla.model.presets import get_preset
from chatvla.model.tokenizer import load_tiny_tokenizer
from chatvla.profiles import FRANKA_JOINT
from chatvla.training.batches import Item, collate, prepare_fast
from chatvla.training.data import DataError, Dataset, episode_scenes, load_episodes, retry_from
from chatvla.training.stages import TrainConfig, Trainer, load_optimizer, save_optimizer


@pytest.fixture(scope="module")
def model() -> ChatVLA2:
    return ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())


def test_fast_patches_equal_the_image_processor(model):
    rng = np.random.default_rng(0)
    images = {c: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for c in ("wrist", "front")}
    slow = model.prepare(images, "put the card down")
    fast = prepare_fast(model, images, "put the card down")
    assert fast.input_ids == slow.input_ids
    assert torch.equal(fast.image_grid_thw, slow.image_grid_thw)
    assert torch.equal(fast.pixel_values, slow.pixel_values)


def test_supplied_reasoning_ends_like_the_models_own(model):
    p = model.prompts
    assert p.encode_reasoning("12+3=15. Pick card 15.") == p.encode_text("12+3=15. Pick card 15. Next action:")
    assert p.encode_reasoning("Pick card 9. Next action:") == p.encode_text("Pick card 9. Next action:")


def test_expert_rows_are_the_served_prefill_rows(model):
    """The hidden rows training pools are the rows `prefill` (what the server runs) hands the expert."""
    from chatvla.training.batches import pool_spans
    from chatvla.training.stages import vlm_forward

    rng = np.random.default_rng(1)
    imgs = {c: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for c in ("front", "wrist")}
    text = "3+4=7. Pick card 7."
    batch = collate(model, [Item(imgs, "instr", text, np.zeros(8, np.float32), np.zeros((16, 8), np.float32))])
    with torch.no_grad():
        hidden = vlm_forward(model, batch)
    served = model.prefill([model.prepare(imgs, "instr")], [text])[0]
    p, r = served.pooled()
    torch.testing.assert_close(pool_spans(hidden, batch.prompt_spans)[0], p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool_spans(hidden, batch.reasoning_spans)[0], r, atol=1e-5, rtol=1e-5)
    assert batch.labels[0][batch.labels[0] != -100].tolist() == model.prompts.encode_reasoning(text)


def _fake_episode(path: Path, split: str, seed: int) -> None:
    w = EpisodeWriter(path, FRANKA_JOINT, instruction="x", task={"kind": "math_matching", "seed": seed, "split": split},
                      image_encoding="rgb8")
    img = np.zeros((224, 224, 3), np.uint8)
    for t in range(3):
        w.append(tick=t, timestamp=t / 15, state=np.zeros(8, np.float32), action=np.zeros(8, np.float32),
                 images={"front": img, "wrist": img})
    w.close({"success": True})


def test_held_out_episodes_are_refused(tmp_path):
    _fake_episode(tmp_path / "a.chatvla", "heldout", 1)
    with pytest.raises(DataError, match="train split only"):
        load_episodes([tmp_path], FRANKA_JOINT, progress=False)


def test_a_recovery_demonstration_is_learned_from_its_retry_only(recovery_episodes_dir):
    from chatvla.client.recording import read_episode

    path = next(recovery_episodes_dir.glob("*.chatvla"))
    rec = read_episode(path)
    retry = rec.header.task["retry_from"]
    (ep,) = load_episodes([recovery_episodes_dir], FRANKA_JOINT, progress=False)
    assert len(ep.actions) == len(rec.records) - retry
    np.testing.assert_array_equal(ep.states[0], rec.records[retry].state)
    np.testing.assert_array_equal(ep.actions, np.stack([r.action for r in rec.records[retry:]]))
    name, _ = ep.task.oracle_goal()
    assert abs(ep.poses0[name].pos[2] - ep.task.object(name).rest_z) < 0.01  # the missed card lies on the table
    assert ep.reasoning[0].startswith(f"{ep.task.a}+{ep.task.b}={ep.task.answer}.")
    assert ep.retry and episode_scenes([ep], 0) == []  # its first frame is no scene at rest


@pytest.mark.parametrize("value", [-1, 3, 1.5, "2", True])
def test_a_retry_tick_outside_the_episode_is_refused(value):
    with pytest.raises(DataError, match="retry_from"):
        retry_from({"retry_from": value}, 3, "ep.chatvla")
    assert retry_from({}, 3, "ep.chatvla") == 0


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    save_optimizer(opt, tmp_path / "opt")
    other = torch.optim.AdamW(net.parameters(), lr=1e-2)
    load_optimizer(other, tmp_path / "opt")
    a, b = opt.state_dict(), other.state_dict()
    for k in a["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][k][name], b["state"][k][name])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def _trainer(episodes_dir: Path, out: Path, steps1: int, steps2: int, **kw) -> Trainer:
    cfg = get_preset("tiny-sim")
    eps = load_episodes([episodes_dir], FRANKA_JOINT, progress=False)
    data = Dataset(FRANKA_JOINT, eps, episode_scenes(eps, 0))
    model = ChatVLA2(cfg, load_tiny_tokenizer(), data.stats(cfg.expert.relative_to_state))
    tc = TrainConfig(batch_size=4, stage1_steps=steps1, stage2_steps=steps2, stage2_batch_size=32,
                     stage2_tick_stride=8, warmup_steps=2, save_every=2, **kw)
    return Trainer(model, data, out, tc, progress_bars=False)


def test_interrupted_training_resumes_to_the_same_weights(episodes_dir, tmp_path, monkeypatch):
    straight = _trainer(episodes_dir, tmp_path / "a", 4, 0)
    straight.stage1()

    import chatvla.training.stages as stages

    calls = {"n": 0}
    real = stages.collate

    def dies_at_step_3(model, items):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(model, items)

    monkeypatch.setattr(stages, "collate", dies_at_step_3)
    broken = _trainer(episodes_dir, tmp_path / "b", 4, 0)
    with pytest.raises(KeyboardInterrupt):
        broken.stage1()
    monkeypatch.setattr(stages, "collate", real)
    resumed = _trainer(episodes_dir, tmp_path / "b", 4, 0)
    assert resumed.resume() and resumed.progress.step == 2
    resumed.stage1()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_a_stage_starts_at_its_own_step_0_after_an_earlier_stage_was_cut_short(episodes_dir, tmp_path):
    """A run stopped in stage 1 and restarted with --stage1-steps 0 goes on with all of stage 2, not
    from the step stage 1 had reached."""
    trainer = _trainer(episodes_dir, tmp_path, 0, 3)
    trainer.progress.stage, trainer.progress.step = 1, 5  # as an interrupted stage 1 leaves it
    trainer.stage2()
    assert trainer.progress.history["stage2/diffusion"][0][0] == 0
    assert trainer.progress.stage == 3


@pytest.mark.slow
def test_smoke_training_losses_fall_and_a_server_serves_the_checkpoint(episodes_dir, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "chatvla.cli.main", "train", "--data", str(episodes_dir), "--out",
                        str(out), "--stage1-steps", "40", "--stage2-steps", "40", "--batch-size", "4", "--scenes", "0",
                        "--stage2-tick-stride", "6", "--stage2-old-text", "0.5", "--serve-reasoning-every-n", "7",
                        "--prediction", "sample", "--action-ranges", "per-row", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    for name in ("stage1/lm", "stage1/diffusion", "stage2/diffusion"):
        values = [v for _, v in log["history"][name]]
        assert np.mean(values[-2:]) < np.mean(values[:2]), (name, values)
    assert (out / "loss_curve.png").stat().st_size > 1000
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["action_min"]) == 8 and stats["action_min"][7] >= 0.0
    assert np.asarray(stats["action_min_rows"]).shape == (16, 8)  # --action-ranges per-row
    assert json.loads((out / "config.json").read_text())["chatvla"]["sampler"]["prediction_type"] == "sample"

    from chatvla.cli.server_process import start_server
    from chatvla.v1 import policy_pb2 as pb
    from chatvla.v1 import policy_pb2_grpc as pbg
    from chatvla.wire import encode_image, tensor_from_proto, tensor_to_proto

    server = start_server(["--model", str(out)], timeout_s=180)
    try:
        with grpc.insecure_channel(server.grpc_address) as ch:
            stub = pbg.PolicyStub(ch)
            img = np.full((224, 224, 3), 120, np.uint8)
            req = pb.InferRequest(images=[encode_image(img, "front"), encode_image(img, "wrist")],
                                  state=tensor_to_proto(np.asarray(FRANKA_JOINT.home, np.float32)),
                                  instruction="Solve the math problem", seed=3)
            chunk = stub.Infer(req, timeout=60).chunk
            actions = tensor_from_proto(chunk.actions, field="chunk.actions")
            assert actions.shape == (16, 8) and np.isfinite(actions).all()
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert info.model_id == "chatvla-tiny-sim"
            assert info.default_reasoning.every_n == 7  # the checkpoint's own refresh is the server's default
    finally:
        assert server.stop() == 0


def test_relative_actions_round_trip_and_add_the_state_back():
    """Joint targets learned as offsets from the state come back in robot units; the gripper stays absolute."""
    from chatvla.model.config import NormStats

    cfg = get_preset("tiny-sim")
    assert cfg.expert.relative_to_state == tuple(range(7))
    model = ChatVLA2(cfg, load_tiny_tokenizer(), NormStats((-0.3,) * 7 + (0.0,), (0.3,) * 7 + (0.08,),
                                                           (0.0,) * 8, (1.0,) * 8))
    rng = np.random.default_rng(0)
    states = torch.from_numpy(rng.uniform(-1, 1, (3, 8)).astype(np.float32))
    offsets = torch.from_numpy(rng.uniform(-0.2, 0.2, (3, 16, 8)).astype(np.float32))
    chunks = states[:, None, :].repeat(1, 16, 1) + offsets
    chunks[..., 7] = torch.from_numpy(rng.uniform(0, 0.08, (3, 16)).astype(np.float32))
    x = model.expert.normalize_chunk(chunks, states)
    assert x.abs().max() <= 1
    torch.testing.assert_close(model.expert.unnormalize_chunk(x, states), chunks, atol=1e-5, rtol=1e-5)
    # A zero offset decodes to "stay where you are", whatever the state.
    zero = model.expert.normalize_chunk(states[:, None, :].repeat(1, 16, 1), states)
    stay = states[:, None, :7].repeat(1, 16, 1)
    torch.testing.assert_close(model.expert.unnormalize_chunk(zero, states)[..., :7], stay)


def test_relative_stats_bound_the_offsets_not_the_angles(episodes_dir):
    eps = load_episodes([episodes_dir], FRANKA_JOINT, progress=False)
    data = Dataset(FRANKA_JOINT, eps)
    absolute, relative = data.stats(), data.stats(tuple(range(7)))
    assert relative.action_min[7] == absolute.action_min[7]  # gripper: absolute either way
    reach = FRANKA_JOINT.chunk_size * np.asarray(FRANKA_JOINT.max_step)  # farthest a chunk can go
    for i in range(7):
        assert relative.action_min[i] < 0 < relative.action_max[i]
        assert max(-relative.action_min[i], relative.action_max[i]) <= 1.1 * reach[i] + 1e-3



def test_per_row_stats_give_the_near_rows_their_own_narrow_range(episodes_dir, tmp_path):
    """An offset one tick ahead spans a fraction of one sixteen ticks ahead: per-row stats keep that
    (the near rows' ranges are narrower), the envelope is the per-dimension stats, and a checkpoint
    written with them loads with the same row ranges."""
    from chatvla.model.checkpoint import load_checkpoint, save_checkpoint
    from chatvla.model.config import NormStats

    eps = load_episodes([episodes_dir], FRANKA_JOINT, progress=False)
    data = Dataset(FRANKA_JOINT, eps)
    rel = tuple(range(7))
    flat, rows = data.stats(rel), data.stats(rel, per_row=True)
    assert flat.action_min_rows is None and (rows.action_min, rows.action_max) == (flat.action_min, flat.action_max)
    lo, hi = np.asarray(rows.action_min_rows), np.asarray(rows.action_max_rows)
    assert lo.shape == hi.shape == (FRANKA_JOINT.chunk_size, 8)
    span = hi - lo
    moving = [i for i in range(7) if span[-1, i] > 0.01]
    assert moving and all(span[0, i] < span[-1, i] for i in moving)
    assert np.all(lo >= np.asarray(flat.action_min) - 1e-9) and np.all(hi <= np.asarray(flat.action_max) + 1e-9)
    np.testing.assert_allclose(span[:, 7], span[0, 7])  # the gripper is absolute: the same range every row

    model = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer(), rows)
    save_checkpoint(model, tmp_path / "ckpt")
    again = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(again.stats, NormStats) and again.stats.action_min_rows == rows.action_min_rows
    torch.testing.assert_close(again.expert.action_max, torch.tensor(hi, dtype=torch.float32))


def test_place_probe_loss_trains_the_pooled_rows_to_hold_the_stated_places(model):
    """The read-out loss reaches the VLM through the pooled rows and falls when the VLM learns: a few
    steps on two texts that differ only in the place they state, which pool alike when untrained."""
    from chatvla.training.batches import pool_spans
    from chatvla.training.stages import PlaceProbe, vlm_forward

    torch.manual_seed(0)
    net = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())
    rng = np.random.default_rng(2)
    scenes = [{c: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for c in ("front", "wrist")} for _ in "ab"]
    places = np.array([[-0.08, -0.06, 0.1, 0.06, -0.18], [-0.06, -0.08, -0.1, -0.18, 0.06]], np.float32)
    texts = ["3+4=7. Pick card 7 at (-8, -6), place at (6, -18).", "3+4=7. Pick card 7 at (-6, -8), place at (-18, 6)."]
    items = [Item(imgs, "instr", t, np.zeros(8, np.float32), np.zeros((16, 8), np.float32), p)
             for imgs, t, p in zip(scenes, texts, places)]
    batch = collate(net, items)
    assert batch.places is not None and batch.places.shape == (2, 5)
    probe = PlaceProbe(net.expert.input_action_proj.mlps[0].in_features)
    opt = torch.optim.Adam([*net.vlm.parameters(), *probe.parameters()], lr=3e-3)
    losses = []
    for _ in range(25):
        hidden = vlm_forward(net, batch)
        pp, rp = pool_spans(hidden, batch.prompt_spans), pool_spans(hidden, batch.reasoning_spans)
        loss = probe.loss(pp, rp, batch.places, batch.stated_places)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.vlm.parameters())
    assert losses[-1] < 0.1 * losses[0], losses


def test_rendered_scenes_teach_the_tasks_reasoning_on_new_layouts(rendering, episodes_dir, model):
    """Each rendered scene carries the instruction and the reasoning a correct model writes for its layout;
    a stage-1 batch holds some of them, taught like robot reasoning (ending with the end marker) but with
    no chunk, and always keeps a robot row."""
    from chatvla.client.sim.tasks import make_task
    from chatvla.training.data import render_scenes
    from chatvla.training.labels import judge_reasoning
    from chatvla.training.stages import stage1_items

    scenes = render_scenes(FRANKA_JOINT, 2, seed=0, first_task_seed=1_000_000, progress=False)
    for i, s in enumerate(scenes):
        task = make_task("math_matching", seed=1_000_000 + i, split="train")
        assert s.instruction == task.instruction
        assert judge_reasoning(task, s.reasoning or "", task.initial_poses()).place_ok
    data = Dataset(FRANKA_JOINT, load_episodes([episodes_dir], FRANKA_JOINT, progress=False), scenes)
    items = stage1_items(data, TrainConfig(batch_size=8, qa_fraction=0.25, scene_reasoning_fraction=0.25), 0)
    told = [it for it in items if it.reasoning]
    assert len(told) == 2 and all(it.chunk is None and it.target in {s.reasoning for s in scenes} for it in told)
    assert sum(it.chunk is not None for it in items) == 4
    batch = collate(model, told)
    assert batch.robot_rows == []
    assert batch.labels[0][batch.labels[0] != -100].tolist() == model.prompts.encode_reasoning(told[0].target)
    crowded = stage1_items(data, TrainConfig(batch_size=2, qa_fraction=0.5, scene_reasoning_fraction=0.5), 0)
    assert sum(it.chunk is not None for it in crowded) == 1
    off = stage1_items(data, TrainConfig(batch_size=8, scene_reasoning_fraction=0.0), 0)
    assert not any(it.reasoning for it in off)


def test_init_vlm_takes_the_vlm_from_another_robots_model_and_keeps_the_seeded_expert():
    """A VLM trained on the Panda's scenes starts a bimanual model; the 14-d expert cannot come along."""
    from chatvla.cli.train import start_from

    panda = ChatVLA2(get_preset("tiny-sim").with_updates(init_seed=1), load_tiny_tokenizer())
    bimanual = ChatVLA2(get_preset("tiny-sim-bimanual").with_updates(init_seed=2), load_tiny_tokenizer())
    expert_before = {k: v.clone() for k, v in bimanual.expert.state_dict().items()}
    assert start_from(bimanual, panda, vlm_only=False) is not None  # the whole model does not fit
    assert start_from(bimanual, panda, vlm_only=True) is None
    for k, v in panda.vlm.state_dict().items():
        assert torch.equal(bimanual.vlm.state_dict()[k], v), k
    for k, v in bimanual.expert.state_dict().items():
        assert torch.equal(expert_before[k], v), k


def test_card_token_loss_labels_the_vision_tokens_that_show_the_cards_and_trains_the_vision_tower(rendering):
    """Rendered scenes say where each card lies in each camera; a batch turns that into one label per
    vision token, in the order the vision tower emits its tokens, and the loss on them reaches the tower."""
    from chatvla.client.sim.tasks import make_task
    from chatvla.training.data import render_scenes
    from chatvla.training.stages import CardTokenProbe, VisionTap, vlm_forward

    scenes = render_scenes(FRANKA_JOINT, 2, seed=0, first_task_seed=1_000_000, progress=False)
    for i, s in enumerate(scenes):
        assert s.card_pixels is not None and set(s.card_pixels) == {"front", "wrist"}
        assert set(s.card_pixels["front"]) == set(make_task("math_matching", seed=1_000_000 + i).card_numbers)
    torch.manual_seed(0)
    net = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())
    items = [Item(s.images, "Read the cards on the table from left to right.", "1, 2, 3", card_pixels=s.card_pixels)
             for s in scenes] + [Item(scenes[0].images, "What is written on the whiteboard?", "1+2")]
    batch = collate(net, items)
    tap = VisionTap(net)
    vlm_forward(net, batch)
    tokens = tap.take()
    assert tokens is not None and batch.card_tokens is not None
    assert batch.card_tokens.shape == (tokens.shape[0],) == (3 * 2 * 64,)  # 3 rows x 2 cameras x 8x8 tokens
    for i, s in enumerate(scenes):
        for k, cam in enumerate(("front", "wrist")):
            grid = batch.card_tokens[(2 * i + k) * 64:(2 * i + k + 1) * 64].reshape(8, 8)
            for n, (col, row) in s.card_pixels[cam].items():
                assert grid[int(row // 28), int(col // 28)] in (n, -100)
            assert (grid > 0).sum() >= 1
    assert (batch.card_tokens[4 * 64:] == -100).all()  # the row without card places is ignored
    probe = CardTokenProbe(net.cfg.hidden_size, 49)
    opt = torch.optim.Adam([*net.vlm.model.visual.parameters(), *probe.parameters()], lr=3e-3)
    losses = []
    for _ in range(10):
        net.vlm.model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw)  # the tower alone: faster
        loss = probe.loss(tap.take(), batch.card_tokens)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.vlm.model.visual.parameters())
    assert losses[-1] < 0.3 * losses[0], losses
    tap.close()
    assert probe.loss(tokens.detach(), torch.full((tokens.shape[0],), -100)) is None


def test_card_place_loss_asks_the_decoders_image_row_of_each_card_where_that_card_lies(rendering):
    """The rows of the decoder's sequence that hold images come in the vision tower's order, so the
    token labels line up with them; each labelled card token gets its card's table place, every other
    token none; the loss on those rows reaches the decoder's early layers and falls."""
    from chatvla.training.data import render_scenes
    from chatvla.training.stages import CardPlaceProbe, vlm_forward, vlm_forward_layer

    scenes = render_scenes(FRANKA_JOINT, 2, seed=0, first_task_seed=1_000_000, progress=False)
    for s in scenes:
        assert s.card_places is not None and set(s.card_places) == set(s.card_pixels["front"])
        assert all(abs(x) < 0.5 and abs(y) < 0.5 for x, y in s.card_places.values())  # metres, on the table
    torch.manual_seed(0)
    net = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())
    items = [Item(s.images, "Where is card 3?", "(2, 4)", card_pixels=s.card_pixels, card_places=s.card_places)
             for s in scenes] + [Item(scenes[0].images, "Read the board.", "1+2", card_pixels=scenes[0].card_pixels)]
    batch = collate(net, items)
    assert batch.card_tokens is not None and batch.card_places is not None
    assert batch.card_places.shape == (3 * 2 * 64, 2)
    known = torch.isfinite(batch.card_places).all(-1)
    for i, s in enumerate(scenes):
        span = slice(2 * i * 64, 2 * (i + 1) * 64)
        labels, places = batch.card_tokens[span], batch.card_places[span]
        for k in torch.nonzero(labels > 0).flatten().tolist():
            assert torch.allclose(places[k], torch.tensor(s.card_places[int(labels[k])]))
        assert int(known[span].sum()) == int((labels > 0).sum()) >= 1
    assert not known[4 * 64:].any()  # the row that gives no places: its labelled cards have none
    assert (batch.card_tokens[4 * 64:] > 0).any()
    with torch.no_grad():
        last, rows = vlm_forward_layer(net, batch, 2)
        torch.testing.assert_close(last, vlm_forward(net, batch))
    assert rows.shape == (3 * 2 * 64, net.cfg.hidden_size)
    probe = CardPlaceProbe(net.cfg.hidden_size)
    layers = net.vlm.model.language_model.layers
    opt = torch.optim.Adam([*layers[:2].parameters(), *probe.parameters()], lr=3e-3)
    losses = []
    for _ in range(8):
        _, rows = vlm_forward_layer(net, batch, 2)
        loss = probe.loss(rows, batch.card_places)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[3].self_attn.q_proj.weight.grad is None  # the rows are read before the last layers
    assert losses[-1] < 0.5 * losses[0], losses
    assert probe.loss(rows.detach(), torch.full((rows.shape[0], 2), float("nan"))) is None


def test_card_cell_loss_asks_each_coordinate_in_the_2cm_cells_the_text_writes():
    """The classes are the even centimetres `labels.cm` writes ("-0" is 0), clamped at the ends; rows
    without a place are left out; the loss falls when the rows can learn."""
    from chatvla.training.labels import cm
    from chatvla.training.stages import CardCellProbe

    probe = CardCellProbe(16)
    places = torch.tensor([[0.05, -0.1], [float("nan"), float("nan")], [-0.081, 0.199], [-0.001, 0.0], [0.5, -0.5]])
    torch.manual_seed(0)
    rows = torch.randn(5, 16, requires_grad=True)
    logits = probe.head(rows).view(-1, 2, probe.cells)
    for i in (0, 2, 3):
        want = [(cm(float(v)) - probe.LOW) // 2 for v in places[i]]
        loss_i = probe.loss(rows[i:i + 1], places[i:i + 1])
        expect = torch.nn.functional.cross_entropy(logits[i], torch.tensor(want))
        torch.testing.assert_close(loss_i, expect)
    edge = probe.loss(rows[4:5], places[4:5])
    torch.testing.assert_close(edge, torch.nn.functional.cross_entropy(logits[4], torch.tensor([probe.cells - 1, 0])))
    assert probe.loss(rows[1:2], places[1:2]) is None
    opt = torch.optim.Adam([rows, *probe.parameters()], lr=0.05)
    losses = []
    for _ in range(20):
        loss = probe.loss(rows, places)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_pointer_loss_teaches_one_head_to_look_at_the_card_the_text_names_when_writing_its_place(rendering):
    """Only the rows that write the place after "card N" point, only at the image rows that show card
    N; texts without a place point nowhere; the loss trains that head of that layer, falls, and the tap
    leaves the model on its own attention afterwards."""
    from chatvla.training.data import render_scenes
    from chatvla.training.stages import AttentionTap, pointer_loss, vlm_forward

    scenes = render_scenes(FRANKA_JOINT, 2, seed=0, first_task_seed=1_000_000, progress=False)
    torch.manual_seed(0)
    net = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())
    n = [sorted(s.card_pixels["front"]) for s in scenes]
    items = [Item(scenes[0].images, "Where is card?", f"Card {n[0][0]} is on the far left, at (-6, 10).",
                  card_pixels=scenes[0].card_pixels),
             Item(scenes[1].images, "go", f"1+2=3. Pick card {n[1][1]} at (8, -12), place at (2, 4).",
                  reasoning=True, card_pixels=scenes[1].card_pixels),
             Item(scenes[1].images, "Which card?", f"Card {n[1][0]}.", card_pixels=scenes[1].card_pixels),
             Item(scenes[0].images, "Where is card?", f"Card {n[0][0]} is at (2, 4).")]  # no card pixels
    batch = collate(net, items)
    assert [p.row for p in batch.pointers] == [0, 1]
    tok = net.prompts.tokenizer
    for p, place, card in zip(batch.pointers, ["(-6, 10)", "(8, -12)"], [n[0][0], n[1][1]]):
        written = [int(batch.input_ids[p.row, q + 1]) for q in p.queries]  # what each query row predicts
        assert tok.decode(written, skip_special_tokens=False) == place
        assert (batch.labels[p.row, [q + 1 for q in p.queries]] >= 0).all()
        image = torch.nonzero(batch.input_ids[p.row] == tok.token_to_id("<|image_pad|>")).flatten().tolist()
        labels = batch.card_tokens[p.row * 128:(p.row + 1) * 128].tolist()
        assert sorted(p.keys) == [r for r, lab in zip(image, labels) if lab == card] and p.keys
    layers = net.vlm.model.language_model.layers
    tap = AttentionTap(net, 2)
    opt = torch.optim.Adam(net.vlm.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        vlm_forward(net, batch)
        loss = pointer_loss(tap.take(), batch.pointers, head=0)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    tap.close()
    assert layers[2].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[3].self_attn.q_proj.weight.grad is None  # nothing after the pointing layer
    assert losses[-1] < 0.5 * losses[0], losses
    assert net.vlm.model.language_model.config._attn_implementation == "sdpa"
    assert pointer_loss(torch.zeros(1, 4, 3, 3), [], head=0) is None


def test_train_refuses_bad_weights_and_an_unwritable_out_before_reading_any_data(tmp_path, capsys):
    """Minutes of loading and rendering come before the first checkpoint: an --out that cannot be
    written (here a symlink to a missing directory) is an error up front, with a message."""
    from chatvla.cli.main import main

    missing = tmp_path / "no-episodes-here"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o"), "--card-place-weight", "-1"]) == 2
    assert "--pointer-weight must be >= 0" in capsys.readouterr().err
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o"), "--prompt-shuffle", "1.5"]) == 2
    assert "--prompt-shuffle must be in [0, 1]" in capsys.readouterr().err
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o"), "--stage2-old-text", "-0.1"]) == 2
    assert "--stage2-old-text must be in [0, 1]" in capsys.readouterr().err
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o"), "--stage2-ema", "1"]) == 2
    assert "--stage2-ema must be in [0, 1)" in capsys.readouterr().err
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o"), "--serve-reasoning-every-n", "0"]) == 2
    assert "--serve-reasoning-every-n must be >= 1" in capsys.readouterr().err
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o"), "--arithmetic-max", "5"]) == 2
    assert "--arithmetic-max must be >= 9" in capsys.readouterr().err
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o"), "--sums-continued", "-1"]) == 2
    assert "--sums-continued must be >= 0" in capsys.readouterr().err
    out = tmp_path / "dangling"
    out.symlink_to(tmp_path / "gone")
    assert main(["train", "--data", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to --out {out}" in err and "Traceback" not in err


def test_prompt_shuffle_takes_a_share_of_the_prompts_from_other_ticks_and_leaves_the_rest():
    """--prompt-shuffle: off, the batch's own prompts and no draw from the generator (runs without it
    are unchanged); at 1, every prompt from a random tick; in between, about that share."""
    from chatvla.training.stages import shuffled_prompts

    prompt = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    idx = torch.arange(200)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(shuffled_prompts(prompt, idx, 0.0, gen), prompt[idx])
    assert torch.equal(torch.randint(0, 9, (4,), generator=gen),
                       torch.randint(0, 9, (4,), generator=torch.Generator().manual_seed(0)))
    every = shuffled_prompts(prompt, idx, 1.0, torch.Generator().manual_seed(1))
    assert (every[:, 0] != idx.float()).float().mean() > 0.95
    half = shuffled_prompts(prompt, idx, 0.5, torch.Generator().manual_seed(2))
    kept = (half[:, 0] == idx.float()).float().mean().item()
    assert 0.4 < kept < 0.65
    assert torch.equal(half, shuffled_prompts(prompt, idx, 0.5, torch.Generator().manual_seed(2)))


def test_stage2_with_prompt_shuffle_trains_and_records_it(episodes_dir, tmp_path):
    trainer = _trainer(episodes_dir, tmp_path, 0, 4, prompt_shuffle=0.5)
    before = [p.detach().clone() for p in trainer.model.expert.parameters()]
    trainer.stage2()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.expert.parameters()))
    saved = json.loads((tmp_path / "train" / "progress.json").read_text())
    assert saved["config"]["prompt_shuffle"] == 0.5


def test_stage2_features_are_cached_again_when_the_episodes_change(episodes_dir, tmp_path, capsys):
    """A run continued with other episodes (or another stride) must not train on the old ones' features:
    the cache carries a key of what it was computed from."""
    first = _trainer(episodes_dir, tmp_path, 0, 1)
    n_all = first.features()["prompt"].shape[0]
    again = _trainer(episodes_dir, tmp_path, 0, 1)
    assert again.features()["prompt"].shape[0] == n_all and "caching again" not in capsys.readouterr().err
    fewer = _trainer(episodes_dir, tmp_path, 0, 1)
    fewer.data.episodes = fewer.data.episodes[:1]
    n_one = fewer.features()["prompt"].shape[0]
    assert "caching again" in capsys.readouterr().err
    assert n_one == -(-len(fewer.data.episodes[0].actions) // 8) < n_all


def test_stage2_features_are_cached_again_when_the_vlm_has_moved(episodes_dir, tmp_path, capsys):
    """Same episodes, same stride, but a VLM changed since (stage 1 resumed with more steps, or another
    --init): the cached hidden states are the old VLM's, and the expert must not learn from them."""
    first = _trainer(episodes_dir, tmp_path, 0, 1)
    cached = first.features()["prompt"]
    moved = _trainer(episodes_dir, tmp_path, 0, 1)
    with torch.no_grad():
        for p in moved.model.vlm.parameters():
            p.mul_(1.5)
    feats = moved.features()["prompt"]
    assert "cached from another VLM's weights; caching again" in capsys.readouterr().err
    assert feats.shape == cached.shape and not torch.allclose(feats, cached)
    torch.testing.assert_close(moved.features()["prompt"], feats)  # read back: now keyed to this VLM
    assert "caching again" not in capsys.readouterr().err


def test_stage2_features_of_fewer_episodes_are_extended_with_the_added_ones_not_recomputed(
        episodes_dir, tmp_path, capsys, monkeypatch):
    """Recording more episodes and training on: the cache of the first ones is kept and only the new
    episodes' rows are computed, the same rows a run over all of them computes."""
    full = _trainer(episodes_dir, tmp_path / "full", 0, 1, stage2_old_text=0.5).features()
    part = _trainer(episodes_dir, tmp_path / "run", 0, 1, stage2_old_text=0.5)
    part.data.episodes = part.data.episodes[:2]
    n_two = part.features()["prompt"].shape[0]
    grown = _trainer(episodes_dir, tmp_path / "run", 0, 1, stage2_old_text=0.5)
    import chatvla.training.stages as stages

    seen = []
    real = stages.robot_item
    monkeypatch.setattr(stages, "robot_item", lambda data, e, t, src: seen.append(e) or real(data, e, t, src))
    feats = grown.features()
    assert "holds the features of the first 2 episodes; caching the other 1" in capsys.readouterr().err
    assert set(seen) == {2}  # only the added episode went through the VLM
    assert feats["prompt"].shape[0] == full["prompt"].shape[0] > n_two
    for k in full:
        torch.testing.assert_close(feats[k], full[k], atol=1e-5, rtol=1e-5)
    again = _trainer(episodes_dir, tmp_path / "run", 0, 1, stage2_old_text=0.5)
    again.data.episodes = again.data.episodes[:2] + again.data.episodes[:1]  # not a prefix: all anew
    again.features()
    assert "caching again" in capsys.readouterr().err


def test_caching_stopped_halfway_goes_on_from_the_episodes_it_had_done(episodes_dir, tmp_path, capsys, monkeypatch):
    """Caching a few thousand episodes takes half an hour: the episodes done are kept as it goes, so a
    run stopped meanwhile (a session's end, a kill) computes only the others, the same rows."""
    import chatvla.training.stages as stages

    full = _trainer(episodes_dir, tmp_path / "full", 0, 1, stage2_old_text=0.5).features()
    real = stages.robot_item
    calls = []

    def stop_in_the_second_batch(data, e, t, src):
        calls.append(e)
        if len(calls) > 40:  # a batch is 32 ticks; the first episode has fewer than 32 strided ones
            raise KeyboardInterrupt
        return real(data, e, t, src)

    monkeypatch.setattr(stages, "robot_item", stop_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _trainer(episodes_dir, tmp_path / "run", 0, 1, stage2_old_text=0.5, features_save_seconds=1e-9).features()
    seen = []
    monkeypatch.setattr(stages, "robot_item", lambda data, e, t, src: seen.append(e) or real(data, e, t, src))
    feats = _trainer(episodes_dir, tmp_path / "run", 0, 1, stage2_old_text=0.5).features()
    assert "holds the features of the first 1 episodes; caching the other 2" in capsys.readouterr().err
    assert set(seen) == {1, 2}
    for k in full:
        torch.testing.assert_close(feats[k], full[k], atol=1e-5, rtol=1e-5)


def test_a_run_that_keeps_the_init_vlm_starts_from_the_init_runs_feature_cache(episodes_dir, tmp_path):
    from chatvla.training.stages import STAGE2_FEATURES, STATE_DIR

    _trainer(episodes_dir, tmp_path / "init", 0, 1).features()
    cache = tmp_path / "init" / STATE_DIR / STAGE2_FEATURES
    assert not _trainer(episodes_dir, tmp_path / "s1", 1, 1).seed_features(tmp_path / "init")  # its VLM moves
    assert not (tmp_path / "s1" / STATE_DIR / STAGE2_FEATURES).exists()
    follow = _trainer(episodes_dir, tmp_path / "s2", 0, 1)
    assert follow.seed_features(tmp_path / "init")
    assert (tmp_path / "s2" / STATE_DIR / STAGE2_FEATURES).read_bytes() == cache.read_bytes()
    assert not follow.seed_features(tmp_path / "init")  # never over a cache of its own


def test_old_text_pairs_a_share_of_ticks_with_an_earlier_ticks_text_half_of_them_the_first():
    """--stage2-old-text: off, every tick keeps its own text (runs without it are unchanged); on, about
    that share of the later ticks carry the text of an earlier tick of the same episode, about half of
    those the episode's first, and never a later tick's; the same seed draws the same pairs."""
    from chatvla.training.stages import text_ticks

    lengths = [160] * 40
    off = text_ticks(lengths, 4, 0.0, seed=3)
    assert all(src == t for _, t, src in off) and len(off) == 40 * 40
    on = text_ticks(lengths, 4, 0.6, seed=3)
    assert [(e, t) for e, t, _ in on] == [(e, t) for e, t, _ in off]
    assert all(0 <= src <= t for _, t, src in on)
    later = [(t, src) for _, t, src in on if t > 0]
    old = [(t, src) for t, src in later if src != t]
    assert 0.5 < len(old) / len(later) < 0.7
    assert 0.4 < sum(src == 0 for _, src in old) / len(old) < 0.65
    assert on == text_ticks(lengths, 4, 0.6, seed=3) != text_ticks(lengths, 4, 0.6, seed=4)


def test_stage2_features_with_old_text_are_keyed_apart_and_carry_the_earlier_ticks_text(episodes_dir, tmp_path, capsys):
    """The cache key says which ticks carry old text, so a run with another share caches again; the
    cached reasoning rows of a tick given the first tick's text are that text's rows."""
    from chatvla.training.stages import features_key

    plain = _trainer(episodes_dir, tmp_path, 0, 1)
    feats = plain.features()
    old = _trainer(episodes_dir, tmp_path, 0, 1, stage2_old_text=1.0)
    assert features_key(old.data, 8, 1.0, 0) != features_key(old.data, 8)
    old_feats = old.features()
    assert "caching again" in capsys.readouterr().err
    assert old_feats["prompt"].shape == feats["prompt"].shape
    torch.testing.assert_close(old_feats["prompt"], feats["prompt"])  # the images are the tick's own
    assert torch.equal(old_feats["states"], feats["states"]) and torch.equal(old_feats["chunks"], feats["chunks"])
    assert any(len(set(ep.reasoning)) > 1 for ep in old.data.episodes)  # the card moves: its text changes
    assert not torch.equal(old_feats["reasoning"], feats["reasoning"])


def test_stage2_ema_serves_the_weight_average_and_an_interrupted_run_resumes_it(episodes_dir, tmp_path, monkeypatch):
    """--stage2-ema: the checkpoint holds the average of the expert's weights, not the last step's; a
    run cut short in stage 2 goes on with the average it saved, and ends where an uninterrupted one does."""
    from chatvla.training.averaging import WeightAverage

    last = _trainer(episodes_dir, tmp_path / "last", 0, 12)
    last.stage2()
    straight = _trainer(episodes_dir, tmp_path / "a", 0, 12, stage2_ema=0.5)
    straight.stage2()
    differ = [n for (n, a), b in zip(last.model.expert.named_parameters(), straight.model.expert.parameters())
              if not torch.equal(a, b)]
    assert differ  # same batches, same last weights: only the average can tell them apart

    import chatvla.training.stages as stages

    real = WeightAverage.update
    calls = {"n": 0}

    def dies_at_step_11(self, module):
        real(self, module)
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt

    monkeypatch.setattr(stages.WeightAverage, "update", dies_at_step_11)
    broken = _trainer(episodes_dir, tmp_path / "b", 0, 12, stage2_ema=0.5)  # stage 2 saves every 10 steps
    with pytest.raises(KeyboardInterrupt):
        broken.stage2()
    monkeypatch.setattr(stages.WeightAverage, "update", real)
    resumed = _trainer(episodes_dir, tmp_path / "b", 0, 12, stage2_ema=0.5)
    assert resumed.resume() and resumed.progress.step == 10
    resumed.stage2()
    for (name, a), b in zip(straight.model.expert.state_dict().items(), resumed.model.expert.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_text_only_sums_train_the_language_model_in_stage_1(episodes_dir, tmp_path):
    """--arithmetic adds rows without images to every stage-1 step: their loss is logged, reaches the
    language model (not the vision tower) and falls on a fixed set of sums; rows as the chat template
    builds them, the answer alone labelled."""
    from chatvla.training.batches import collate_text
    from chatvla.training.stages import lm_loss, text_forward

    net = ChatVLA2(get_preset("tiny-sim"), load_tiny_tokenizer())
    pairs = [("What is 68+73?", "68+73=141."), ("What is 2+8?", "2+8=10.")]
    batch = collate_text(net, pairs)
    row = batch.input_ids[1][batch.attention_mask[1].bool()].tolist()
    assert net.prompts.tokenizer.decode(row, skip_special_tokens=False).endswith(
        "user\nWhat is 2+8?<|im_end|>\n<|im_start|>assistant\n2+8=10.<|im_end|>")
    labelled = batch.labels[1][batch.labels[1] != -100].tolist()
    assert labelled == [*net.prompts.encode_text("2+8=10."), net.prompts.eos_id]
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.vlm.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = lm_loss(net, text_forward(net, batch.input_ids, batch.attention_mask), batch.labels)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.3 * losses[0], losses
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.vlm.model.visual.parameters())

    trainer = _trainer(episodes_dir, tmp_path, 3, 0, arithmetic=4, pointer_weight=1.0, sums_continued=2)
    trainer.stage1()
    assert len(trainer.progress.history["stage1/arithmetic"]) == 1  # logged every 10 steps: step 0
    assert len(trainer.progress.history["stage1/continued"]) == 1
    assert len(trainer.progress.history["stage1/balance"]) == 1


def test_sums_beside_a_scene_join_the_stage_1_batch_with_the_scenes_cameras(episodes_dir):
    """--arithmetic-scenes N: N more sums a step, each asked with a rendered scene's images in the
    prompt and answered as the text-only sums are; none by default, the same rows for the same step."""
    from chatvla.training.stages import stage1_items

    eps = load_episodes([episodes_dir], FRANKA_JOINT, progress=False)
    data = Dataset(FRANKA_JOINT, eps, episode_scenes(eps, 0))
    plain = stage1_items(data, TrainConfig(batch_size=4), step=5)
    cfg = TrainConfig(batch_size=4, arithmetic_scenes=3, arithmetic_max=999)
    items = stage1_items(data, cfg, step=5)
    assert len(items) == len(plain) + 3
    assert [i.target for i in items[:len(plain)]] == [i.target for i in plain]  # the other rows are untouched
    scene_images = [s.images for s in data.scenes]
    for item in items[len(plain):]:
        a, b = (int(v) for v in re.fullmatch(r"What is (\d+)\+(\d+)\?", item.prompt).groups())
        assert item.target == f"{a}+{b}={a + b}." and not item.reasoning and item.chunk is None
        assert any(item.images is imgs for imgs in scene_images)
    assert [i.target for i in stage1_items(data, cfg, step=5)] == [i.target for i in items]


def test_sums_continued_score_only_the_digits_of_the_sum_after_operands_given_in_the_reasoning(episodes_dir, model):
    """--sums-continued N: N rows a step with a recorded tick's prompt (instruction + cameras) whose
    reasoning begins with other operands than the board's ("68+73=141. Pick card 141"); only the sum's
    and the card's digits carry a loss, kept apart from the texts' ("continued"), so the answer can only
    come from adding what was written, and the card from copying it."""
    from chatvla.training.batches import collate
    from chatvla.training.labels import HELDOUT_NUMBERS
    from chatvla.training.stages import lm_loss, lm_losses, stage1_items

    eps = load_episodes([episodes_dir], FRANKA_JOINT, progress=False)
    data = Dataset(FRANKA_JOINT, eps, episode_scenes(eps, 0))
    plain = stage1_items(data, TrainConfig(batch_size=4), step=5)
    cfg = TrainConfig(batch_size=4, sums_continued=3, arithmetic_max=999)
    items = stage1_items(data, cfg, step=5)
    assert len(items) == len(plain) + 3
    assert [i.target for i in items[:len(plain)]] == [i.target for i in plain]
    added = items[len(plain):]
    instructions = {ep.instruction for ep in data.episodes}
    batch = collate(model, added)
    for row, item in enumerate(added):
        a, b, c, card = (int(v) for v in re.fullmatch(r"(\d+)\+(\d+)=(\d+)\. Pick card (\d+)", item.target).groups())
        assert a + b == c == card and not {a, b, c} & set(HELDOUT_NUMBERS)
        assert item.reasoning and item.chunk is None and item.prompt in instructions
        assert [item.target[slice(*span)] for span in item.scored] == [str(c), str(c)]
        scored = batch.labels[row][batch.labels[row] != -100].tolist()
        assert model.prompts.decode(scored).replace(" ", "") == 2 * str(c)  # the sum's digits, then the card's
    assert [i.target for i in stage1_items(data, cfg, step=5)[len(plain):]] == [i.target for i in added]

    mixed = plain[:1] + added
    batch = collate(model, mixed)
    hidden = torch.randn(*batch.input_ids.shape, model.cfg.hidden_size)
    losses = lm_losses(model, hidden, batch.labels, [i.scored is not None for i in mixed])
    torch.testing.assert_close(losses["lm"], lm_loss(model, hidden[:1], batch.labels[:1]))
    torch.testing.assert_close(losses["continued"], lm_loss(model, hidden[1:], batch.labels[1:]))
    assert set(lm_losses(model, hidden[:1], batch.labels[:1], [False])) == {"lm"}
