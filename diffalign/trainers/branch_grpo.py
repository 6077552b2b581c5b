"""BranchGRPO - tree-structured rollouts (METHODS.md section 9).

Each prompt gets ONE initial noise; the SDE runs as a tree that gives every node ``branching``
children (independent noise) at the ``split_steps``, so ``branching ** len(split_steps)`` leaves
share their early denoising steps (fewer network evaluations than as many chains). Then:

- **reward fusion**: a node's value is the mean of its leaves' rewards (``fusion: mean``) or a
  softmax over its children's edge log-probs times ``fusion_alpha`` (``logprob_softmax``);
- **depth-wise advantages**: within each tree, node values are z-scored among the nodes of the
  same depth (a spread below 1e-6 gives 0); every edge takes its child's advantage;
- **pruning** cuts backward passes, not rollouts: ``depth_pruning`` skips the edges of chosen
  steps (``depth_window`` trains only a window of steps that slides by one step per rollout);
  ``width_pruning`` keeps, after the last split, only the leaf chains with the largest
  ``|advantage|`` in each tree (``top_fraction``) or the global best and worst quarters
  (``best_worst``);
- **Mix**: ``mix_window > 0`` runs the SDE only in a window of that many steps plus the split
  steps, and the ODE elsewhere; only stochastic edges are trained. The window starts uniformly
  in ``[0, sde_window_max_start]`` (default: anywhere it fits), as GRPO's "Fast" window does.

The loss is GRPO's single-transition clipped surrogate on shuffled edges (every GRPO option,
including GRPO-Guard's, applies). Unlike the reference, split steps record the std actually
applied (``split_noise_scale`` included), so their log-probabilities are right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from diffalign.config import check
from diffalign.rollout import rollout

from . import register_trainer
from .grpo import GRPOConfig, GRPOTrainer


@dataclass
class BranchGRPOConfig(GRPOConfig):
    num_steps: int = 20
    sampler: Literal["auto", "ddim", "flow_grpo", "dance", "cps"] = "dance"
    noise_level: float = 0.3
    clip_range: float = 1e-3
    split_steps: list[int] = field(default_factory=lambda: [0, 3, 6, 9])
    branching: int = 2
    split_noise_scale: float = 1.0
    fusion: Literal["mean", "logprob_softmax"] = "mean"
    fusion_alpha: float = 1.0
    depth_pruning: list[int] = field(default_factory=list)  # steps whose edges are not trained
    depth_window: int | None = None  # train only this many consecutive steps, sliding per rollout
    width_pruning: Literal["none", "top_fraction", "best_worst"] = "none"
    width_keep_fraction: float = 0.5
    mix_window: int = 0  # BranchGRPO-Mix: SDE only in this many steps (+ splits), ODE elsewhere

    def __post_init__(self):
        # group_size is the number of leaves per tree; it follows from the branching
        self.group_size = self.branching ** len(self.split_steps)
        super().__post_init__()
        check(self.branching > 1, "branching", "must be > 1")
        check(len(self.split_steps) > 0, "split_steps", "needs at least one split step")
        check(all(0 <= s < self.num_steps for s in self.split_steps), "split_steps", f"must lie in 0..{self.num_steps - 1}")
        check(len(set(self.split_steps)) == len(self.split_steps), "split_steps", "must be distinct")
        check(self.split_noise_scale > 0, "split_noise_scale", "must be > 0")
        check(0 < self.width_keep_fraction <= 1, "width_keep_fraction", "must be in (0, 1]")
        check(self.depth_window is None or self.depth_window > 0, "depth_window", "must be > 0 or null")
        check(0 <= self.mix_window <= self.num_steps, "mix_window", f"must be in [0, {self.num_steps}]")
        check(self.sde_window_size == 0, "sde_window_size", "use mix_window for BranchGRPO-Mix")
        check(not self.per_prompt_tracker, "per_prompt_tracker", "BranchGRPO uses depth-wise advantages")


@register_trainer
class BranchGRPOTrainer(GRPOTrainer):
    name = "branch_grpo"
    config_class = BranchGRPOConfig

    def __init__(self, run_config, adapter, accelerator, rewards=None) -> None:
        super().__init__(run_config, adapter, accelerator, rewards)
        self.sampler.split_noise_scale = self.config.split_noise_scale

    def _step_kinds(self) -> list[str]:
        return self.window_step_kinds(self.config.mix_window)

    def collect(self):
        c = self.config
        prompts = self.sample_prompts()
        self.cond = self.adapter.encode_prompt(prompts)
        trajectory = rollout(
            self.adapter, self.cond, num_steps=c.num_steps, guidance_scale=c.guidance_scale, sampler=self.sampler,
            step_kinds=self._step_kinds(), branching={s: c.branching for s in c.split_steps},
            prompt_index=torch.arange(len(prompts)), decode=True, chunk_size=c.rollout_chunk_size,
            **self.rollout_noise(len(prompts)),
        )
        sample_prompts = [prompts[i] for i in trajectory.leaf_prompt_index.tolist()]
        # the group advantages are only logged; BranchGRPO trains on depth-wise ones
        _, leaf_rewards = self.score_samples(trajectory.images, sample_prompts, trajectory.leaf_prompt_index)
        leaf_rewards = leaf_rewards.to(trajectory.final_latents.device)
        trajectory.advantages = depth_wise_advantages(trajectory, leaf_rewards, c.fusion, c.fusion_alpha)
        self.trajectory = trajectory
        edges = trajectory.edges(self._trained_steps(trajectory))
        edges = self._width_prune(trajectory, edges)
        edges["dt"] = trajectory.dt[edges["step"]]
        self._data_metrics["nfe_per_rollout"] = float(trajectory.nfe)
        self._data_metrics["trained_edges"] = float(edges["x"].shape[0])
        return edges

    def _trained_steps(self, trajectory) -> list[int]:
        c = self.config
        steps = [s for s in trajectory.trainable_steps() if s not in c.depth_pruning]
        if c.depth_window is not None and len(steps) > c.depth_window:
            start = self.rollouts % (len(steps) - c.depth_window + 1)
            steps = steps[start : start + c.depth_window]
        if not steps:
            raise ValueError("method.depth_pruning: every trainable step is pruned")
        return steps

    def _width_prune(self, trajectory, edges):
        """After the last split, keep only some leaf chains (pruning backward passes)."""
        c = self.config
        if c.width_pruning == "none":
            return edges
        leaf_adv = trajectory.advantages[-1]
        trees = trajectory.leaf_prompt_index
        keep = torch.zeros_like(leaf_adv, dtype=torch.bool)
        if c.width_pruning == "top_fraction":
            for tree in trees.unique():
                members = (trees == tree).nonzero().squeeze(1)
                k = max(1, round(c.width_keep_fraction * members.numel()))
                keep[members[leaf_adv[members].abs().argsort(descending=True)[:k]]] = True
        else:  # best and worst quarters over the whole batch
            quarter = max(1, leaf_adv.numel() // 4)
            order = leaf_adv.argsort()
            keep[order[:quarter]] = True
            keep[order[-quarter:]] = True
        last_split = max(c.split_steps)
        after = edges["step"] > last_split
        selected = ~after | keep[edges["node"]]  # after the last split, nodes are leaf chains
        return {k: v[selected] for k, v in edges.items()}


def depth_wise_advantages(trajectory, leaf_rewards: torch.Tensor, fusion: str = "mean", alpha: float = 1.0) -> list[torch.Tensor]:
    """Per step, the advantage of every edge: its child's value z-scored within (tree, depth)."""
    values = fused_node_values(trajectory, leaf_rewards, fusion, alpha)
    advantages = []
    for level in range(1, len(trajectory.latents)):
        v = values[level]
        tree = trajectory.prompt_index[level]
        advantages.append(_zscore_by_group(v, tree))
    return advantages


def fused_node_values(trajectory, leaf_rewards: torch.Tensor, fusion: str = "mean", alpha: float = 1.0) -> list[torch.Tensor]:
    """Node values per level, bottom-up from the leaves' rewards."""
    if fusion == "mean":
        return [trajectory.node_values(level, leaf_rewards) for level in range(len(trajectory.latents))]
    values = [None] * len(trajectory.latents)
    values[-1] = leaf_rewards.float()
    for level in range(len(trajectory.latents) - 1, 0, -1):
        parents = trajectory.parents[level]
        n_parents = trajectory.latents[level - 1].shape[0]
        logp = trajectory.logp_old[level - 1]
        if logp is None:  # a deterministic step: one child per parent
            logits = torch.zeros_like(values[level])
        else:
            logits = alpha * logp.float()
        # softmax over each parent's children
        top = torch.full((n_parents,), -torch.inf, device=logits.device).scatter_reduce(0, parents, logits, "amax")
        weights = (logits - top[parents]).exp()
        norm = torch.zeros(n_parents, device=logits.device).index_add_(0, parents, weights)
        weights = weights / norm[parents]
        values[level - 1] = torch.zeros(n_parents, device=logits.device).index_add_(0, parents, weights * values[level])
    return values


def _zscore_by_group(values: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(v - mean_g) / std_g`` per group (population std); groups with std < eps give 0."""
    _, inverse = groups.unique(return_inverse=True)
    n = int(inverse.max()) + 1
    count = torch.zeros(n, device=values.device).index_add_(0, inverse, torch.ones_like(values))
    mean = torch.zeros(n, device=values.device).index_add_(0, inverse, values) / count
    var = torch.zeros(n, device=values.device).index_add_(0, inverse, (values - mean[inverse]) ** 2) / count
    std = var.sqrt()
    z = (values - mean[inverse]) / std[inverse].clamp(min=eps)
    return torch.where(std[inverse] < eps, torch.zeros_like(z), z)
