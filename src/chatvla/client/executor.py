"""The tick-indexed chunk executor: turns a stream of late, overlapping action chunks into one action per
control tick.

Why it exists: a chunk answering the observation of tick `t` reaches the robot several ticks later.
Executing it from its first row (what a synchronous broker does) replays the past and makes the arm wait;
LeRobot's async client drops past rows but asks for the next chunk from a fixed queue-fill threshold and
averages overlaps with fixed weights, which jerks at every chunk boundary. Here:

* row `i` of a chunk answering tick `t` belongs to tick `t + i`; rows for ticks already executed are
  dropped, so a late (or superseded) chunk only ever contributes its still-future ticks;
* the next `frozen_ticks` queued ticks are committed (RTC-style) and never rewritten by a new chunk;
* the rest of the overlap is blended (replace / constant weight / linear crossfade);
* the next observation is requested when the queue is about to become shorter than a high quantile of
  the measured round trips (in ticks) plus the frozen and blend ticks, so the new chunk lands before the
  queue runs dry *and* overlaps it enough to blend;
* when the queue does run dry, `pop` returns None and a stall is counted; the caller holds the last
  safe command.

The executor does no I/O and reads no clock: every time is passed in, so it is deterministic under a
fake clock and cheap enough to run in the control thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import numpy as np

from chatvla.profiles import RobotProfile

BlendMode = Literal["replace", "weighted", "crossfade"]
BLEND_MODES: tuple[str, ...] = ("replace", "weighted", "crossfade")

# How many sent requests are remembered to map a reply's seq back to the tick we captured it at.
_SENT_HISTORY = 256


@dataclass(frozen=True)
class ExecutorConfig:
    """How chunks are merged and when the next observation is requested."""

    blend: BlendMode = "crossfade"
    # `weighted` only: share of the already-queued action kept on overlapping ticks.
    old_weight: float = 0.5
    # `crossfade` only: ramp length in ticks; 0 = the whole non-frozen overlap, but at least a quarter
    # of a chunk. Where the ramp runs past the end of the queue, the offset between the queue and the
    # new chunk at the queue's last tick is what fades out, so a chunk landing with little or no
    # overlap still joins the executed trajectory without a step.
    crossfade_ticks: int = 0
    # Queued ticks right after "now" that a new chunk may not change (they are committed).
    frozen_ticks: int = 2
    # Ticks of overlap (beyond the frozen ones) we aim to leave for blending when a chunk lands.
    blend_ticks: int = 3
    # The request lead is this quantile of recent round trips, so that most replies land in time.
    latency_quantile: float = 0.95
    latency_window: int = 50
    # Safety margin on top of the latency quantile, in ticks.
    margin_ticks: int = 1
    # Round-trip guess before anything was measured; None = half a chunk's duration.
    initial_latency_s: float | None = None
    # A request with no reply after this long is presumed lost and another may be sent;
    # None = 1.5 x the latency quantile + 2 ticks. Presuming too early costs one redundant request (the
    # server keeps only the newest per session); too late costs stall ticks.
    request_timeout_s: float | None = None
    # Requests in flight at once (the session start tells chatvla-serve this value; it takes up to 3
    # per session by default). Raise it to 2-3 when the latency is mostly the network (a robot on Wi-Fi
    # or a WAN): the next observations then travel while the previous one is answered, and latencies
    # above half a chunk run without stalls (3 for about 60% of a chunk). When the latency is mostly
    # the model's compute, more in flight gains nothing: requests are paced so that none queues
    # behind our own previous one on the server (benchmarks/control_loop_served.py measures both).
    max_in_flight: int = 1
    # Fewest ticks between two requests when several may be in flight (caps the request rate by
    # giving up blend overlap first, never the latency cover).
    min_spacing_ticks: int = 2

    def __post_init__(self) -> None:
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {self.blend!r}")
        if not 0.0 <= self.old_weight <= 1.0:
            raise ValueError("old_weight must be in [0, 1]")
        if not 0.0 < self.latency_quantile <= 1.0:
            raise ValueError("latency_quantile must be in (0, 1]")
        if (
            min(self.frozen_ticks, self.blend_ticks, self.margin_ticks, self.crossfade_ticks, self.min_spacing_ticks)
            < 0
        ):
            raise ValueError("tick counts must be >= 0")
        if self.latency_window < 1 or self.max_in_flight < 1:
            raise ValueError("latency_window and max_in_flight must be >= 1")


def executor_config_from(settings: Sequence[str], base: ExecutorConfig | None = None) -> ExecutorConfig:
    """`base` (default: the defaults) with "name=value" settings applied, as a command line gives them
    (`chatvla eval --executor blend=replace`), so the blending and request timing can be tried on
    the sim without code. Values take the type of the field's default ("none" clears an optional
    one); a name that is not a field or a value that does not parse raises ValueError naming it."""
    kinds = {f.name: str(f.type) for f in fields(ExecutorConfig)}
    changes: dict[str, object] = {}
    for item in settings:
        name, sep, raw = item.partition("=")
        name, raw = name.strip().replace("-", "_"), raw.strip()
        if not sep or name not in kinds:
            raise ValueError(f"executor setting {item!r}: expected NAME=VALUE with NAME one of {', '.join(kinds)}")
        kind = kinds[name]
        try:
            if "None" in kind and raw.lower() == "none":
                changes[name] = None
            elif kind.startswith("int"):
                changes[name] = int(raw)
            elif kind.startswith("float"):
                changes[name] = float(raw)
            else:
                changes[name] = raw
        except ValueError:
            raise ValueError(f"executor setting {item!r}: {raw!r} is not a valid {kind}") from None
    try:
        return replace(base or ExecutorConfig(), **changes)  # __post_init__ checks the ranges
    except ValueError as e:
        raise ValueError(f"executor settings {' '.join(settings)}: {e}") from None


def executor_settings(config: ExecutorConfig) -> dict[str, object]:
    """The fields of `config` that differ from the defaults (what a report should say was changed)."""
    default = ExecutorConfig()
    return {f.name: getattr(config, f.name) for f in fields(ExecutorConfig)
            if getattr(config, f.name) != getattr(default, f.name)}


@dataclass
class ExecutorStats:
    """Counters for dashboards and benchmarks. `stalls` only counts ticks after the first action:
    waiting for the very first chunk is start-up, not a stall."""

    ticks: int = 0
    executed: int = 0
    stalls: int = 0
    startup_ticks: int = 0
    requests_sent: int = 0
    requests_failed: int = 0
    requests_timed_out: int = 0
    chunks_received: int = 0
    chunks_unused: int = 0  # every row was already in the past
    chunks_out_of_order: int = 0  # answered an older observation than one already merged
    chunks_unknown: int = 0  # seq we never sent (or forgot); merged only if its tick is plausible
    actions_dropped_past: int = 0
    actions_kept_frozen: int = 0
    actions_blended: int = 0
    actions_appended: int = 0
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=1000))

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = {k: v for k, v in vars(self).items() if k != "latencies_s"}
        if self.latencies_s:
            arr = np.asarray(self.latencies_s)
            d["latency_p50_ms"] = float(np.percentile(arr, 50) * 1000)
            d["latency_p99_ms"] = float(np.percentile(arr, 99) * 1000)
        return d


@dataclass(frozen=True)
class ChunkMerge:
    """What one chunk contributed; returned so callers (watchdog, recording) know if it was fresh."""

    seq: int
    tick: int
    used: int  # rows that now shape the queue (blended or appended or filled frozen gaps)
    dropped_past: int
    kept_frozen: int
    blended: int
    appended: int
    out_of_order: bool

    @property
    def fresh(self) -> bool:
        return self.used > 0 and not self.out_of_order


@dataclass
class _Sent:
    tick: int
    sent_at: float
    timed_out: bool = False


class ChunkExecutor:
    """Per-robot action queue indexed by control tick. Not thread-safe: one control loop owns it."""

    def __init__(self, profile: RobotProfile, config: ExecutorConfig | None = None) -> None:
        self.profile = profile
        self.config = config or ExecutorConfig()
        self.dt = profile.dt
        self.stats = ExecutorStats()
        self._next_tick: int | None = None  # first tick not yet executed
        self._plan = np.zeros((0, profile.action_dim))  # row j is for tick _next_tick + j
        self._newest_seq = -1  # seq of the newest observation whose chunk was merged
        self._sent: OrderedDict[int, _Sent] = OrderedDict()
        self._in_flight: set[int] = set()
        self._latencies: deque[float] = deque(maxlen=self.config.latency_window)
        # From servers that report their own time per chunk: seconds the server worked on one
        # observation (its total minus its queue wait), and the network share of the round trip.
        self._server_busy: deque[float] = deque(maxlen=self.config.latency_window)
        self._network: deque[float] = deque(maxlen=self.config.latency_window)
        self._server_free_at: float | None = None  # when the server will be done with our requests
        self._last_request_tick: int | None = None
        self._started = False
        self._last_action: np.ndarray | None = None  # the arm holds this while the queue is dry
        self._last_action_tick = -1

    # ---- queue -----------------------------------------------------------------------------------
    @property
    def next_tick(self) -> int | None:
        return self._next_tick

    def queued(self, tick: int) -> int:
        """Actions available for ticks >= `tick`."""
        if self._next_tick is None:
            return 0
        return max(0, self._next_tick + len(self._plan) - max(tick, self._next_tick))

    def planned(self) -> tuple[int | None, np.ndarray]:
        """(first tick, rows) of the queue, a copy: for recording and plots."""
        return self._next_tick, self._plan.copy()

    def pop(self, tick: int) -> np.ndarray | None:
        """The action for `tick`, or None (a stall) if the queue has none. Ticks may be skipped (an
        overrunning loop): actions of skipped ticks are discarded, never executed late."""
        self.stats.ticks += 1
        self._advance_to(tick)
        self._next_tick = tick + 1
        if len(self._plan) == 0:
            if self._started:
                self.stats.stalls += 1
            else:
                self.stats.startup_ticks += 1
            return None
        action, self._plan = self._plan[0].copy(), self._plan[1:]
        self._last_action, self._last_action_tick = action, tick
        self._started = True
        self.stats.executed += 1
        return action

    def _advance_to(self, tick: int) -> None:
        if self._next_tick is None:
            self._next_tick = tick
            return
        if tick < self._next_tick:
            raise ValueError(f"tick {tick} was already executed (next is {self._next_tick})")
        skip = tick - self._next_tick
        if skip:
            dropped = min(skip, len(self._plan))
            self.stats.actions_dropped_past += dropped
            self._plan = self._plan[skip:]
            self._next_tick = tick

    # ---- requests --------------------------------------------------------------------------------
    def latency_estimate_s(self) -> float:
        """The configured quantile of recent round trips (or the initial guess before any reply)."""
        if not self._latencies:
            guess = self.config.initial_latency_s
            return self.profile.chunk_duration_s / 2 if guess is None else guess
        return float(np.quantile(np.asarray(self._latencies), self.config.latency_quantile))

    def latency_ticks(self) -> int:
        return math.ceil(self.latency_estimate_s() / self.dt - 1e-9)

    def lead_ticks(self) -> int:
        """Covered ticks ahead at which the next observation is due: the latency quantile plus margin
        (so the reply lands before the queue is dry), plus frozen and blend ticks (so it overlaps the
        queue), the latter given up first when requests would come closer than `min_spacing_ticks`."""
        c = self.config
        cover = self.latency_ticks() + c.margin_ticks
        wanted = cover + c.frozen_ticks + c.blend_ticks
        return max(cover, min(wanted, self.profile.chunk_size - c.min_spacing_ticks))

    def covered_until(self, tick: int) -> int:
        """First tick not covered by the queue nor by a chunk still in flight (if it arrives)."""
        end = tick if self._next_tick is None else max(tick, self._next_tick + len(self._plan))
        for seq in self._in_flight:
            end = max(end, self._sent[seq].tick + self.profile.chunk_size)
        return end

    def _timeout_s(self) -> float:
        if self.config.request_timeout_s is not None:
            return self.config.request_timeout_s
        return 1.5 * self.latency_estimate_s() + 2 * self.dt

    def should_request(self, tick: int, now: float) -> bool:
        """True if an observation captured at `tick` should be sent now."""
        self._expire(now)
        if len(self._in_flight) >= self.config.max_in_flight:
            return False
        if self._last_request_tick is not None and tick <= self._last_request_tick:
            return False
        if self._in_flight and not self._server_free_by_arrival(now):
            return False
        return self.covered_until(tick) - tick <= self.lead_ticks()

    def _server_free_by_arrival(self, now: float) -> bool:
        """With a request in flight, would a new one reach the server only after it has finished the
        previous one? If not, the new one would queue behind ours and age there, and the longer
        latency it measured would make us ask earlier still. Servers that report no timings: True."""
        if not self._server_busy or self._server_free_at is None:
            return True
        return now + self._one_way_s() >= self._server_free_at

    def _busy_s(self) -> float:
        return float(np.median(np.asarray(self._server_busy)))

    def _one_way_s(self) -> float:
        return float(np.median(np.asarray(self._network))) / 2

    def _expire(self, now: float) -> None:
        timeout = self._timeout_s()
        for seq in list(self._in_flight):
            s = self._sent[seq]
            if now - s.sent_at > timeout:
                s.timed_out = True
                self._in_flight.discard(seq)
                self.stats.requests_timed_out += 1

    def on_request_sent(self, seq: int, tick: int, now: float) -> None:
        self._sent[seq] = _Sent(tick, now)
        while len(self._sent) > _SENT_HISTORY:
            self._sent.popitem(last=False)
        self._in_flight.add(seq)
        self._last_request_tick = tick
        if self._server_busy:
            arrives = now + self._one_way_s()
            self._server_free_at = max(arrives, self._server_free_at or arrives) + self._busy_s()
        self.stats.requests_sent += 1

    def on_request_failed(self, seq: int, now: float) -> None:
        """The connection reported that `seq` will never be answered: free its slot at once."""
        if seq in self._in_flight:
            self._in_flight.discard(seq)
            self.stats.requests_failed += 1

    # ---- merging ---------------------------------------------------------------------------------
    def add_chunk(
        self, actions: np.ndarray, *, seq: int, now: float, tick: int | None = None,
        server_s: tuple[float, float] | None = None,
    ) -> ChunkMerge:
        """Merge the chunk answering observation `seq`. The tick is the one recorded when `seq` was
        sent; the server's echo (`tick`) is used only for a seq we do not know. `server_s` is the
        server's (total, queue) seconds for it, if it reports them: they pace pipelined requests."""
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.profile.action_dim or a.shape[0] == 0:
            raise ValueError(f"chunk must be [n>0, {self.profile.action_dim}], got {list(a.shape)}")
        self.stats.chunks_received += 1
        sent = self._sent.get(seq)
        if sent is not None:
            obs_tick = sent.tick
            self._latencies.append(now - sent.sent_at)
            self.stats.latencies_s.append(now - sent.sent_at)
            self._in_flight.discard(seq)
            if server_s is not None:
                total, queue = server_s
                self._server_busy.append(max(0.0, total - queue))
                self._network.append(max(0.0, now - sent.sent_at - total))
                # The server finished this one just now (one way ago); any of ours behind it started then.
                behind = sum(1 for s in self._in_flight if s > seq)
                self._server_free_at = now - self._one_way_s() + behind * self._busy_s()
        else:
            self.stats.chunks_unknown += 1
            if tick is None:
                return self._note_unused(seq, -1, len(a), out_of_order=False)
            obs_tick = tick
        if self._next_tick is None:
            self._next_tick = obs_tick
        if obs_tick > self._next_tick:
            # A reply cannot answer an observation from the future; refuse rather than guess.
            return self._note_unused(seq, obs_tick, 0, out_of_order=False)

        past = self._next_tick - obs_tick
        new = a[past:]
        out_of_order = seq < self._newest_seq
        if out_of_order:
            self.stats.chunks_out_of_order += 1
        if len(new) == 0:
            return self._note_unused(seq, obs_tick, min(past, len(a)), out_of_order)

        old = self._plan
        n_old, n_new = len(old), len(new)
        k = min(self.config.frozen_ticks, n_old)  # frozen ticks that exist in the queue
        if out_of_order:
            # Older information than what is queued: only fill ticks nothing newer covers.
            merged = np.concatenate([old, new[n_old:]])
            kept, blended = 0, 0
        elif n_new <= k:
            merged, kept, blended = old, k, 0
        elif n_old == 0 and self._last_action is not None and self.config.blend == "crossfade":
            merged, kept, blended = self._join_dry_queue(a, obs_tick, new), 0, 0
        else:
            ov = min(n_old, n_new)
            # A newer chunk shorter than the queue ends the plan where it ends: the older tail was
            # planned from staler information and would join it with a step.
            merged = np.concatenate([old[:k], self._blend(old, new, k)])
            kept, blended = k, ov - k
        if not out_of_order:
            self._newest_seq = seq
        appended = max(0, n_new - n_old)
        self._plan = merged
        self.stats.actions_dropped_past += min(past, len(a))
        self.stats.actions_kept_frozen += kept
        self.stats.actions_blended += blended
        self.stats.actions_appended += appended
        return ChunkMerge(
            seq=seq,
            tick=obs_tick,
            used=blended + appended,
            dropped_past=min(past, len(a)),
            kept_frozen=kept,
            blended=blended,
            appended=appended,
            out_of_order=out_of_order,
        )

    def _note_unused(self, seq: int, tick: int, dropped: int, out_of_order: bool) -> ChunkMerge:
        self.stats.chunks_unused += 1
        self.stats.actions_dropped_past += dropped
        return ChunkMerge(seq, tick, 0, dropped, 0, 0, 0, out_of_order)

    def _join_dry_queue(self, chunk: np.ndarray, obs_tick: int, new: np.ndarray) -> np.ndarray:
        """Crossfade onto a chunk that lands on an empty queue. If the last action ran on the previous
        tick (the queue just ran out), compare it with the chunk's row for that same tick, so the arm
        keeps its motion; after a stall the arm holds still, so join its held pose."""
        assert self._last_action is not None and self._next_tick is not None
        prev = self._next_tick - 1
        if self._last_action_tick == prev and prev >= obs_tick:
            offset = self._last_action - chunk[prev - obs_tick]
        elif self._last_action_tick < prev:
            offset = self._last_action - new[0]
        else:
            return new.copy()
        return self._fade(new, np.broadcast_to(offset, new.shape), overlap=0)

    def _blend(self, old: np.ndarray, new: np.ndarray, k: int) -> np.ndarray:
        """Rows `k:` of the merged plan (`old[:k]` is frozen). `old` is the queue, `new` the chunk, both
        starting at the next tick; requires len(new) > k."""
        ov = min(len(old), len(new))
        mode = self.config.blend
        if mode == "replace" or len(old) == 0:
            return new[k:].copy()
        if mode == "weighted":
            w = self.config.old_weight
            return np.concatenate([w * old[k:ov] + (1.0 - w) * new[k:ov], new[ov:]])
        # Crossfade as a fading offset: on the overlap, old - new; past the queue's end, the offset seen
        # on its last tick (the queue "continued" parallel to the new chunk).
        span = len(new) - k
        overlap = max(0, ov - k)
        offset = np.empty((span, new.shape[1]))
        offset[:overlap] = old[k:ov] - new[k:ov]
        if overlap < span:
            last = len(old) - 1
            offset[overlap:] = old[last] - new[last]
        return self._fade(new[k:], offset, overlap)

    def _fade(self, new: np.ndarray, offset: np.ndarray, overlap: int) -> np.ndarray:
        ramp = self.config.crossfade_ticks or max(overlap, self.profile.chunk_size // 4, 1)
        # The new chunk's weight rises linearly and reaches 1 on the last ramp tick: no step at the end.
        w_old = np.maximum(0.0, 1.0 - np.arange(1, len(new) + 1) / ramp)[:, None]
        return new + w_old * offset
