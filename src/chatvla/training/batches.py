"""Samples -> model inputs: prompt + target token ids, pixel patches, and where each part sits.

Prompts are built exactly as the server builds them (`PromptBuilder`: cameras in profile order, then
the instruction) and left-padded as the server pads them, so what the model learns is what it is
served. Pixel patches come from `patchify`, a vectorised copy of the Qwen2-VL image processor for
images already at the processor's size (a test checks it equals the processor); other sizes go
through the processor itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from chatvla.model.chatvla2 import ChatVLA2
from chatvla.model.processor import PreparedPrompt, PromptBuilder
from chatvla.model.tokenizer import IMAGE_PAD
from chatvla.training.labels import IGNORE, NO_CARD, card_token_labels, stated_places


def patchify(builder: PromptBuilder, image: np.ndarray) -> torch.Tensor | None:
    """[H, W, 3] uint8 -> [patches, C*T*P*P] as the processor computes it, or None when the image needs
    resizing (then the caller uses the processor)."""
    ip = builder.image_processor
    p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    h, w = image.shape[:2]
    if h % (p * m) or w % (p * m) or not builder.reasoning.min_pixels <= h * w <= builder.reasoning.max_pixels:
        return None
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
    x = (x - mean) / std
    c, gh, gw = 3, h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)
    return x.reshape(gh * gw, c * t * p * p)


def prepare_fast(model: ChatVLA2, images: Mapping[str, np.ndarray], text: str) -> PreparedPrompt:
    """`model.prepare` with the vectorised patchifier when every image allows it."""
    order = [c for c in (model.camera_order or tuple(images)) if c in images]
    patches = [patchify(model.prompts, images[c]) for c in order]
    if any(x is None for x in patches):
        return model.prepare(images, text)
    builder = model.prompts
    grid = torch.tensor([[1, images[c].shape[0] // builder.image_processor.patch_size,
                          images[c].shape[1] // builder.image_processor.patch_size] for c in order])
    per_image = (grid.prod(dim=1) // builder.merge_size**2).tolist()
    ids = builder.encode_text(builder.prompt_text(len(order), text))
    pad = builder.image_pad_id
    expanded: list[int] = []
    k = 0
    for tok in ids:
        if tok == pad:
            expanded.extend([pad] * int(per_image[k]))
            k += 1
        else:
            expanded.append(tok)
    assert builder.tokenizer.token_to_id(IMAGE_PAD) == pad
    return PreparedPrompt(builder.prompt_text(len(order), text), expanded, torch.cat(patches, 0), grid,
                          [images[c] for c in order], "control")


@dataclass
class Item:
    """One training example: a prompt (images + text) and the text the model should write after it.
    Robot items also carry the state and the action chunk the expert should produce."""

    images: Mapping[str, np.ndarray]
    prompt: str
    target: str
    state: np.ndarray | None = None
    chunk: np.ndarray | None = None  # [H, A] robot units
    places: np.ndarray | None = None  # labels.place_targets of the scene, for the place read-out loss
    reasoning: bool = False  # the target is control reasoning (ends with the end marker) without a chunk
    card_pixels: Mapping[str, Mapping[int, tuple[float, float]]] | None = None  # data.Scene.card_pixels
    card_places: Mapping[int, tuple[float, float]] | None = None  # data.Scene.card_places
    scored: tuple[tuple[int, int], ...] | None = None  # [start, end) spans of `target` that carry the loss; None: all


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    labels: torch.Tensor  # -100 outside the targets
    prompt_spans: list[tuple[int, int]]  # [start, end) of each row's prompt
    reasoning_spans: list[tuple[int, int]]  # rows the expert pools: every target token but the last
    robot_rows: list[int]
    states: torch.Tensor | None  # [R, S] robot units, R = len(robot_rows)
    chunks: torch.Tensor | None  # [R, H, A] robot units
    places: torch.Tensor | None = None  # [R, 5] when every robot row has place targets
    stated_places: torch.Tensor | None = None  # [R, 4] the same places as the text states them
    card_tokens: torch.Tensor | None = None  # [merged vision tokens of the batch] labels.card_token_labels
    card_places: torch.Tensor | None = None  # [same tokens, 2] where the card a token shows lies (m); NaN elsewhere
    pointers: list[Pointer] = field(default_factory=list)  # where the text states a card's place


@dataclass(frozen=True)
class Pointer:
    """In batch row `row`, the rows that write a card's place (each predicts the next token of "(x, y)")
    and the image rows that show that card: what `stages.pointer_loss` asks one attention head to join."""

    row: int
    queries: tuple[int, ...]
    keys: tuple[int, ...]


_CARD_AT = re.compile(r"[Cc]ard (\d+)\b[^()]*?\bat (\(-?\d+, -?\d+\))")


def target_ids(model: ChatVLA2, item: Item) -> list[int]:
    """Robot targets end with the end marker (as the model's reasoning does); answers with <|im_end|>."""
    if item.chunk is not None or item.reasoning:
        return model.prompts.encode_reasoning(item.target)
    return [*model.prompts.encode_text(item.target), model.prompts.eos_id]


def scored_tokens(model: ChatVLA2, item: Item, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[first, end) spans of the target's token ids that carry the loss: all of them, or those that
    spell `item.scored`'s characters (the text before and within a span must encode to a prefix of the
    target's tokens, or the span does not fall on token boundaries and is refused)."""
    if item.scored is None:
        return [(0, len(ids))]
    text, out = item.target.strip(), []
    for a, b in item.scored:
        first, end = (model.prompts.encode_text(text[:k]) for k in (a, b))
        if list(ids[:len(first)]) != first or list(ids[:len(end)]) != end or len(end) <= len(first):
            raise ValueError(f"characters {a}-{b} of {text!r} do not fall on token boundaries")
        out.append((len(first), len(end)))
    return out


def collate(model: ChatVLA2, items: Sequence[Item]) -> Batch:
    prepared = [prepare_fast(model, it.images, it.prompt) for it in items]
    targets = [target_ids(model, it) for it in items]
    seqs = [list(p.input_ids) + t for p, t in zip(prepared, targets)]
    ids, mask, mm, pv, grid, pads = model._batch(seqs, prepared)
    labels = torch.full_like(ids, -100)
    pspans, rspans = [], []
    for i, (p, t) in enumerate(zip(prepared, targets)):
        start, lp = pads[i], len(p.input_ids)
        for a, b in scored_tokens(model, items[i], t):
            labels[i, start + lp + a:start + lp + b] = torch.tensor(t[a:b])
        pspans.append((start, start + lp))
        rspans.append((start + lp, start + lp + max(len(t) - 1, 0)))
    robot = [i for i, it in enumerate(items) if it.chunk is not None]
    states = chunks = places = stated = None
    if robot:
        states = torch.from_numpy(np.stack([np.asarray(items[i].state, np.float32) for i in robot]))
        chunks = torch.from_numpy(np.stack([np.asarray(items[i].chunk, np.float32) for i in robot]))
        if all(items[i].places is not None for i in robot):
            places = torch.from_numpy(np.stack([np.asarray(items[i].places, np.float32) for i in robot]))
            stated = torch.from_numpy(np.stack([stated_places(items[i].places) for i in robot]))
    tokens, token_places = card_token_targets(model, items, prepared)
    pointers = card_pointers(model, items, targets, ids, rspans, tokens) if tokens is not None else []
    return Batch(ids, mask, mm, pv, grid, labels, pspans, rspans, robot, states, chunks, places, stated,
                 tokens, token_places, pointers)


@dataclass
class TextBatch:
    """Rows without images: stage 1's text-only sums (`labels.arithmetic_pair`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 outside the answers


def collate_text(model: ChatVLA2, pairs: Sequence[tuple[str, str]]) -> TextBatch:
    """(question, answer) rows as the chat prompt with no camera, the answer ending with <|im_end|>,
    left-padded like `collate`'s rows."""
    b = model.prompts
    rows = [(b.encode_text(b.prompt_text(0, q)), [*b.encode_text(a), b.eos_id]) for q, a in pairs]
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), model._pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(rows):
        start = width - len(p) - len(t)
        ids[i, start:] = torch.tensor(p + t)
        mask[i, start:] = 1
        labels[i, start + len(p):] = torch.tensor(t)
    return TextBatch(ids, mask, labels)


def place_token_span(model: ChatVLA2, text: str, ids: Sequence[int]) -> tuple[int, int, int] | None:
    """(card N, first, end) for a target text that names card N and then states its place "(x, y)":
    the indices into `ids` (the text's token ids) of the tokens that overlap the place; None when the
    text states no card's place or the tokens do not decode back to it."""
    text = text.strip()  # as `encode_reasoning` encodes it
    m = _CARD_AT.search(text)
    if m is None:
        return None
    decode = model.prompts.tokenizer.decode
    base = decode(list(ids), skip_special_tokens=False).find(text)
    if base < 0:
        return None
    a, b = base + m.start(2), base + m.end(2)
    ends = [len(decode(list(ids[:j + 1]), skip_special_tokens=False)) for j in range(len(ids))]
    starts = [0, *ends[:-1]]
    hit = [j for j in range(len(ids)) if starts[j] < b and ends[j] > a]
    return (int(m.group(1)), hit[0], hit[-1] + 1) if hit else None


def card_pointers(model: ChatVLA2, items: Sequence[Item], targets: Sequence[Sequence[int]], ids: torch.Tensor,
                  rspans: Sequence[tuple[int, int]], tokens: torch.Tensor) -> list[Pointer]:
    """A `Pointer` for each item whose target states the place of a card that its images show at a
    labelled token (`card_token_targets`' `tokens`, in the order of the image rows)."""
    pad = model.prompts.tokenizer.token_to_id(IMAGE_PAD)
    out, offset = [], 0
    for i, (it, t) in enumerate(zip(items, targets)):
        image_rows = torch.nonzero(ids[i] == pad).flatten()
        labels = tokens[offset:offset + len(image_rows)]
        offset += len(image_rows)
        span = place_token_span(model, it.target, t) if it.card_pixels is not None else None
        if span is None:
            continue
        card, first, end = span
        keys = image_rows[labels == card]
        start = rspans[i][0]  # the row of target token j is start + j; the row before it predicts it
        queries = tuple(start + j - 1 for j in range(first, end))
        if len(keys) and queries[0] >= 0:
            out.append(Pointer(i, queries, tuple(int(k) for k in keys)))
    return out


def card_token_targets(model: ChatVLA2, items: Sequence[Item], prepared: Sequence[PreparedPrompt]
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One label per merged vision token of the batch, in the order the vision tower emits them (item
    by item, cameras in prompt order, each camera's tokens row by row), which is also the order of the
    image rows in the decoder's sequence: `labels.card_token_labels` for items that say where their
    cards are, `IGNORE` for the others; None when no item does. Second, [tokens, 2]: the table place
    (task frame, metres) of the card a token shows, for items that give their cards' places; NaN on
    every other token (None when no item gives them)."""
    if all(it.card_pixels is None for it in items):
        return None, None
    merge = model.prompts.merge_size
    out, where = [], []
    for it, p in zip(items, prepared):
        cams = [c for c in (model.camera_order or tuple(it.images)) if c in it.images]  # prompt order
        for cam, image, (t, gh, gw) in zip(cams, p.images, p.image_grid_thw.tolist()):
            grid = (gh // merge, gw // merge)
            if it.card_pixels is None or cam not in it.card_pixels:
                labels = np.full(grid, IGNORE, np.int64)
            else:
                labels = card_token_labels(it.card_pixels[cam], image.shape[:2], grid)
            flat = np.tile(labels.reshape(-1), t)
            xy = np.full((flat.size, 2), np.nan, np.float32)
            known = it.card_places or {}
            for i in np.flatnonzero(flat > NO_CARD):
                if int(flat[i]) in known:
                    xy[i] = known[int(flat[i])]
            out.append(flat)
            where.append(xy)
    xy_all = np.concatenate(where)
    places = torch.from_numpy(xy_all) if np.isfinite(xy_all).any() else None
    return torch.from_numpy(np.concatenate(out)), places


def pool_spans(hidden: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mean of each row's span of `hidden` [B, L, D] -> [B, D]; an empty span gives zeros (as serving)."""
    out = []
    for i, (a, b) in enumerate(spans):
        out.append(hidden[i, a:b].mean(0) if b > a else hidden.new_zeros(hidden.shape[-1]))
    return torch.stack(out)
