"""The two training stages of ChatVLA-2, with checkpoints that resume and a loss curve.

Stage 1 co-trains everything: the VLM learns to write the reasoning for robot observations and to
answer image-text questions (next-token loss), the routed MoE gets its load-balancing loss, and the
action expert's diffusion loss flows back into the VLM so its hidden states learn to carry what the
arm needs (where the card is). Stage 2 freezes the VLM, computes its pooled hidden states once per
training tick (exactly what the server hands the expert), and trains only the expert: projectors,
reasoning-following DiT, conditioning.

Batches are drawn from a generator seeded by (seed, stage, step), so a resumed run sees the batches an
uninterrupted one would have seen. Optimiser state is saved as safetensors + JSON: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chatvla.client.sim.catalog import MAX_NUMBER
from chatvla.model.chatvla2 import ChatVLA2
from chatvla.model.checkpoint import load_checkpoint, save_checkpoint
from chatvla.model.moe import MoEBlock
from chatvla.model.tokenizer import IMAGE_PAD
from chatvla.training.averaging import WeightAverage
from chatvla.training.batches import Batch, Item, Pointer, collate, collate_text, pool_spans
from chatvla.training.card_crops import card_views, crop_batch, vision_tokens
from chatvla.training.data import Dataset, tick_images
from chatvla.training.labels import ARITHMETIC_MAX, NO_CARD, arithmetic_pair

STATE_DIR = "train"  # inside the output directory: resumable state
PROGRESS = "progress.json"
PROBE = "place_probe.safetensors"
CARD_PROBE = "card_probe.safetensors"
CARD_PLACE_PROBE = "card_place_probe.safetensors"
CARD_CELL_PROBE = "card_cell_probe.safetensors"
EXPERT_AVERAGE = "expert_average.safetensors"  # stage 2's running weight average (TrainConfig.stage2_ema)
STAGE2_FEATURES = "stage2_features.safetensors"  # stage 2's cached VLM features (Trainer.features)
FEATURE_NAMES = ("prompt", "reasoning", "states", "chunks")  # the tensors of that file, one row per tick


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 16
    stage1_steps: int = 3000
    stage2_steps: int = 3000
    stage2_batch_size: int = 64
    lr_stage1: float = 5e-4
    lr_stage2: float = 3e-4
    warmup_steps: int = 100
    qa_fraction: float = 0.25  # share of each stage-1 batch that is image-text questions
    scene_reasoning_fraction: float = 0.25  # share that is control reasoning on rendered scenes (no chunk)
    diffusion_weight: float = 1.0
    place_weight: float = 1.0  # PlaceProbe read-out loss in stage 1 (0: off)
    card_token_weight: float = 0.0  # CardTokenProbe loss on the vision tokens in stage 1 (0: off)
    card_place_weight: float = 0.0  # CardPlaceProbe loss on the decoder's image rows in stage 1 (0: off)
    card_cell_weight: float = 0.0  # CardCellProbe loss on the same rows (0: off)
    card_place_layer: int = 2  # after this many decoder layers (the later ones then copy from them)
    pointer_weight: float = 0.0  # pointer loss on one attention head of decoder layer card_place_layer (0: off)
    pointer_head: int = 0  # which head of that layer the pointer loss trains
    arithmetic: int = 0  # text-only sums (labels.arithmetic_pair) added to each stage-1 step (0: off)
    arithmetic_max: int = ARITHMETIC_MAX  # their largest operand (above 99: half the sums go up to it)
    arithmetic_scenes: int = 0  # more such sums a step, asked beside a rendered scene's cameras (0: off)
    sums_continued: int = 0  # sums a step the model finishes in its own reasoning, on a robot tick (0: off)
    card_steps: int = 0  # stage 0: vision tower + CardTokenProbe on crops around cards (0: off)
    card_batch_size: int = 128  # crops per stage-0 step
    lr_card: float = 3e-3
    balance_weight: float = 0.01
    stage2_tick_stride: int = 3  # cache every Nth tick for stage 2 (neighbouring ticks look alike)
    prompt_shuffle: float = 0.0  # stage 2: share of samples whose prompt features come from another tick (0: off)
    stage2_old_text: float = 0.0  # stage 2: share of cached ticks whose reasoning text is an earlier tick's (0: off)
    stage2_ema: float = 0.0  # stage 2: decay of the expert's weight average that is saved and served (0: off)
    save_every: int = 200
    features_save_seconds: float = 120.0  # stage 2: keep the feature cache of the episodes done this often (0: off)
    grad_clip: float = 1.0


@dataclass
class Progress:
    stage: int = 0
    step: int = 0
    history: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[step, value], ...]
    seconds: float = 0.0

    def log(self, name: str, step: int, value: float) -> None:
        self.history.setdefault(name, []).append([step, round(float(value), 6)])


# --- losses ---------------------------------------------------------------------------------------------
class BalanceTap:
    """Collects each MoE router's logits during a forward pass for the load-balancing loss
    (Switch Transformer: E * sum_e fraction_routed_e * mean_prob_e; 1.0 when perfectly balanced)."""

    def __init__(self, model: ChatVLA2) -> None:
        self.logits: list[tuple[torch.Tensor, int]] = []
        self.handles = [b.gate.register_forward_hook(self._hook(b.top_k)) for b in model.vlm.modules()
                        if isinstance(b, MoEBlock) and not b.static]

    def _hook(self, k: int) -> Callable:
        def hook(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
            self.logits.append((out, k))
        return hook

    def loss(self) -> torch.Tensor | None:
        if not self.logits:
            return None
        losses = []
        for logits, k in self.logits:
            probs = torch.softmax(logits.float(), -1)
            e = probs.shape[-1]
            chosen = F.one_hot(torch.topk(logits, k, -1).indices, e).sum(1).float()
            losses.append(e * (chosen.mean(0) / k * probs.mean(0)).sum())
        self.logits.clear()
        return torch.stack(losses).mean()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def diffusion_loss(model: ChatVLA2, prompt_pooled: torch.Tensor, reasoning_pooled: torch.Tensor,
                   states: torch.Tensor, chunks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The expert's diffusion loss on chunks in robot units, normalised as serving does; the head's
    target is what the sampler's `prediction_type` says (the noise, the chunk, or v)."""
    ex = model.expert
    dev = prompt_pooled.device
    x0 = ex.normalize_chunk(chunks, states).to(dev)
    st = (states.to(dev) - ex.state_mean) / ex.state_std
    obs_s, rea_s = ex.streams(prompt_pooled, reasoning_pooled)
    obs_c, rea_c = ex.policy_head.conditions(obs_s, rea_s, st)
    b = x0.shape[0]
    t = torch.randint(0, ex.ddim.cfg.num_train_timesteps, (b,), generator=gen).to(dev)
    eps = torch.randn(x0.shape, generator=gen).to(dev)
    a = ex.ddim.alphas_cumprod.to(dev)[t].view(b, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return F.mse_loss(ex.policy_head(xt, t, obs_c, rea_c), ex.ddim.target(x0, eps, t))


def features_key(data: Dataset, stride: int, old_text: float = 0.0, seed: int = 0) -> str:
    """What the stage-2 feature cache was computed from (each episode's task seed, file name and length,
    the stride, and which ticks carry an earlier tick's text): a run resumed or continued with more or
    other episodes must not train on the features of the old ones."""
    ids = [(ep.task.seed, Path(ep.path).name, len(ep.actions)) for ep in data.episodes]
    parts: list[object] = [stride, ids] if old_text <= 0 else [stride, ids, old_text, seed]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def vlm_digest(model: ChatVLA2) -> str:
    """The frozen VLM's weights, as a short sha256: stage 2's cache holds that VLM's hidden states, so a
    run whose VLM has moved since (stage 1 resumed with more steps, another `--init`) must not train
    its expert on them, even over the same episodes."""
    h = hashlib.sha256()
    for name, t in sorted(model.vlm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def text_ticks(lengths: list[int], stride: int, share: float, seed: int) -> list[tuple[int, int, int]]:
    """(episode, tick, the tick whose reasoning text goes with it) for every strided tick of stage 2.

    Why: each tick's label states where the card is *now*, so an expert trained only on fresh text
    follows a text to the letter: served with text decoded a few observations ago (a dual-rate
    reasoning policy, or a slow decode) it goes back to where the card was before the pick. On a
    `share` of ticks the text is an earlier tick's instead, half of them the episode's first (the
    text of the first observation held all episode), half a uniformly drawn earlier tick: the expert
    then learns that the images and the joint state say how far the task has got, and the text says
    which card and where things were when it was written. Deterministic from `seed`."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for e, n in enumerate(lengths):
        for t in range(0, n, stride):
            src = t
            if share > 0 and t > 0 and rng.random() < share:
                src = 0 if rng.random() < 0.5 else int(rng.integers(0, t + 1))
            out.append((e, t, src))
    return out


def shuffled_prompts(prompt: torch.Tensor, idx: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """The pooled prompt features of samples `idx`, a `share` of them taken from another random tick.

    Why: the prompt's pooled image features tell the 400 recorded layouts apart, so an expert trained on
    them alone can remember each episode's motion and ignore the reasoning; on a new layout, or when the
    text names another card, it then goes where nothing told it to. With the prompt of another tick (another
    layout) on a share of samples, only the reasoning (where the card is, where the square is) and the
    joint state predict the chunk, so the expert learns to follow the text: the paper's claim. The draw
    consumes `gen` only when the share is above 0, so runs without it are unchanged."""
    if share <= 0:
        return prompt[idx]
    swap = torch.rand(idx.shape[0], generator=gen) < share
    other = torch.randint(0, prompt.shape[0], (idx.shape[0],), generator=gen)
    return prompt[torch.where(swap, other, idx)]


class PlaceProbe(torch.nn.Module):
    """Training-only linear read-outs that make the pooled hidden states carry where things are.

    The expert sees the reasoning only as the mean of its hidden rows. Trained on next-token loss
    alone, that mean is a bag of digits: "(-8, -6)" and "(-6, -8)" pool alike, and a ridge probe on the
    first shipped model's pooled reasoning recovered the stated card place no better than its mean
    (`benchmarks/feature_probe.py`), so the expert could not follow the text. These heads ask
    the mean of the reasoning rows to hold the places the text states (card x, y, square x, y, rounded
    to even centimetres as written), and the mean of the prompt rows to hold the answer card's true
    place and yaw and the square's place (what the images show). The heads are not part of the model:
    they live in the training state only and are dropped from the servable checkpoint."""

    POS_SCALE, YAW_SCALE = 10.0, 3.0  # metres and radians -> about unit range

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.prompt = torch.nn.Linear(dim, 5)
        self.reasoning = torch.nn.Linear(dim, 4)

    def loss(self, prompt_pooled: torch.Tensor, reasoning_pooled: torch.Tensor, places: torch.Tensor,
             stated: torch.Tensor) -> torch.Tensor:
        """`places`: labels.place_targets [B, 5]; `stated`: labels.stated_places of them [B, 4]."""
        scale = places.new_tensor([self.POS_SCALE, self.POS_SCALE, self.YAW_SCALE, self.POS_SCALE, self.POS_SCALE])
        return (F.mse_loss(self.prompt(prompt_pooled), places * scale)
                + F.mse_loss(self.reasoning(reasoning_pooled), stated * self.POS_SCALE))


class CardTokenProbe(torch.nn.Module):
    """A training-only linear read-out asking each merged vision token which card's number it shows.

    Finding card N needs its label read: 6-10 px high in the 224x224 cameras. Taught only through the
    answers' next-token loss, the vision tower never learnt it (`benchmarks/card_reading.py`: the
    shipped model read 0 of 40 rows of cards and guessed the sum for every card), because that
    gradient reaches a card's token only once the decoder already attends to it. This head gives the
    token that holds a card's centre its number directly (and the tokens far from every card "none",
    at a tenth of the weight: they are most of the image). Like `PlaceProbe` it lives in the training
    state only and is dropped from the servable checkpoint."""

    NONE_WEIGHT = 0.1

    def __init__(self, dim: int, numbers: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(dim, numbers + 1)  # 0 = no card

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """`tokens` [N, D] the vision tower's merged output; `labels` [N] (labels.card_token_labels)."""
        labels = labels.to(tokens.device)
        card, none = labels > NO_CARD, labels == NO_CARD
        if not card.any():
            return None
        logits = self.head(tokens.float())
        loss = F.cross_entropy(logits[card], labels[card])
        if none.any():
            loss = loss + self.NONE_WEIGHT * F.cross_entropy(logits[none], labels[none])
        return loss


class CardPlaceProbe(torch.nn.Module):
    """A training-only linear read-out asking the decoder's image row of each card where that card lies
    on the table (task frame), after the first `TrainConfig.card_place_layer` decoder layers.

    Stage 0 taught the vision tower to read the labels (a probe names 85-94% of the cards from their
    tokens), yet the decoder still answers "where is card N" with one place for the whole scene
    (`benchmarks/localisation.py`). The vision tower cannot say where a token is: its only position
    signal is a relative rotary embedding, so its output carries what a token shows, not where. The
    decoder can: an image row attends to the fixed prompt text before the images at an offset that
    depends on the row's own place in the image (M-RoPE), so its hidden state can learn its place, and
    the label's spot inside the token gives the rest. This head asks for that, on the rows that hold
    a card's centre, so that the reasoning's "card 36 at (" only has to find the row that shows 36 and
    copy what it holds. Like the other probes it lives in the training state only."""

    POS_SCALE = 10.0  # metres -> about unit range

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(dim, 2)

    def loss(self, rows: torch.Tensor, places: torch.Tensor) -> torch.Tensor | None:
        """`rows` [N, D] the decoder's image rows in sequence order; `places` [N, 2] (metres, NaN where
        the row shows no card: `batches.card_token_targets`)."""
        places = places.to(rows.device)
        known = torch.isfinite(places).all(-1)
        if not known.any():
            return None
        return F.mse_loss(self.head(rows[known].float()), places[known] * self.POS_SCALE)


class AttentionTap:
    """Keeps one decoder layer's attention weights [B, heads, L, L] of the last forward pass, for
    `pointer_loss`. Only the eager attention returns its weights, so the text model runs eager while the
    tap is open (same result as sdpa up to rounding; at these lengths the cost is small) and goes back
    to what it used before on `close`."""

    def __init__(self, model: ChatVLA2, layer: int) -> None:
        self.config = model.vlm.model.language_model.config
        self.before = self.config._attn_implementation
        self.config._attn_implementation = "eager"
        self.weights: torch.Tensor | None = None
        self.handle = model.vlm.model.language_model.layers[layer].self_attn.register_forward_hook(self._hook)

    def _hook(self, _m: torch.nn.Module, _i: object, out: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.weights = out[1]

    def take(self) -> torch.Tensor | None:
        weights, self.weights = self.weights, None
        return weights

    def close(self) -> None:
        self.handle.remove()
        self.config._attn_implementation = self.before


def pointer_loss(weights: torch.Tensor, pointers: list[Pointer], head: int) -> torch.Tensor | None:
    """Mean over the rows that write a card's place of -log(the attention mass `head` puts on the image
    rows that show that card).

    After the card-place loss each card's decoder row holds where the card lies (a ridge probe finds it
    within 2 cm for 78% of cards on new scenes), yet the text still states one place per scene: the
    later layers never learnt to find the row that shows N when writing "card N at (". The next-token
    loss reaches that look-up only through the digits it would copy; this loss teaches the look-up
    itself, on one head, leaving the others free."""
    losses = []
    for p in pointers:
        mass = weights[p.row, head][list(p.queries)][:, list(p.keys)].sum(-1)
        losses.append(-torch.log(mass.float() + 1e-6))
    return torch.cat(losses).mean() if losses else None


class CardCellProbe(torch.nn.Module):
    """A training-only read-out asking the same decoder image rows as `CardPlaceProbe` which 2 cm cell
    each coordinate of the card's place falls in, as the text writes it (`labels.cm`): a class per
    even centimetre, not a number.

    With the card-place and pointer losses (run 11), the head that writes "card N at (" puts half its
    attention on card N's rows on new scenes (from 1%), yet not one of 48 places comes out right, even
    teacher-forced (`benchmarks/pointer.py`): the rows hold the place as one continuous number, and
    turning a number into a sign and two digits takes sharp thresholds that the one layer after the
    copy has not learnt. A class per cell is what a token is; copied through the head's linear value
    path it stays one, so the last layer only has to map a cell and the token's place in "(x, y)" to
    a digit. Like the other probes it lives in the training state only."""

    LOW, HIGH = -30, 30  # cm; the table's cards lie well inside

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cells = (self.HIGH - self.LOW) // 2 + 1
        self.head = torch.nn.Linear(dim, 2 * self.cells)

    def loss(self, rows: torch.Tensor, places: torch.Tensor) -> torch.Tensor | None:
        """`rows`, `places` as `CardPlaceProbe.loss` takes them."""
        places = places.to(rows.device)
        known = torch.isfinite(places).all(-1)
        if not known.any():
            return None
        cm = 2 * torch.round(50 * places[known].double())  # labels.cm: even centimetres (float64, as it rounds)
        cell = ((cm.clamp(self.LOW, self.HIGH) - self.LOW) // 2).long()
        logits = self.head(rows[known].float()).view(-1, 2, self.cells)
        return F.cross_entropy(logits.reshape(-1, self.cells), cell.reshape(-1))


class VisionTap:
    """Keeps the vision tower's merged output (what the decoder reads as image tokens) of the last
    forward pass, for `CardTokenProbe`."""

    def __init__(self, model: ChatVLA2) -> None:
        self.tokens: torch.Tensor | None = None
        self.handle = model.vlm.model.visual.merger.register_forward_hook(self._hook)

    def _hook(self, _m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        self.tokens = out

    def take(self) -> torch.Tensor | None:
        tokens, self.tokens = self.tokens, None
        return tokens

    def close(self) -> None:
        self.handle.remove()


def _vlm(model: ChatVLA2, batch: Batch, *, every_layer: bool = False) -> Any:  # a transformers model output
    dev = model.device
    return model.vlm.model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                           mm_token_type_ids=batch.mm_token_type_ids.to(dev),
                           pixel_values=batch.pixel_values.to(dev), image_grid_thw=batch.image_grid_thw.to(dev),
                           use_cache=False, output_hidden_states=every_layer)


def vlm_forward(model: ChatVLA2, batch: Batch) -> torch.Tensor:
    """Last-layer (post-norm) hidden states [B, L, D]: what `reason`/`prefill` hand the expert."""
    return _vlm(model, batch).last_hidden_state


def vlm_forward_layer(model: ChatVLA2, batch: Batch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`vlm_forward`'s hidden states and, second, the image rows [N, D] after `layer` decoder layers,
    in sequence order (batch row by row): the order of the vision tower's tokens and of
    `Batch.card_tokens`."""
    out = _vlm(model, batch, every_layer=True)
    image = batch.input_ids.to(model.device) == model.prompts.tokenizer.token_to_id(IMAGE_PAD)
    return out.last_hidden_state, out.hidden_states[layer][image]


def text_forward(model: ChatVLA2, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states [B, L, D] of rows without images (stage 1's sums in words)."""
    dev = model.device
    ids = input_ids.to(dev)
    return model.vlm.model(input_ids=ids, attention_mask=attention_mask.to(dev),
                           mm_token_type_ids=torch.zeros_like(ids, dtype=torch.int32), use_cache=False
                           ).last_hidden_state


def lm_loss(model: ChatVLA2, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model.vlm.lm_head(hidden[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(hidden.device),
                           ignore_index=-100)


def lm_losses(model: ChatVLA2, hidden: torch.Tensor, labels: torch.Tensor, continued: Sequence[bool]
              ) -> dict[str, torch.Tensor]:
    """Stage 1's next-token loss, with the rows of `continued_sum_items` apart ("continued"): each scores
    only a few digits (the sum's and the card's), and averaged in with the texts' tokens they would
    weigh next to nothing."""
    rows = torch.tensor(continued, dtype=torch.bool)
    if not rows.any():
        return {"lm": lm_loss(model, hidden, labels)}
    out = {"continued": lm_loss(model, hidden[rows.to(hidden.device)], labels[rows])}
    if not rows.all():
        keep = ~rows
        out["lm"] = lm_loss(model, hidden[keep.to(hidden.device)], labels[keep])
    return out


# --- sampling batches -----------------------------------------------------------------------------------
def robot_item(data: Dataset, e: int, t: int, text_tick: int | None = None) -> Item:
    """Tick `t` of episode `e`, with the reasoning text of `text_tick` (default: its own)."""
    ep = data.episodes[e]
    h = data.profile.chunk_size
    text = ep.reasoning[t if text_tick is None else text_tick]
    return Item(tick_images(ep, t), ep.instruction, text,
                ep.states[t], ep.chunk(t, h), None if ep.places is None else ep.places[t])


def stage1_items(data: Dataset, cfg: TrainConfig, step: int) -> list[Item]:
    rng = np.random.default_rng([cfg.seed, 1, step])
    n_qa = round(cfg.batch_size * cfg.qa_fraction) if data.scenes else 0
    told = [s for s in data.scenes if s.reasoning is not None and s.instruction is not None]
    n_told = min(round(cfg.batch_size * cfg.scene_reasoning_fraction) if told else 0,
                 cfg.batch_size - n_qa - 1)  # keep a robot row: the expert trains in every step
    items = []
    for _ in range(cfg.batch_size - n_qa - n_told):
        e = int(rng.integers(len(data.episodes)))
        items.append(robot_item(data, e, int(rng.integers(len(data.episodes[e].actions)))))
    for _ in range(n_qa):
        s = data.scenes[int(rng.integers(len(data.scenes)))]
        q, a = s.pairs[int(rng.integers(len(s.pairs)))]
        items.append(Item(s.images, q, a, card_pixels=s.card_pixels, card_places=s.card_places))
    for _ in range(max(n_told, 0)):
        s = told[int(rng.integers(len(told)))]
        items.append(Item(s.images, s.instruction or "", s.reasoning or "", reasoning=True, card_pixels=s.card_pixels,
                          card_places=s.card_places))
    return items + arithmetic_scene_items(data, cfg, step) + continued_sum_items(data, cfg, step)


def arithmetic_scene_items(data: Dataset, cfg: TrainConfig, step: int) -> list[Item]:
    """Sums in words asked with a rendered scene's cameras in the prompt (whose board shows other
    numbers). Text-only sums teach adding, but a model that adds in words still writes the nearest
    training sum on a board: with cameras in its prompt it has only ever written sums of training
    numbers. These rows ask for a sum of the written operands while images are there."""
    if not cfg.arithmetic_scenes or not data.scenes:
        return []
    rng = np.random.default_rng([cfg.seed, 4, step])
    items = []
    for _ in range(cfg.arithmetic_scenes):
        s = data.scenes[int(rng.integers(len(data.scenes)))]
        items.append(Item(s.images, *arithmetic_pair(rng, cfg.arithmetic_max)))
    return items


def continued_sum_items(data: Dataset, cfg: TrainConfig, step: int) -> list[Item]:
    """Rows that ask the model to finish a sum it began in its own reasoning, on a robot tick's prompt.

    Why: on a held-out board the model reads the operands right and then writes a training sum
    ("18+23=49."): in every robot row the written operands are the board's, so the answer can be looked
    up from the image instead of added. Here the prompt is a recorded tick's own (instruction + cameras)
    and the reasoning begins with other operands ("68+73="), given and not scored; only the sum's digits
    carry the loss, so they can only come from adding what was written. The text goes on as the task's
    does, "68+73=141. Pick card 141", and the card's number is scored too: a model that adds a held-out
    sum right still wrote a training card after it ("18+23=41. Pick card 44"), having only ever copied
    training numbers there. Operands and sums are never a held-out number (`labels.arithmetic_pair`)."""
    if not cfg.sums_continued or not data.episodes:
        return []
    rng = np.random.default_rng([cfg.seed, 5, step])
    items = []
    for _ in range(cfg.sums_continued):
        ep = data.episodes[int(rng.integers(len(data.episodes)))]
        t = int(rng.integers(len(ep.actions)))
        _, answer = arithmetic_pair(rng, cfg.arithmetic_max)  # "68+73=141."
        total = answer[answer.index("=") + 1:-1]
        text = f"{answer} Pick card {total}"
        spans = ((len(answer) - 1 - len(total), len(answer) - 1), (len(text) - len(total), len(text)))
        items.append(Item(tick_images(ep, t), ep.instruction, text, reasoning=True, scored=spans))
    return items


def arithmetic_items(cfg: TrainConfig, step: int) -> list[tuple[str, str]]:
    """Stage 1's text-only sums for `step`, drawn from (seed, step) like its other rows (resumable)."""
    rng = np.random.default_rng([cfg.seed, 3, step])
    return [arithmetic_pair(rng, cfg.arithmetic_max) for _ in range(cfg.arithmetic)]


# --- optimiser state without pickle ---------------------------------------------------------------------
def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    save_file(tensors or {"_empty": torch.zeros(1)}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(sd["param_groups"]))


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    tensors.pop("_empty", None)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(path.with_suffix(".json").read_text())})


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# --- the trainer ----------------------------------------------------------------------------------------
class Trainer:
    """Runs stage 1 then stage 2 into `out`, resuming from `out/train/` when it exists."""

    def __init__(self, model: ChatVLA2, data: Dataset, out: str | Path, cfg: TrainConfig,
                 *, progress_bars: bool = True) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self.out = Path(out)
        self.state_dir = self.out / STATE_DIR
        self.progress = Progress()
        self.bars = progress_bars
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the heads start the same in a resumed run (then load their state)
            self.probe = PlaceProbe(model.expert.input_action_proj.mlps[0].in_features).to(cfg.device)
            self.card_probe = CardTokenProbe(model.cfg.hidden_size, MAX_NUMBER).to(cfg.device)
            self.card_place_probe = CardPlaceProbe(model.cfg.hidden_size).to(cfg.device)
            self.card_cell_probe = CardCellProbe(model.cfg.hidden_size).to(cfg.device)
        self._t0 = time.monotonic()
        self._seconds0 = 0.0

    # -- persistence --
    def resume(self) -> bool:
        p = self.state_dir / PROGRESS
        if not p.is_file():
            return False
        d = json.loads(p.read_text())
        self.progress = Progress(stage=d["stage"], step=d["step"], history=d["history"], seconds=d["seconds"])
        self._seconds0 = self.progress.seconds
        saved = load_checkpoint(self.state_dir / "model", device=self.cfg.device)
        self.model.load_state_dict(saved.state_dict())
        self.model.expert.set_stats(saved.stats)
        self.model.stats = saved.stats
        for probe, name in self._probes():
            if (self.state_dir / name).is_file():
                probe.load_state_dict(load_file(str(self.state_dir / name)))
        return True

    def _probes(self) -> list[tuple[torch.nn.Module, str]]:
        """The training-only heads and the file each is kept in under `train/` (not in the checkpoint)."""
        return [(self.probe, PROBE), (self.card_probe, CARD_PROBE), (self.card_place_probe, CARD_PLACE_PROBE),
                (self.card_cell_probe, CARD_CELL_PROBE)]

    def _save(self, opt: torch.optim.Optimizer | None) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.model, self.state_dir / "model")
        for probe, name in self._probes():
            save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(self.state_dir / name))
        if opt is not None:
            save_optimizer(opt, self.state_dir / f"optimizer-stage{self.progress.stage}")
        self.progress.seconds = self._seconds0 + time.monotonic() - self._t0
        tmp = self.state_dir / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps({**asdict(self.progress), "config": asdict(self.cfg)}))
        os.replace(tmp, self.state_dir / PROGRESS)

    def _begin(self, stage: int, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """Enters `stage` (at step 0 unless it is the stage being resumed) and returns its optimiser,
        with the saved state of an interrupted run of the same stage."""
        if self.progress.stage < stage:  # a stage before it ended or was skipped (0 steps)
            self.progress.stage, self.progress.step = stage, 0
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        path = self.state_dir / f"optimizer-stage{stage}"  # what `_save` writes during this stage
        if self.progress.step and path.with_suffix(".json").is_file():
            load_optimizer(opt, path)
        return opt

    def _step(self, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        opt.step()

    def _bar(self, total: int, start: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc=desc, disable=not self.bars, dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)

    # -- stage 0 --
    def stage0(self) -> None:
        """The vision tower and `CardTokenProbe` alone, on crops around the rendered scenes' cards
        (`card_crops`): reading the labels before stage 1 asks the decoder to use them."""
        cfg, model = self.cfg, self.model
        if self.progress.stage > 0:
            return
        views = card_views(self.data.scenes) if cfg.card_steps else []
        if cfg.card_steps and not views:
            raise ValueError("stage 0 (card reading) needs rendered math-matching scenes (--scenes): none has cards")
        if views:
            model.train()
            visual = model.vlm.model.visual
            params = [p for p in visual.parameters() if p.requires_grad] + list(self.card_probe.parameters())
            opt = self._begin(0, params, cfg.lr_card)
            ema = None
            bar = self._bar(cfg.card_steps, self.progress.step, "stage 0 (vision tower reads the cards)")
            try:
                for step in range(self.progress.step, cfg.card_steps):
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step, cfg.card_steps, cfg.lr_card, min(cfg.warmup_steps, cfg.card_steps // 10))
                    rng = np.random.default_rng([cfg.seed, 0, step])
                    batch = crop_batch(model.prompts, self.data.scenes, views, rng, cfg.card_batch_size)
                    loss = self.card_probe.loss(vision_tokens(visual, batch.pixel_values, batch.grid_thw),
                                                batch.labels)
                    if loss is not None:  # None only if two cards' centres share every crop's token
                        self._step(opt, params, loss)
                        v = loss.item()
                        ema = v if ema is None else 0.95 * ema + 0.05 * v
                        if step % 10 == 0:
                            self.progress.log("stage0/card", step, v)
                        bar.set_postfix({"card": f"{ema:.3f}"}, refresh=False)
                    bar.update(1)
                    self.progress.step = step + 1
                    if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.card_steps:
                        self._save(opt)
            finally:
                bar.close()
        self.progress.stage, self.progress.step = 1, 0
        if views:
            self._save(None)

    # -- stage 1 --
    def stage1(self) -> None:
        cfg, model = self.cfg, self.model
        if self.progress.stage > 1 or cfg.stage1_steps == 0:
            return
        model.train()
        params = [p for p in model.parameters() if p.requires_grad] + list(self.probe.parameters())
        if cfg.card_token_weight:  # only then: a run started without it resumes its optimiser state
            params += list(self.card_probe.parameters())
        if cfg.card_place_weight:
            params += list(self.card_place_probe.parameters())
        if cfg.card_cell_weight:
            params += list(self.card_cell_probe.parameters())
        opt = self._begin(1, params, cfg.lr_stage1)
        tap = BalanceTap(model)
        vision = VisionTap(model)
        attention = AttentionTap(model, cfg.card_place_layer) if cfg.pointer_weight else None
        ema: dict[str, float] = {}
        bar = self._bar(cfg.stage1_steps, self.progress.step, "stage 1 (VLM + expert)")
        try:
            for step in range(self.progress.step, cfg.stage1_steps):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg.stage1_steps, cfg.lr_stage1, cfg.warmup_steps)
                items = stage1_items(self.data, cfg, step)
                batch = collate(model, items)
                probes: dict[str, torch.Tensor | None] = {}
                if (cfg.card_place_weight or cfg.card_cell_weight) and batch.card_places is not None:
                    hidden, rows = vlm_forward_layer(model, batch, cfg.card_place_layer)
                    if cfg.card_place_weight:
                        probes["card_place"] = self.card_place_probe.loss(rows, batch.card_places)
                    if cfg.card_cell_weight:
                        probes["card_cell"] = self.card_cell_probe.loss(rows, batch.card_places)
                else:
                    hidden = vlm_forward(model, batch)
                losses = lm_losses(model, hidden, batch.labels, [it.scored is not None for it in items])
                losses.update({k: v for k, v in probes.items() if v is not None})
                weights = attention.take() if attention is not None else None
                if weights is not None and batch.pointers:
                    pointer = pointer_loss(weights, batch.pointers, cfg.pointer_head)
                    if pointer is not None:
                        losses["pointer"] = pointer
                if cfg.arithmetic:
                    text = collate_text(model, arithmetic_items(cfg, step))
                    losses["arithmetic"] = lm_loss(model, text_forward(model, text.input_ids, text.attention_mask),
                                                   text.labels)
                    if attention is not None:
                        attention.take()  # its weights are the sums', not the scenes'
                bal = tap.loss()  # the routers balance over every token they routed this step
                if bal is not None:
                    losses["balance"] = bal
                tokens = vision.take()
                if cfg.card_token_weight and batch.card_tokens is not None and tokens is not None:
                    card = self.card_probe.loss(tokens, batch.card_tokens)
                    if card is not None:
                        losses["card"] = card
                if batch.robot_rows:
                    rows = batch.robot_rows
                    pp = pool_spans(hidden[rows], [batch.prompt_spans[i] for i in rows])
                    rp = pool_spans(hidden[rows], [batch.reasoning_spans[i] for i in rows])
                    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                    losses["diffusion"] = diffusion_loss(model, pp, rp, batch.states, batch.chunks, gen)
                    if cfg.place_weight and batch.places is not None:
                        losses["place"] = self.probe.loss(pp, rp, batch.places.to(pp.device),
                                                          batch.stated_places.to(pp.device))
                total = (losses.get("lm", 0.0) + losses.get("arithmetic", 0.0) + losses.get("continued", 0.0)
                         + cfg.diffusion_weight * losses.get("diffusion", 0.0)
                         + cfg.balance_weight * losses.get("balance", 0.0)
                         + cfg.place_weight * losses.get("place", 0.0)
                         + cfg.card_token_weight * losses.get("card", 0.0)
                         + cfg.card_place_weight * losses.get("card_place", 0.0)
                         + cfg.card_cell_weight * losses.get("card_cell", 0.0)
                         + cfg.pointer_weight * losses.get("pointer", 0.0))
                self._step(opt, params, total)
                for k, t in losses.items():
                    v = t.item()
                    ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
                    if step % 10 == 0:
                        self.progress.log(f"stage1/{k}", step, v)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()}, refresh=False)
                self.progress.step = step + 1
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.stage1_steps:
                    self._save(opt)
        finally:
            bar.close()
            tap.close()
            vision.close()
            if attention is not None:
                attention.close()
        self.progress.stage, self.progress.step = 2, 0
        self._save(None)

    # -- stage 2 --
    @torch.no_grad()
    def features(self) -> dict[str, torch.Tensor]:
        """Pooled prompt / reasoning hidden states of every (strided) training tick, with its state and
        chunk; computed once with the frozen VLM and cached in `train/stage2_features.safetensors`.
        A cache of the same VLM over fewer episodes (more recorded since, sorting after the old ones)
        is extended rather than recomputed: the old rows are the new index's first rows."""
        path = self.state_dir / STAGE2_FEATURES
        model, cfg = self.model, self.cfg
        key = features_key(self.data, cfg.stage2_tick_stride, cfg.stage2_old_text, cfg.seed)
        index = text_ticks([len(ep.actions) for ep in self.data.episodes], cfg.stage2_tick_stride,
                           cfg.stage2_old_text, cfg.seed)
        vlm = vlm_digest(model)
        old: dict[str, torch.Tensor] = {}
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                cached = meta.get("key")
                rows = f.get_slice("prompt").get_shape()[0]
            same_vlm = meta.get("vlm") == vlm
            if same_vlm and cached == key:
                return load_file(str(path))
            n = self._cached_prefix(cached, rows) if same_vlm else 0
            if not same_vlm:
                print(f"stage 2: {path} was cached from another VLM's weights; caching again", file=sys.stderr)
            elif n:
                old = load_file(str(path))
                print(f"stage 2: {path} holds the features of the first {n} episodes; caching the other "
                      f"{len(self.data.episodes) - n}", file=sys.stderr)
            else:
                print(f"stage 2: {path} was cached from other episodes or another --stage2-tick-stride, "
                      "--stage2-old-text or --seed (the earlier-text draws depend on them); caching again",
                      file=sys.stderr)
        done = old["prompt"].shape[0] if old else 0
        model.eval()
        new: dict[str, list[torch.Tensor]] = {k: [old[k]] if old else [] for k in FEATURE_NAMES}
        bar = self._bar(len(index), done, "stage 2: caching VLM features")
        bs = 32
        saved_at = time.monotonic()
        for i in range(done, len(index), bs):
            batch = collate(model, [robot_item(self.data, e, t, src) for e, t, src in index[i:i + bs]])
            hidden = vlm_forward(model, batch)
            new["prompt"].append(pool_spans(hidden, batch.prompt_spans).cpu())
            new["reasoning"].append(pool_spans(hidden, batch.reasoning_spans).cpu())
            new["states"].append(batch.states)
            new["chunks"].append(batch.chunks)
            bar.update(len(batch.prompt_spans))
            if cfg.features_save_seconds and time.monotonic() - saved_at >= cfg.features_save_seconds:
                self._save_features_so_far(new, i + len(batch.prompt_spans), vlm)
                saved_at = time.monotonic()
        bar.close()
        feats = {k: torch.cat(v) for k, v in new.items()}
        self._write_features(feats, key, vlm)
        return feats

    def _write_features(self, feats: dict[str, torch.Tensor], key: str, vlm: str) -> None:
        path = self.state_dir / STAGE2_FEATURES
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp), metadata={"key": key, "vlm": vlm})
        os.replace(tmp, path)  # a symlinked cache (another run's) is replaced, never written through

    def _save_features_so_far(self, new: dict[str, list[torch.Tensor]], rows: int, vlm: str) -> None:
        """Caching every tick of a few thousand episodes takes half an hour on a CPU: keep the episodes
        done so far as a cache of those episodes, so a run stopped meanwhile goes on from them (the
        cache of a prefix of the episodes, which `features` extends) instead of from nothing."""
        per_episode = self._rows_per_episode()
        n = int(np.searchsorted(per_episode, rows, side="right"))  # whole episodes among the rows done
        if n == 0 or n == len(per_episode):
            return
        feats = {k: torch.cat(v)[:int(per_episode[n - 1])] for k, v in new.items()}
        self._write_features(feats, self._prefix_key(n), vlm)

    def _cached_prefix(self, key: str | None, rows: int) -> int:
        """How many of this run's first episodes a cache of `rows` rows under `key` was computed from
        (the same stride, texts and seed), or 0 when it is not a prefix of this run's episodes."""
        per_episode = self._rows_per_episode()
        n = int(np.searchsorted(per_episode, rows)) + 1
        if rows <= 0 or n >= len(per_episode) or per_episode[n - 1] != rows:
            return 0
        return n if self._prefix_key(n) == key else 0

    def _rows_per_episode(self) -> np.ndarray:
        """Cumulative count of stage 2's (strided) rows over this run's episodes: where each one's end."""
        stride = self.cfg.stage2_tick_stride
        return np.cumsum([math.ceil(len(ep.actions) / stride) for ep in self.data.episodes])

    def _prefix_key(self, n: int) -> str:
        """`features_key` of this run's first `n` episodes: the key their cache is written and found under."""
        cfg = self.cfg
        return features_key(Dataset(self.data.profile, self.data.episodes[:n]), cfg.stage2_tick_stride,
                            cfg.stage2_old_text, cfg.seed)

    def seed_features(self, init_dir: str | Path) -> bool:
        """Start this run's stage-2 cache from the one in `init_dir` (a run whose checkpoint is where
        this one starts) when this run leaves the VLM as it found it: no stage 0 or stage 1 steps, and
        nothing cached here yet. `features` then keeps only what still fits this run's episodes."""
        src = Path(init_dir) / STATE_DIR / STAGE2_FEATURES
        dst = self.state_dir / STAGE2_FEATURES
        if self.cfg.card_steps or self.cfg.stage1_steps or dst.exists() or not src.is_file():
            return False
        self.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return True

    def stage2(self) -> None:
        cfg, model = self.cfg, self.model
        if cfg.stage2_steps == 0 or self.progress.stage > 2:
            return
        for p in model.vlm.parameters():
            p.requires_grad_(False)
        feats = self.features()
        model.expert.train()
        params = list(model.expert.parameters())
        opt = self._begin(2, params, cfg.lr_stage2)
        n = feats["prompt"].shape[0]
        dev = model.device
        average = self._expert_average()
        ema = None
        bar = self._bar(cfg.stage2_steps, self.progress.step, "stage 2 (expert, VLM frozen)")
        try:
            for step in range(self.progress.step, cfg.stage2_steps):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg.stage2_steps, cfg.lr_stage2, cfg.warmup_steps)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 + step)
                idx = torch.randint(0, n, (cfg.stage2_batch_size,), generator=gen)
                prompt = shuffled_prompts(feats["prompt"], idx, cfg.prompt_shuffle, gen)
                loss = diffusion_loss(model, prompt.to(dev), feats["reasoning"][idx].to(dev),
                                      feats["states"][idx], feats["chunks"][idx], gen)
                self._step(opt, params, loss)
                if average is not None:
                    average.update(model.expert)
                v = loss.item()
                ema = v if ema is None else 0.98 * ema + 0.02 * v
                if step % 10 == 0:
                    self.progress.log("stage2/diffusion", step, v)
                bar.update(1)
                bar.set_postfix({"diffusion": f"{ema:.4f}"}, refresh=False)
                self.progress.step = step + 1
                if (step + 1) % (cfg.save_every * 5) == 0 or step + 1 == cfg.stage2_steps:
                    if average is not None:  # first: the progress that `_save` writes must not run ahead of it
                        average.save(self.state_dir / EXPERT_AVERAGE)
                    self._save(opt)
        finally:
            bar.close()
        if average is not None:
            average.copy_to(model.expert)
        self.progress.stage, self.progress.step = 3, 0
        self._save(None)

    def _expert_average(self) -> WeightAverage | None:
        """Stage 2's weight average (None when `stage2_ema` is 0), with what an interrupted run kept."""
        if not self.cfg.stage2_ema:
            return None
        average = WeightAverage(self.model.expert, self.cfg.stage2_ema)
        path = self.state_dir / EXPERT_AVERAGE
        if self.progress.step and path.is_file():
            average.load(path)
        return average

    def run(self) -> Path:
        """Both stages (after stage 0 when asked for), then the servable checkpoint in `out` (+
        loss_curve.png, train_log.json)."""
        self.stage0()
        self.stage1()
        self.stage2()
        self.model.eval()
        save_checkpoint(self.model, self.out)
        (self.out / "train_log.json").write_text(json.dumps({
            "config": asdict(self.cfg), "history": self.progress.history,
            "seconds": round(self._seconds0 + time.monotonic() - self._t0, 1),
            "episodes": len(self.data.episodes), "ticks": self.data.ticks, "scenes": len(self.data.scenes),
        }, indent=1) + "\n")
        plot_losses(self.progress.history, self.out / "loss_curve.png")
        return self.out


def plot_losses(history: dict[str, list[list[float]]], path: Path) -> None:
    """Loss curves of both stages (log scale), smoothed over 10 points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[train] matplotlib missing: no loss curve (pip install 'chatvla-serve[plot]')", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, stage in zip(axes, ("stage1", "stage2")):
        for name, pts in sorted(history.items()):
            if not name.startswith(stage) or not pts:
                continue
            a = np.asarray(pts, float)
            k = min(10, len(a))
            smooth = np.convolve(a[:, 1], np.ones(k) / k, mode="valid")
            ax.plot(a[k - 1:, 0], smooth, label=name.split("/", 1)[1])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title({"stage1": "stage 1: VLM + expert", "stage2": "stage 2: expert (VLM frozen)"}[stage])
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
