"""Configuration of a ChatVLA-2 model: VLM (+ MoE), action expert, sampler, reasoning, robot, stats.

A checkpoint's `config.json` is a Hugging Face Qwen2-VL config (so vLLM can read the VLM part as it
is) with MoE keys in `text_config` and everything else under a `"chatvla"` key. Normalisation stats
travel separately in `stats.json`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from chatvla.profiles import RobotProfile

MoEKind = Literal["dense", "dynamic", "static"]
HF_ARCHITECTURE = "ChatVLA2ForConditionalGeneration"


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts on the decoder MLPs.

    - dynamic (ChatVLA-2): a per-token router (Linear -> top-k -> softmax over the kept logits) over
      `num_routed_experts`, plus `num_shared_experts` always-on experts summed in.
    - static (ChatVLA v1): two MLPs per layer, one for understanding and one for control, chosen per
      request by its task; no router.
    - dense: plain Qwen2-VL MLPs.
    """

    kind: MoEKind = "dynamic"
    num_routed_experts: int = 4
    top_k: int = 2
    num_shared_experts: int = 1
    expert_intermediate_size: int | None = None  # None: the dense MLP's intermediate size
    layers: tuple[int, ...] | None = None  # decoder layers with an MoE MLP; None: all
    static_tasks: tuple[str, ...] = ("understanding", "control")  # static MoE: expert i serves task i
    router_bias: bool = False  # the authors' NoisyTopkRouter is an nn.Linear with a bias

    def __post_init__(self) -> None:
        if self.kind == "dynamic":
            if self.num_routed_experts < 1 or not 1 <= self.top_k <= self.num_routed_experts:
                raise ValueError(f"MoE: need 1 <= top_k ({self.top_k}) <= num_routed_experts")
            if self.num_shared_experts < 0:
                raise ValueError("MoE: num_shared_experts must be >= 0")
        if self.kind == "static" and len(self.static_tasks) < 2:
            raise ValueError("static MoE needs at least two tasks")

    @property
    def num_experts(self) -> int:
        return len(self.static_tasks) if self.kind == "static" else self.num_routed_experts

    def applies_to(self, layer: int) -> bool:
        return self.kind != "dense" and (self.layers is None or layer in self.layers)


# The three MoE variants the issue and papers name. The dynamic ones carry a router bias because the
# authors' router (NoisyTopkRouter.topkroute_linear) is an nn.Linear with one, so their checkpoints
# and our presets share a layout; a zero bias (what seeded init and dense conversion give) routes
# exactly as no bias.
MOE_PAPER = MoEConfig(kind="dynamic", num_routed_experts=8, top_k=2, num_shared_experts=0, router_bias=True)
MOE_AUTHORS_SCRIPTS = MoEConfig(kind="dynamic", num_routed_experts=4, top_k=2, num_shared_experts=1,
                                router_bias=True)
MOE_CHATVLA_V1 = MoEConfig(kind="static", num_routed_experts=2, top_k=1, num_shared_experts=0)
MOE_DENSE = MoEConfig(kind="dense", num_routed_experts=1, top_k=1, num_shared_experts=0)


@dataclass(frozen=True)
class ActionExpertConfig:
    """The DiT diffusion head with reasoning-following conditioning (authors' DiT_L: 24 x 1024, 16 heads)."""

    depth: int = 24
    width: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    chunk_size: int = 50
    action_dim: int = 14
    state_dim: int = 14
    reasoning_layer_id: int | None = None  # None: depth // 2 (the latter half follows the reasoning)
    frequency_embedding_size: int = 256
    # The authors compute the sinusoid frequencies and the embedding in bfloat16; "bfloat16" reproduces
    # their checkpoints exactly, "float32" is the numerically cleaner default.
    timestep_freq_dtype: Literal["float32", "bfloat16"] = "float32"
    # Action dimensions the expert predicts relative to the current state (action - state, in robot
    # units; `stats.json`'s action_min/max then bound those offsets). A chunk of joint targets is a
    # small offset from where the arm is, so predicting the offset is far more precise than predicting
    # absolute angles across the whole joint range. Empty (the authors' layout): absolute actions.
    relative_to_state: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "relative_to_state", tuple(int(i) for i in self.relative_to_state))
        if any(not 0 <= i < min(self.action_dim, self.state_dim) for i in self.relative_to_state):
            raise ValueError("relative_to_state names an action dimension without a matching state dimension")
        if self.width % self.num_heads:
            raise ValueError(f"expert width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.layer_split <= self.depth:
            raise ValueError(f"reasoning_layer_id {self.reasoning_layer_id} outside 0..{self.depth}")

    @property
    def layer_split(self) -> int:
        """Blocks with index >= this follow the reasoning condition."""
        return self.depth // 2 if self.reasoning_layer_id is None else self.reasoning_layer_id


PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class SamplerConfig:
    """DDIM as in the authors' code (diffusers DDIMScheduler settings), eta = 0.

    `prediction_type` is what the head predicts: the noise (`epsilon`, the authors'), the clean chunk
    (`sample`) or diffusers' `v_prediction`. Why not always epsilon: near t = 0 an epsilon loss asks for
    the noise in a sample that is almost clean; a `sample` head regresses the chunk itself at every
    noise level, and on the shipped task's recorded ticks it halved the expert's error where the arm
    holds still before a grasp (docs/model.md, run 21)."""

    num_train_timesteps: int = 100
    beta_schedule: Literal["squaredcos_cap_v2", "linear"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    num_inference_steps: int = 10

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"sampler.prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.beta_schedule not in ("squaredcos_cap_v2", "linear"):
            raise ValueError(f"sampler.beta_schedule {self.beta_schedule!r} is not supported")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError("sampler.num_inference_steps must be in 1..num_train_timesteps")


@dataclass(frozen=True)
class ReasoningConfig:
    """How the VLM is prompted and how long it may write."""

    max_new_tokens: int = 256
    end_marker: str = "Next action:"
    system_prompt: str | None = None  # None: no system turn (the authors' robot prompts have none)
    # Qwen2-VL image processor pixel budget per image (Qwen2-VL-2B default max is 28*28*1280).
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    # The reasoning refresh the action expert was trained to follow, the server's default policy unless
    # its --reasoning-every-* flags say otherwise. An expert trained on each tick's own text (the text
    # decoded for that very observation) wants new text every observation (1, 0); one trained with
    # older text as well (`chatvla train --stage2-old-text`) follows text written once per
    # instruction, and every other chunk can then pre-fill that text instead of decoding its own.
    refresh_every_n: int = 1
    refresh_every_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.refresh_every_n < 1:
            raise ValueError(f"reasoning.refresh_every_n must be >= 1, got {self.refresh_every_n}")
        if not math.isfinite(self.refresh_every_seconds) or self.refresh_every_seconds < 0:
            raise ValueError("reasoning.refresh_every_seconds must be finite and >= 0, "
                             f"got {self.refresh_every_seconds}")


@dataclass(frozen=True)
class NormStats:
    """Actions are min-max normalised to [-1, 1]; states are mean/std normalised.

    `action_min_rows` / `action_max_rows` (optional, [chunk][action_dim]) give every row of a chunk its
    own range. Why one might: an action predicted as an offset from the state spans about `row + 1`
    control steps, so one range for all rows leaves the near rows, which the robot executes first, a
    sliver of [-1, 1]. On the shipped task it did not make the expert more precise (docs/model.md, run
    20); it stays an option of `chatvla train`. `action_min` / `action_max` stay the envelope over all
    rows for anything that reads one range per dimension."""

    action_min: tuple[float, ...]
    action_max: tuple[float, ...]
    state_mean: tuple[float, ...]
    state_std: tuple[float, ...]
    action_min_rows: tuple[tuple[float, ...], ...] | None = None
    action_max_rows: tuple[tuple[float, ...], ...] | None = None

    def check(self, action_dim: int, state_dim: int, chunk_size: int | None = None) -> None:
        if (self.action_min_rows is None) != (self.action_max_rows is None):
            raise ValueError("stats: action_min_rows and action_max_rows come together")
        vectors = [("action_min", self.action_min, action_dim), ("action_max", self.action_max, action_dim),
                   ("state_mean", self.state_mean, state_dim), ("state_std", self.state_std, state_dim)]
        ranges = [(self.action_min, self.action_max, "every action_max must exceed action_min")]
        if self.action_min_rows is not None and self.action_max_rows is not None:
            for name, rows in (("action_min_rows", self.action_min_rows), ("action_max_rows", self.action_max_rows)):
                if chunk_size is not None and len(rows) != chunk_size:
                    raise ValueError(f"stats.{name} has {len(rows)} rows, the model's chunk has {chunk_size}")
                vectors += [(f"{name}[{r}]", row, action_dim) for r, row in enumerate(rows)]
            ranges += [(lo, hi, "every action_max_rows value must exceed its action_min_rows value")
                       for lo, hi in zip(self.action_min_rows, self.action_max_rows)]
        for name, vals, n in vectors:
            if len(vals) != n:
                raise ValueError(f"stats.{name} has {len(vals)} values, the model needs {n}")
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"stats.{name} contains NaN or inf")
        for lo, hi, rule in ranges:
            if any(b <= a for a, b in zip(lo, hi)):
                raise ValueError(f"stats: {rule}")

    @property
    def per_row(self) -> bool:
        return self.action_min_rows is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: list(getattr(self, k)) for k in ("action_min", "action_max", "state_mean", "state_std")}
        if self.action_min_rows is not None and self.action_max_rows is not None:
            d["action_min_rows"] = [list(r) for r in self.action_min_rows]
            d["action_max_rows"] = [list(r) for r in self.action_max_rows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormStats:
        try:
            keys = ("action_min", "action_max", "state_mean", "state_std")
            flat = {k: tuple(float(x) for x in d[k]) for k in keys}
        except KeyError as e:
            raise ValueError(f"stats.json lacks {e.args[0]!r}") from None
        except TypeError:
            raise ValueError("stats.json: action_min/max and state_mean/std must be lists of numbers") from None
        rows: dict[str, tuple[tuple[float, ...], ...]] = {}
        for k in ("action_min_rows", "action_max_rows"):
            if k in d:
                try:
                    rows[k] = tuple(tuple(float(x) for x in r) for r in d[k])
                except TypeError:
                    raise ValueError(f"stats.json: {k} must be a list of lists of numbers") from None
        return cls(**flat, **rows)

    @classmethod
    def from_profile(cls, profile: RobotProfile) -> NormStats:
        """Stats spanning the profile's action limits: what an untrained model is given."""
        lo, hi = profile.action_lower, profile.action_upper
        if profile.state_dim == profile.action_dim:  # state and action share units (joint profiles)
            mean = tuple((a + b) / 2 for a, b in zip(lo, hi))
            std = tuple(max((b - a) / 2, 1e-3) for a, b in zip(lo, hi))
        else:
            mean, std = (0.0,) * profile.state_dim, (1.0,) * profile.state_dim
        return cls(action_min=lo, action_max=hi, state_mean=mean, state_std=std)


@dataclass(frozen=True)
class ChatVLAConfig:
    """Everything needed to build the model; `vlm` is a transformers Qwen2VLConfig as a dict."""

    model_id: str
    vlm: dict[str, Any]
    moe: MoEConfig
    expert: ActionExpertConfig
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)
    profile: RobotProfile | None = None
    init_seed: int | None = None  # set for presets built from a seed (no weights file)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.profile is not None:
            p = self.profile
            if (p.action_dim, p.state_dim, p.chunk_size) != (
                self.expert.action_dim,
                self.expert.state_dim,
                self.expert.chunk_size,
            ):
                raise ValueError(
                    f"robot profile {p.name} is {p.action_dim}-d actions / {p.state_dim}-d state / chunk "
                    f"{p.chunk_size}, but the expert is {self.expert.action_dim} / {self.expert.state_dim} / "
                    f"{self.expert.chunk_size}"
                )
        tc = self.vlm.get("text_config", {})
        if self.moe.layers is not None and any(not 0 <= i < tc.get("num_hidden_layers", 0) for i in self.moe.layers):
            raise ValueError("moe.layers names a decoder layer that does not exist")

    @property
    def hidden_size(self) -> int:
        return int(self.vlm["text_config"]["hidden_size"])

    def with_updates(self, **kw: Any) -> ChatVLAConfig:
        return replace(self, **kw)

    # --- serialisation --------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json: the HF Qwen2-VL config + MoE keys (vLLM reads these) + our own section."""
        d = dict(self.vlm)
        d["architectures"] = [HF_ARCHITECTURE]
        d["model_type"] = "qwen2_vl"
        tc = dict(d.get("text_config", {}))
        moe = self.moe
        if moe.kind != "dense":
            inter = moe.expert_intermediate_size or tc["intermediate_size"]
            tc.update(
                num_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k if moe.kind == "dynamic" else 1,
                moe_intermediate_size=inter,
                shared_expert_intermediate_size=inter * moe.num_shared_experts if moe.kind == "dynamic" else 0,
                norm_topk_prob=True,
                moe_kind=moe.kind,
                router_bias=moe.router_bias,
                mlp_only_layers=[i for i in range(tc["num_hidden_layers"]) if not moe.applies_to(i)],
            )
        d["text_config"] = tc
        d["chatvla"] = {
            "format_version": 1,
            "model_id": self.model_id,
            "moe": _moe_to_dict(self.moe),
            "expert": asdict(self.expert),
            "sampler": asdict(self.sampler),
            "reasoning": asdict(self.reasoning),
            "profile": self.profile.to_dict() if self.profile else None,
            "init_seed": self.init_seed,
            "init_std": self.init_std,
        }
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ChatVLAConfig:
        if "chatvla" not in d:
            raise ValueError("config.json has no 'chatvla' section: not a chatvla-serve checkpoint "
                             "(use `chatvla model import` for the authors' qwen2_vla layout)")
        c = d["chatvla"]
        vlm = {k: v for k, v in d.items() if k != "chatvla"}
        tc = dict(vlm.get("text_config", {}))
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob", "moe_kind", "mlp_only_layers", "router_bias"):
            tc.pop(k, None)
        vlm["text_config"] = tc
        vlm.pop("architectures", None)
        vlm.pop("model_type", None)
        expert = dict(c["expert"])
        return cls(
            model_id=c["model_id"],
            vlm=vlm,
            moe=_moe_from_dict(c["moe"]),
            expert=ActionExpertConfig(**expert),
            sampler=SamplerConfig(**c.get("sampler", {})),
            reasoning=ReasoningConfig(**c.get("reasoning", {})),
            profile=RobotProfile.from_dict(c["profile"]) if c.get("profile") else None,
            init_seed=c.get("init_seed"),
            init_std=float(c.get("init_std", 0.02)),
        )


def _moe_to_dict(m: MoEConfig) -> dict[str, Any]:
    d = asdict(m)
    d["layers"] = list(m.layers) if m.layers is not None else None
    d["static_tasks"] = list(m.static_tasks)
    return d


def _moe_from_dict(d: dict[str, Any]) -> MoEConfig:
    d = dict(d)
    if d.get("layers") is not None:
        d["layers"] = tuple(d["layers"])
    d["static_tasks"] = tuple(d.get("static_tasks", ("understanding", "control")))
    return MoEConfig(**d)
