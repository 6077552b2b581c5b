"""GRPO for diffusion and flow models (Flow-GRPO, DanceGRPO, DDPO) and GRPO-Guard.

One *rollout epoch*: sample ``prompts_per_rollout`` prompts, ``group_size`` images each with a
stochastic sampler (flow models: Flow-GRPO's SDE, CPS or DanceGRPO's; epsilon/v models: DDIM
with eta, i.e. DDPO), score them, turn rewards into group advantages, then train on the stored
transitions with PPO's clipped surrogate for ``inner_epochs`` passes of shuffled mini-batches
(``optimization.batch_size`` transitions each). Classifier-free guidance is recomputed exactly
as in the rollout. Options:

- ``sde_window_size > 0``: the "Fast" variant - SDE only in a random window of steps, ODE
  elsewhere; only window steps are stored and trained.
- ``timestep_fraction`` / ``timestep_selection``: train a fraction of each chain's steps, the
  first ones in order (Flow-GRPO) or a random subset per sample (DanceGRPO, DDPO).
- ``kl_beta``: KL to the reference (the LoRA disabled) ``mean_d (mu - mu_ref)^2 / (2 s^2)``.
- GRPO-Guard: ``ratio_norm`` (per-sample bias; ``ratio_norm_batch_bias`` reproduces the
  reference's batch-wide bias) and ``step_reweight`` (each step's loss divided by ``|dt|``).

Prompts, rewards, group advantages (gathered over processes), the per-prompt tracker, the
micro-batch buffer and held-out evaluation come from :class:`~.online.OnlineTrainer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from diffalign.config import check
from diffalign.objectives import clipped_surrogate, gaussian_kl, ratio_norm_log_ratio, step_reweight, surrogate_stats
from diffalign.rollout import recompute_transition, rollout, transition
from diffalign.trajectory import edge_minibatches

from . import register_trainer
from .online import _WINDOW, OnlineConfig, OnlineTrainer


@dataclass
class GRPOConfig(OnlineConfig):
    # --- "Fast": SDE only in a window of steps
    sde_window_size: int = 0  # SDE only in a window of this many steps (0: every step)
    sde_window_max_start: int | None = None  # window starts uniformly in [0, this] (default: as late as fits)
    # --- policy update
    timestep_fraction: float = 1.0
    timestep_selection: Literal["first", "random"] = "first"
    clip_range: float = 1e-4
    clip_range_high: float | None = None
    kl_beta: float = 0.0
    # --- GRPO-Guard
    ratio_norm: bool = False
    ratio_norm_batch_bias: bool = False  # the reference's batch-wide bias (compatibility only)
    step_reweight: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(0 <= self.sde_window_size <= self.num_steps, "sde_window_size", f"must be in [0, num_steps={self.num_steps}]")
        check(0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]")
        check(self.clip_range > 0, "clip_range", "must be > 0")
        check(self.kl_beta >= 0, "kl_beta", "must be >= 0")
        check(not self.ratio_norm_batch_bias or self.ratio_norm, "ratio_norm_batch_bias", "needs ratio_norm: true")


@register_trainer
class GRPOTrainer(OnlineTrainer):
    name = "grpo"
    config_class = GRPOConfig

    def __init__(self, run_config, adapter, accelerator, rewards=None) -> None:
        super().__init__(run_config, adapter, accelerator, rewards)
        if self.config.ratio_norm and adapter.parameterization != "flow":
            raise ValueError("method.ratio_norm: GRPO-Guard's RatioNorm is defined for flow models (SD3, Flux)")

    # ---- data step: a rollout of chains ---------------------------------------------------------

    def _step_kinds(self) -> list[str]:
        return self.window_step_kinds(self.config.sde_window_size)

    def window_step_kinds(self, size: int) -> list[str]:
        """SDE in a window of ``size`` steps starting uniformly in ``[0, sde_window_max_start]``
        (default: as late as fits), ODE elsewhere; the same window on every process. ``size`` 0:
        the SDE at every step."""
        c = self.config
        if size == 0:
            return ["sde"] * c.num_steps
        latest = c.num_steps - size
        max_start = latest if c.sde_window_max_start is None else min(c.sde_window_max_start, latest)
        start = int(torch.randint(0, max_start + 1, (), generator=self.shared_generator(_WINDOW)))
        return ["sde" if start <= i < start + size else "ode" for i in range(c.num_steps)]

    def collect(self) -> dict[str, torch.Tensor]:
        c = self.config
        prompts = self.sample_prompts()
        self.cond = self.adapter.encode_prompt(prompts)
        trajectory = rollout(
            self.adapter, self.cond, num_steps=c.num_steps, guidance_scale=c.guidance_scale, sampler=self.sampler,
            step_kinds=self._step_kinds(), prompt_index=torch.arange(len(prompts)).repeat_interleave(c.group_size),
            decode=True, chunk_size=c.rollout_chunk_size, **self.rollout_noise(len(prompts) * c.group_size),
        )
        sample_prompts = [prompts[i] for i in trajectory.leaf_prompt_index.tolist()]
        advantages, _ = self.score_samples(trajectory.images, sample_prompts, trajectory.leaf_prompt_index)
        trajectory.set_leaf_advantages(advantages.to(trajectory.final_latents.device))
        self.trajectory = trajectory
        edges = self._training_edges(trajectory)
        edges["dt"] = trajectory.dt[edges["step"]]
        self._data_metrics["nfe_per_rollout"] = float(trajectory.nfe)
        return edges

    def make_batches(self, edges: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return edge_minibatches(edges, self.run_config.optimization.batch_size, self.generator)

    def _training_edges(self, trajectory) -> dict[str, torch.Tensor]:
        """The transitions to train on: ``timestep_fraction`` of each chain's stochastic steps."""
        c = self.config
        steps = trajectory.trainable_steps()
        keep = max(1, math.ceil(len(steps) * c.timestep_fraction))
        if c.timestep_selection == "first":
            return trajectory.edges(steps[:keep])
        edges = trajectory.edges(steps)
        return edges if keep == len(steps) else self._random_subset(edges, keep)

    def _random_subset(self, edges, keep: int) -> dict[str, torch.Tensor]:
        """Per sample, a random ``keep`` of its trainable steps (DanceGRPO / DDPO)."""
        nodes = edges["node"]
        n_samples = int(nodes.max()) + 1
        steps = edges["step"].unique()
        scores = torch.rand(n_samples, len(steps), generator=self.generator)
        chosen = scores.argsort(dim=1)[:, :keep]  # column indices into `steps`
        mask = torch.zeros(n_samples, len(steps), dtype=torch.bool).scatter_(1, chosen, True)
        column = torch.searchsorted(steps, edges["step"])
        selected = mask.to(nodes.device)[nodes, column.to(nodes.device)]
        return {k: v[selected] for k, v in edges.items()}

    # ---- loss ----------------------------------------------------------------------------------

    def compute_loss(self, batch):
        c = self.config
        adapter = self.adapter
        cond = self.cond.select(batch["prompt_index"])
        pred = adapter.predict(batch["x"], batch["t"], cond, self.trajectory.guidance_scale)
        logp, mean = recompute_transition(adapter, self.trajectory.levels, batch, pred, self.sampler)
        advantages = batch["advantage"]
        if c.ratio_norm:
            log_ratio = ratio_norm_log_ratio(
                logp, batch["logp_old"], mean, batch["mean_old"], batch["std"], per_sample=not c.ratio_norm_batch_bias
            )
        else:
            log_ratio = logp - batch["logp_old"]
        zeros = torch.zeros_like(log_ratio)
        per_sample = clipped_surrogate(log_ratio, zeros, advantages, c.clip_range, c.clip_range_high)
        if c.step_reweight:
            per_sample = step_reweight(per_sample, batch["dt"])
        loss = per_sample.mean()
        metrics = {"policy_loss": loss.detach()}
        if c.kl_beta > 0:
            with torch.no_grad(), adapter.reference():
                ref_pred = adapter.predict(batch["x"], batch["t"], cond, self.trajectory.guidance_scale)
                ref_mean = transition(adapter, self.trajectory.levels, batch["step"], batch["x"], ref_pred, "sde",
                                      self.sampler, x_next=batch["x_next"]).mean
            kl = gaussian_kl(mean, ref_mean, batch["std"]).mean()
            loss = loss + c.kl_beta * kl
            metrics["kl"] = kl.detach()
        stats = surrogate_stats(log_ratio.detach(), zeros, advantages, c.clip_range, c.clip_range_high)
        metrics.update({k: v for k, v in stats.items() if k in ("ratio_mean", "ratio_min", "ratio_max", "clip_frac", "approx_kl")})
        ratio = log_ratio.detach().exp()
        metrics["ratio_std"] = ratio.std() if ratio.numel() > 1 else 0.0
        for step in batch["step"].unique().tolist():
            metrics[f"ratio_by_step/{step:02d}"] = ratio[batch["step"] == step].mean()
        metrics["loss"] = loss.detach()
        return loss, metrics
