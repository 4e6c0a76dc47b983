"""ChatVLA-2: the VLM that writes reasoning, plus the action expert that follows it. Batched.

    prepare(images, instruction)           -> PreparedPrompt      (CPU, per observation)
    reason([prepared])                     -> [ReasoningOutput]   greedy decoding, stops at the end marker
    prefill([prepared], [reasoning])       -> [ReasoningOutput]   no decoding: re-use given reasoning
    sample_actions([outputs], states, seeds) -> [B, H, A] actions in robot units

Hidden-state convention (the authors' inference code and vLLM's capture agree on it): the prompt
rows are the last-layer (post-norm) hidden states of the prompt tokens; the reasoning rows are those
of the generated tokens that were fed back, i.e. all reasoning tokens but the last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from chatvla.model.action_expert import ActionExpert, mean_pool
from chatvla.model.config import ChatVLAConfig, NormStats
from chatvla.model.processor import PreparedPrompt, PromptBuilder
from chatvla.model.tokenizer import PAD_TOKEN
from chatvla.model.vlm import build_vlm, moe_blocks


@dataclass
class ReasoningOutput:
    text: str  # for people: special tokens and end marker removed
    token_ids: list[int]  # the reasoning tokens (generated, or given to prefill)
    prompt_token_ids: list[int]
    prompt_hidden: torch.Tensor = field(repr=False)  # [prompt_len, hidden]
    reasoning_hidden: torch.Tensor = field(repr=False)  # [max(len(token_ids) - 1, 0), hidden]
    decoded: bool = True

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the action expert consumes: the token means of both streams."""
        return mean_pool(self.prompt_hidden), mean_pool(self.reasoning_hidden)


class StopRule:
    """Where reasoning ends: at a stop token (inclusive), or once the decoded tail ends with the end
    marker (inclusive of the token that completes it). One definition for every engine: the torch
    engine applies it while decoding, the vLLM engine to the ids it streams."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: set[int], marker: str) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.marker = marker
        self.tail = max(4, len(marker))  # a marker spans at most one token per character

    def _marker_at(self, ids: Sequence[int], n: int) -> bool:
        tail = list(ids[max(0, n - self.tail):n])
        return bool(self.marker) and self.tokenizer.decode(tail, skip_special_tokens=True).endswith(self.marker)

    def length(self, ids: Sequence[int], start: int = 1) -> int | None:
        """Where generation ended (checking prefixes of length >= start), or None if it has not."""
        for n in range(max(1, start), len(ids) + 1):
            if ids[n - 1] in self.stop_ids or self._marker_at(ids, n):
                return n
        return None

    def ended(self, ids: Sequence[int]) -> bool:
        """Has this row ended? Cheap enough to call after every decoding step: stop tokens anywhere,
        the marker only at the newest token (earlier steps already checked earlier prefixes)."""
        return bool(ids) and (any(t in self.stop_ids for t in ids) or self._marker_at(ids, len(ids)))


class _StopCriteria(StoppingCriteria):
    """transformers' per-row stopping hook around `StopRule`."""

    def __init__(self, prompt_len: int, rule: StopRule, step_hook: Callable[[], None] | None = None) -> None:
        self.prompt_len = prompt_len
        self.rule = rule
        self.step_hook = step_hook

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.step_hook is not None:
            self.step_hook()  # between tokens: the server may run other work here
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(input_ids[:, self.prompt_len:].tolist()):
            done[i] = self.rule.ended(row)
        return done


class ChatVLA2(nn.Module):
    def __init__(self, cfg: ChatVLAConfig, tokenizer: Tokenizer, stats: NormStats | None = None,
                 *, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.vlm = build_vlm(cfg, device=device)
        vc = cfg.vlm["vision_config"]
        self.prompts = PromptBuilder(
            tokenizer,
            cfg.reasoning,
            merge_size=vc.get("spatial_merge_size", 2),
            patch_size=vc.get("patch_size", 14),
            temporal_patch_size=vc.get("temporal_patch_size", 2),
        )
        with torch.device(device):
            self.expert = ActionExpert(cfg.expert, cfg.sampler, cfg.hidden_size)
        if cfg.init_seed is not None and torch.device(device).type != "meta":
            from chatvla.model.vlm import init_weights

            init_weights(self.expert, seed=cfg.init_seed + 1, std=cfg.init_std)
        if stats is None and cfg.profile is not None:
            stats = NormStats.from_profile(cfg.profile)
        if stats is not None:
            self.expert.set_stats(stats)
        self.stats = stats
        self._moe = moe_blocks(self.vlm)
        tok = tokenizer
        self.stop_rule = StopRule(tokenizer, {self.prompts.eos_id, self.prompts.pad_id},
                                  cfg.reasoning.end_marker)
        self._pad_id = tok.token_to_id(PAD_TOKEN)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.expert.policy_head.x_embedder.weight.device

    @property
    def camera_order(self) -> tuple[str, ...]:
        return self.cfg.profile.camera_names if self.cfg.profile else ()

    # --- preprocessing ----------------------------------------------------------------------------------
    def prepare(self, images: Mapping[str, np.ndarray], instruction: str, task: str = "control",
                camera_order: Sequence[str] | None = None) -> PreparedPrompt:
        order = tuple(camera_order) if camera_order is not None else (self.camera_order or tuple(images))
        return self.prompts.prepare(images, order, instruction, task)

    def _task_routes(self, prepared: Sequence[PreparedPrompt]) -> torch.Tensor | None:
        if self.cfg.moe.kind != "static":
            return None
        tasks = self.cfg.moe.static_tasks
        try:
            return torch.tensor([tasks.index(p.task) for p in prepared], dtype=torch.long)
        except ValueError:
            bad = next(p.task for p in prepared if p.task not in tasks)
            raise ValueError(f"task {bad!r} has no expert; this model's tasks are {list(tasks)}") from None

    def _set_routes(self, routes: torch.Tensor | None) -> torch.Tensor | None:
        """Route the static MoE by task; returns the previous routes, so nested calls can restore them."""
        prev = getattr(self, "_routes", None)
        self._routes = routes
        for b in self._moe:
            b.route_by_task = routes
        return prev

    def _batch(self, seqs: Sequence[Sequence[int]], prepared: Sequence[PreparedPrompt]):
        """Left-pad token rows and concatenate the images of the batch in row order."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
        dev = self.device
        dtype = self.vlm.model.visual.patch_embed.proj.weight.dtype
        pv = torch.cat([p.pixel_values for p in prepared], 0).to(dev, dtype)
        grid = torch.cat([p.image_grid_thw for p in prepared], 0).to(dev)
        # Token types (0 text, 1 image) let transformers compute Qwen2-VL's 3-D M-RoPE positions;
        # without them it silently falls back to 1-D positions for image tokens.
        mm_types = (ids == self.prompts.image_pad_id).to(torch.int32)
        return ids.to(dev), mask.to(dev), mm_types.to(dev), pv, grid, [width - len(s) for s in seqs]

    # --- reasoning ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reason(
        self, prepared: Sequence[PreparedPrompt], max_new_tokens: int | None = None,
        step_hook: Callable[[], None] | None = None,
    ) -> list[ReasoningOutput]:
        """Greedy reasoning for a batch; stops per row at <|im_end|> or the end marker, or at the bound.
        `step_hook` runs after every generated token (the server's yield point)."""
        if not prepared:
            return []
        n_new = int(max_new_tokens or self.cfg.reasoning.max_new_tokens)
        ids, mask, mm_types, pv, grid, pads = self._batch([p.input_ids for p in prepared], prepared)
        width = ids.shape[1]
        captured: list[torch.Tensor] = []
        capturing = [True]

        def capture(_m, _i, out: torch.Tensor) -> None:
            if capturing[0]:
                captured.append(out.detach())

        def between_tokens() -> None:
            # Work run here (the server's waiting batches) uses the model too: keep its forward
            # passes out of this decode's captured rows, and give back the M-RoPE offsets this
            # generation cached on the language model (a nested forward pass recomputes them).
            capturing[0] = False
            rope_deltas = self.vlm.model.rope_deltas
            try:
                step_hook()  # type: ignore[misc]
            finally:
                self.vlm.model.rope_deltas = rope_deltas
                capturing[0] = True

        hook = self.vlm.model.language_model.norm.register_forward_hook(capture)
        stop = _StopCriteria(width, self.stop_rule, between_tokens if step_hook is not None else None)
        prev_routes = self._set_routes(self._task_routes(prepared))
        try:
            out = self.vlm.generate(
                input_ids=ids,
                attention_mask=mask,
                mm_token_type_ids=mm_types,
                pixel_values=pv,
                image_grid_thw=grid,
                max_new_tokens=n_new,
                min_new_tokens=1,
                do_sample=False,
                num_beams=1,
                eos_token_id=sorted(self.stop_rule.stop_ids),
                pad_token_id=self._pad_id,
                stopping_criteria=StoppingCriteriaList([stop]),
                return_dict_in_generate=True,
            )
        finally:
            hook.remove()
            self._set_routes(prev_routes)
        seqs = out.sequences[:, width:].tolist()
        prefill = captured[0]
        steps = torch.cat(captured[1:], dim=1) if len(captured) > 1 else prefill[:, :0]
        results = []
        for i, p in enumerate(prepared):
            n = self.stop_rule.length(seqs[i]) or len(seqs[i])
            toks = seqs[i][:n]
            results.append(
                ReasoningOutput(
                    text=self.prompts.reasoning_text(toks),
                    token_ids=toks,
                    prompt_token_ids=list(p.input_ids),
                    prompt_hidden=prefill[i, pads[i]:].float().cpu(),
                    reasoning_hidden=steps[i, : max(n - 1, 0)].float().cpu(),
                    decoded=True,
                )
            )
        return results

    @torch.no_grad()
    def prefill(
        self, prepared: Sequence[PreparedPrompt], reasoning: Sequence[str | Sequence[int]]
    ) -> list[ReasoningOutput]:
        """One forward pass over prompt + given reasoning: the same outputs as `reason`, no decoding."""
        if len(prepared) != len(reasoning):
            raise ValueError("prefill needs one reasoning per prompt")
        if not prepared:
            return []
        r_ids = [self.prompts.encode_reasoning(r) if isinstance(r, str) else list(r) for r in reasoning]
        seqs = [list(p.input_ids) + r for p, r in zip(prepared, r_ids)]
        ids, mask, mm_types, pv, grid, pads = self._batch(seqs, prepared)
        prev_routes = self._set_routes(self._task_routes(prepared))
        try:
            hs = self.vlm.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types, pixel_values=pv,
                                image_grid_thw=grid, use_cache=False).last_hidden_state
        finally:
            self._set_routes(prev_routes)
        results = []
        for i, (p, r) in enumerate(zip(prepared, r_ids)):
            start, lp = pads[i], len(p.input_ids)
            results.append(
                ReasoningOutput(
                    text=self.prompts.reasoning_text(r),
                    token_ids=r,
                    prompt_token_ids=list(p.input_ids),
                    prompt_hidden=hs[i, start:start + lp].float().cpu(),
                    reasoning_hidden=hs[i, start + lp:start + lp + max(len(r) - 1, 0)].float().cpu(),
                    decoded=False,
                )
            )
        return results

    # --- actions ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(
        self,
        pooled: Sequence[tuple[torch.Tensor, torch.Tensor]] | Sequence[ReasoningOutput],
        states: np.ndarray | torch.Tensor,
        seeds: Sequence[int | None] | None = None,
        noise: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Action chunks [B, H, A] in robot units. Pass `seeds` (per-sample noise) or explicit `noise`."""
        pairs = [p.pooled() if isinstance(p, ReasoningOutput) else p for p in pooled]
        b = len(pairs)
        c = self.cfg.expert
        if noise is None:
            if seeds is None:
                raise ValueError("sample_actions needs one seed per sample (or explicit noise)")
            return self.expert.sample_pooled(pairs, states, seeds)
        prompt = torch.stack([p for p, _ in pairs])
        reas = torch.stack([r for _, r in pairs])
        st = torch.as_tensor(np.asarray(states, dtype=np.float32)).reshape(b, c.state_dim)
        return self.expert.sample(prompt, reas, st, noise).cpu().numpy()
