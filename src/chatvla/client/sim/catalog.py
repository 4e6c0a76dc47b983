"""What the tasks are made of, and which part of it each split may use.

The held-out split tests generalisation the way the ChatVLA-2 paper does: numbers and toys that never
appear anywhere in a training episode (not on a card, not on the whiteboard, not as a distractor).
The splits are fixed rules rather than random draws so that they cannot drift between releases: data
recorded today stays a valid training set for tomorrow's held-out evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")

# --- numbers --------------------------------------------------------------------------------------------
MAX_NUMBER = 49  # two digits keep the card labels legible at 224x224
ALL_NUMBERS: tuple[int, ...] = tuple(range(1, MAX_NUMBER + 1))
HELDOUT_NUMBERS: tuple[int, ...] = tuple(n for n in ALL_NUMBERS if n % 6 == 5)  # 5, 11, 17, ... 47
TRAIN_NUMBERS: tuple[int, ...] = tuple(n for n in ALL_NUMBERS if n % 6 != 5)


def numbers(split: Split) -> tuple[int, ...]:
    """Numbers a split may show on a card (and, for training, anywhere at all)."""
    return TRAIN_NUMBERS if split == "train" else HELDOUT_NUMBERS


# --- toys -----------------------------------------------------------------------------------------------
Shape = Literal["box", "sphere", "cylinder", "capsule", "ellipsoid"]


@dataclass(frozen=True)
class Toy:
    """A graspable primitive. `size` is MuJoCo's geom size; `rest_z` is the height of the centre when
    the toy stands on the table, which the success checks compare against."""

    name: str
    shape: Shape
    size: tuple[float, ...]
    rgba: tuple[float, float, float, float]

    @property
    def rest_z(self) -> float:
        if self.shape in ("box", "ellipsoid"):
            return self.size[2]
        if self.shape == "sphere":
            return self.size[0]
        if self.shape == "cylinder":
            return self.size[1]
        return self.size[0] + self.size[1]  # upright capsule: radius + half-length

    @property
    def footprint_radius(self) -> float:
        """Radius of a circle that covers the toy seen from above (used to keep toys apart)."""
        if self.shape in ("box", "ellipsoid"):
            return (self.size[0] ** 2 + self.size[1] ** 2) ** 0.5
        return self.size[0]


_RED, _BLUE, _GREEN = (0.85, 0.12, 0.12, 1.0), (0.15, 0.3, 0.85, 1.0), (0.15, 0.65, 0.2, 1.0)
_YELLOW, _PURPLE, _ORANGE = (0.95, 0.8, 0.1, 1.0), (0.55, 0.2, 0.7, 1.0), (0.95, 0.5, 0.1, 1.0)
_TEAL, _BROWN, _PINK, _CYAN = (
    (0.0, 0.5, 0.5, 1.0),
    (0.45, 0.28, 0.12, 1.0),
    (0.95, 0.45, 0.7, 1.0),
    (0.3, 0.85, 0.95, 1.0),
)

TRAIN_TOYS: tuple[Toy, ...] = (
    Toy("red cube", "box", (0.022, 0.022, 0.022), _RED),
    Toy("blue ball", "sphere", (0.025,), _BLUE),
    Toy("green cylinder", "cylinder", (0.022, 0.03), _GREEN),
    Toy("yellow block", "box", (0.02, 0.035, 0.02), _YELLOW),
    Toy("purple pillar", "box", (0.018, 0.018, 0.035), _PURPLE),
    Toy("orange puck", "cylinder", (0.03, 0.012), _ORANGE),
)
# Two shapes never seen in training (egg, bar) and two colour/shape pairs never seen in training.
HELDOUT_TOYS: tuple[Toy, ...] = (
    Toy("teal egg", "ellipsoid", (0.032, 0.024, 0.02), _TEAL),
    Toy("brown bar", "box", (0.018, 0.045, 0.015), _BROWN),
    Toy("pink cube", "box", (0.022, 0.022, 0.022), _PINK),
    Toy("cyan cylinder", "cylinder", (0.022, 0.03), _CYAN),
)


def toys(split: Split) -> tuple[Toy, ...]:
    return TRAIN_TOYS if split == "train" else HELDOUT_TOYS


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return split  # type: ignore[return-value]
