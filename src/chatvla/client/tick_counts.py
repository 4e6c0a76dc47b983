"""What a tick was: the one definition of "stalled" and "safety-clamped" that every report uses.

`chatvla inspect` counts from an episode file, `chatvla demo` from the live control loop, and the
episode viewer marks ticks; they used to disagree (the demo took the executor's counter, which leaves
out the start-up ticks, while inspect counted every tick without an action, start-up included, so one
episode showed 0 stalls in one and 7 in the other). Both now reduce a tick to the same two facts,
whether the executor had an action and which safety interventions fired, and classify it here:

* start-up tick: the executor had no action yet because the first chunk has not arrived; the arm
  holds where it is. Every episode has a few; they measure the first round trip, not a stall.
* stalled tick: after the first action, the executor's queue ran dry and the arm held. This is the
  number that should be 0 (the executor's `ExecutorStats.stalls` counts exactly these).
* safety-clamped tick: the safety filter changed or replaced what the policy proposed (clipped to a
  joint or gripper limit or to the step limit, refused a non-finite action, or its watchdog held or
  stopped the arm). The filter's `stall_hold` is not a clamp: it is how the arm holds on a start-up or
  stalled tick, which are counted above.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatvla.client.safety import STALL_HOLD

OK, STARTUP, STALLED = "ok", "startup", "stalled"


def tick_statuses(no_action: Iterable[bool]) -> list[str]:
    """Per tick, `STARTUP`, `STALLED` or `OK`, from whether the executor had no action on that tick
    (the episode file's `stall` field, the loop's `proposed is None`)."""
    out: list[str] = []
    started = False
    for dry in no_action:
        if not dry:
            started = True
            out.append(OK)
        else:
            out.append(STALLED if started else STARTUP)
    return out


def is_clamped(interventions: Iterable[str]) -> bool:
    """Whether the safety filter changed or replaced the policy's action on a tick (see the module doc)."""
    return any(name != STALL_HOLD for name in interventions)


@dataclass(frozen=True)
class TickCounts:
    """Counts over an episode (or several, added with `+`)."""

    ticks: int = 0
    startup_ticks: int = 0
    stalled_ticks: int = 0
    safety_clamped_ticks: int = 0
    safety: dict[str, int] = field(default_factory=dict)  # ticks on which each intervention fired

    def __add__(self, other: TickCounts) -> TickCounts:
        safety = Counter(self.safety) + Counter(other.safety)
        return TickCounts(
            ticks=self.ticks + other.ticks,
            startup_ticks=self.startup_ticks + other.startup_ticks,
            stalled_ticks=self.stalled_ticks + other.stalled_ticks,
            safety_clamped_ticks=self.safety_clamped_ticks + other.safety_clamped_ticks,
            safety=dict(sorted(safety.items())),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "startup_ticks": self.startup_ticks,
            "stalled_ticks": self.stalled_ticks,
            "safety_clamped_ticks": self.safety_clamped_ticks,
            "safety": dict(self.safety),
        }


def count_ticks(no_action: Sequence[bool], interventions: Sequence[Sequence[str]]) -> TickCounts:
    """Classify and count ticks; `no_action[i]` and `interventions[i]` describe the same tick."""
    if len(no_action) != len(interventions):
        raise ValueError(f"{len(no_action)} stall flags for {len(interventions)} ticks")
    statuses = tick_statuses(no_action)
    safety = Counter(name for names in interventions for name in set(names))
    return TickCounts(
        ticks=len(statuses),
        startup_ticks=statuses.count(STARTUP),
        stalled_ticks=statuses.count(STALLED),
        safety_clamped_ticks=sum(is_clamped(names) for names in interventions),
        safety=dict(sorted(safety.items())),
    )


class TickCounter:
    """A control-loop observer collecting the two facts per tick, so a live run (the demo) counts exactly
    what `chatvla inspect` counts from the file the same run wrote."""

    def __init__(self) -> None:
        self.no_action: list[bool] = []
        self.interventions: list[tuple[str, ...]] = []

    def on_tick(self, record: Any) -> None:  # a chatvla.client.runtime.TickRecord
        self.no_action.append(record.proposed is None)
        self.interventions.append(tuple(record.decision.interventions))

    def counts(self) -> TickCounts:
        return count_ticks(self.no_action, self.interventions)
