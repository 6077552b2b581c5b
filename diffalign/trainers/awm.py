"""AWM - Advantage Weighted Matching (METHODS.md section 10).

Online like GRPO, but the update is the pretraining loss itself, weighted by the advantage:
for each rollout's final clean latent ``x0`` draw fresh noise at ``timesteps_per_sample``
stratified times (one batched forward for all of them), form ``x_t`` by the forward process and

    L = mean_d (pred(x_t, t) - target)^2           (velocity eps - x0, or eps / v)
    loss = mean(A * L)

The reference writes it as ``-A exp(l - l_old)`` with ``l = -L``; on-policy that has the same
gradient. Rollouts need no likelihood, so any sampler works, the ODE included (the default).
``guided_loss`` puts the rollout's classifier-free guidance into ``pred`` (the guided
prediction is the one the sampler uses; the reference samples and trains at guidance 1, where
the two agree). Without it, a model sampled with guidance w but trained unguided learns the
guided samples in its conditional branch, and guidance then applies on top of that again.
Advantages are clipped to +-``advantage_clip`` and divided by it (``normalize_by_clip``).
Regularisers: ``kl_beta * mean_d (pred - pred_base)^2`` to the base model (LoRA disabled) and
``ema_kl_beta * mean_d (pred - pred_ema)^2`` to an exponential moving average of the adapter
(updated once per rollout).

A sample's times and noises come from a generator keyed by (seed, rollout, pass, the sample's
global index), so they do not depend on how the samples are split into micro-batches or over
processes (batch ``B`` x accumulation ``A`` trains like ``AB`` x 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from diffalign.config import check
from diffalign.objectives import advantage_weighted_matching_loss
from diffalign.randomness import MATCHING, keyed_generator
from diffalign.rollout import rollout

from . import register_trainer
from .online import OnlineConfig, OnlineTrainer


@dataclass
class AWMConfig(OnlineConfig):
    num_steps: int = 10
    rollout_kind: Literal["ode", "sde"] = "ode"  # AWM needs no likelihood: ODE rollouts by default
    timesteps_per_sample: int = 6  # stratified over [0, 1)
    normalize_by_clip: bool = True  # A <- clip(A, -c, c) / c, as the reference
    kl_beta: float = 0.0
    ema_kl_beta: float = 0.0
    ema_decay: float = 0.9
    guided_loss: bool = False  # the matching loss on the guided prediction (guidance_scale)

    def __post_init__(self):
        super().__post_init__()
        check(self.timesteps_per_sample > 0, "timesteps_per_sample", "must be > 0")
        check(self.kl_beta >= 0 and self.ema_kl_beta >= 0, "kl_beta", "kl_beta and ema_kl_beta must be >= 0")
        check(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
        check(not self.normalize_by_clip or self.advantage_clip is not None, "normalize_by_clip", "needs advantage_clip")


@register_trainer
class AWMTrainer(OnlineTrainer):
    name = "awm"
    config_class = AWMConfig

    def __init__(self, run_config, adapter, accelerator, rewards=None) -> None:
        super().__init__(run_config, adapter, accelerator, rewards)
        self.ema_params = None
        self._passes = 0  # passes made over the current rollout (a key of the matching noise)
        if self.config.ema_kl_beta > 0:
            self.ema_params = [p.detach().clone() for p in adapter.trainable_parameters()]

    # ---- data: rollouts of clean latents with advantages ----------------------------------------

    def collect(self):
        c = self.config
        self._update_ema()
        prompts = self.sample_prompts()
        self.cond = self.adapter.encode_prompt(prompts)
        prompt_index = torch.arange(len(prompts)).repeat_interleave(c.group_size)
        trajectory = rollout(
            self.adapter, self.cond, num_steps=c.num_steps, guidance_scale=c.guidance_scale, sampler=self.sampler,
            step_kinds=c.rollout_kind, prompt_index=prompt_index, decode=True, chunk_size=c.rollout_chunk_size,
            **self.rollout_noise(len(prompt_index)),
        )
        sample_prompts = [prompts[i] for i in trajectory.leaf_prompt_index.tolist()]
        advantages, _ = self.score_samples(trajectory.images, sample_prompts, trajectory.leaf_prompt_index)
        if c.normalize_by_clip:
            advantages = advantages.clamp(-c.advantage_clip, c.advantage_clip) / c.advantage_clip
        self._data_metrics["nfe_per_rollout"] = float(trajectory.nfe)
        self._passes = 0
        x0 = trajectory.final_latents
        n = x0.shape[0]
        return {"x0": x0, "advantage": advantages.to(x0.device), "prompt_index": trajectory.leaf_prompt_index,
                "key": self.accelerator.process_index * n + torch.arange(n, device=x0.device)}

    def make_batches(self, samples):
        n = samples["x0"].shape[0]
        samples = {**samples, "pass": torch.full((n,), self._passes, dtype=torch.long, device=samples["x0"].device)}
        self._passes += 1
        order = torch.randperm(n, generator=self.generator).to(samples["x0"].device)
        size = self.run_config.optimization.batch_size
        return [{k: v[idx] for k, v in samples.items()} for idx in order.split(size)]

    # ---- loss ----------------------------------------------------------------------------------

    def compute_loss(self, batch):
        c = self.config
        adapter = self.adapter
        k = c.timesteps_per_sample
        x0 = batch["x0"].repeat_interleave(k, dim=0)
        # per sample, from its own keyed generator: k stratified times (one in each of k equal
        # strata of [0, 1)) and k noises
        generators = [keyed_generator(self.run_config.seed, MATCHING, self.rollouts, int(p), int(key))
                      for p, key in zip(batch["pass"].tolist(), batch["key"].tolist())]
        u = (torch.arange(k) + torch.stack([torch.rand(k, generator=g) for g in generators])) / k
        t = adapter.timesteps_from_uniform(u.flatten())
        noise = torch.cat([torch.randn((k, *x0.shape[1:]), generator=g) for g in generators]).to(x0.device)
        x_t = adapter.add_noise(x0, noise, t)
        cond = self.cond.select(batch["prompt_index"]).repeat_interleave(k)
        # before the policy forward: it swaps weights in place, which must not happen between
        # a forward and its backward
        guidance = c.guidance_scale if c.guided_loss else 1.0
        ema_pred = self._ema_predict(x_t, t, cond, guidance) if c.ema_kl_beta > 0 else None
        pred = adapter.predict(x_t, t, cond, guidance).float()
        target = adapter.training_target(x0, noise, t).float()
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3)).view(-1, k).mean(dim=1)
        loss = advantage_weighted_matching_loss(per_sample, batch["advantage"])
        metrics = {"matching_loss": per_sample.detach().mean(), "awm_loss": loss.detach()}
        if c.kl_beta > 0:
            with torch.no_grad(), adapter.reference():
                base = adapter.predict(x_t, t, cond, guidance).float()
            kl = (pred - base).pow(2).mean()
            loss = loss + c.kl_beta * kl
            metrics["kl"] = kl.detach()
        if c.ema_kl_beta > 0:
            ema_kl = (pred - ema_pred).pow(2).mean()
            loss = loss + c.ema_kl_beta * ema_kl
            metrics["ema_kl"] = ema_kl.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    # ---- the EMA adapter -----------------------------------------------------------------------

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_params is None:
            return
        for ema, p in zip(self.ema_params, self.adapter.trainable_parameters()):
            ema.lerp_(p.detach(), 1 - self.config.ema_decay)

    @torch.no_grad()
    def _ema_predict(self, x_t, t, cond, guidance: float):
        params = self.adapter.trainable_parameters()
        current = [p.detach().clone() for p in params]
        try:
            for p, ema in zip(params, self.ema_params):
                p.copy_(ema)
            return self.adapter.predict(x_t, t, cond, guidance).float()
        finally:
            for p, value in zip(params, current):
                p.copy_(value)

    def state_dict(self):
        state = super().state_dict()
        if self.ema_params is not None:
            state["ema_params"] = [p.cpu() for p in self.ema_params]
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.ema_params is not None:
            self.ema_params = [p.to(self.adapter.device) for p in state["ema_params"]]
