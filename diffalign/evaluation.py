"""Held-out evaluation: generate with fixed seeds (ODE sampling) and score with reward plugins.

Used by every trainer's ``evaluate`` hook and by ``diffalign evaluate``. The same prompts and
seeds every time, so numbers are comparable across steps, runs and methods.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from diffalign.rollout import generate


def build_eval_rewards(spec: dict[str, dict], device=None, tiny: bool = False, what: str = "method.eval_rewards") -> dict:
    """``{key: {name: plugin, **options}}`` (``name`` defaults to the key) -> built rewards;
    errors name ``what.key``."""
    from diffalign.train import make_reward

    rewards = {}
    for key, options in spec.items():
        options = dict(options or {})
        rewards[key] = make_reward(options.pop("name", key), options, tiny, f"{what}.{key}")
        if device is not None:
            rewards[key].to(device)
    return rewards


class HeldOutEvaluation:
    """A trainer's held-out evaluation: fixed prompts and seeds, its eval rewards and (as
    ``train_<name>``) the rewards it trains on, so reward hacking shows up next to held-out
    metrics the policy never saw. Build it with :meth:`from_options` from a method's
    ``eval_prompts`` / ``eval_rewards`` / ``eval_max_prompts`` options."""

    def __init__(self, prompts: list[str], rewards: dict) -> None:
        self.prompts = prompts
        self.rewards = rewards

    @classmethod
    def from_options(cls, prompts, reward_spec: dict, *, max_prompts: int | None = None, device=None,
                     tiny: bool = False, train_rewards=None) -> "HeldOutEvaluation | None":
        """None when ``prompts`` is None (evaluation disabled)."""
        if prompts is None:
            return None
        from diffalign.prompts import load_prompts

        rewards = build_eval_rewards(reward_spec, device, tiny)
        if train_rewards is not None:  # a MultiReward
            rewards.update({f"train_{name}": model for name, model in zip(train_rewards.names, train_rewards.rewards)})
        return cls(load_prompts(prompts, "method.eval_prompts")[:max_prompts], rewards)

    @torch.no_grad()
    def run(self, adapter, *, num_steps: int, guidance_scale: float, images_per_prompt: int = 1,
            process_index: int = 0) -> dict[str, float]:
        # every process evaluates every prompt with its own seeds; the loop averages over processes
        return evaluate_prompts(adapter, self.prompts, self.rewards, num_steps=num_steps, guidance_scale=guidance_scale,
                                images_per_prompt=images_per_prompt, seed=1234 + 7919 * process_index)


@torch.no_grad()
def evaluate_prompts(
    adapter,
    prompts: list[str],
    rewards: dict,
    *,
    num_steps: int,
    guidance_scale: float,
    images_per_prompt: int = 1,
    seed: int = 1234,
    batch_size: int = 32,
    resolution: int | None = None,
    return_images: bool = False,
    predict_fn=None,
) -> dict:
    """Mean of every reward over ``prompts`` x ``images_per_prompt`` fixed-seed images.

    World prompts also get per-kind means (``shapes/relation`` ...) and the verifier's met-rate
    of each requirement type (``world_met/relation`` ...: which part of the prompts the model
    gets wrong), whatever the rewards. Returns a flat metrics
    dict (plus ``images`` and per-image ``scores`` when ``return_images``). ``predict_fn``
    replaces the adapter's prediction (e.g. :class:`diffalign.rlg.RLGuidance`).
    """
    all_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    scores: dict[str, list[torch.Tensor]] = defaultdict(list)
    kinds = _world_kinds(prompts)  # None unless every prompt is a world prompt
    met = _RequirementRates() if kinds is not None else None
    images_out = []
    for start in range(0, len(all_prompts), batch_size):
        chunk = all_prompts[start : start + batch_size]
        # seeds depend on the position only: the same images whatever the batch size
        noise = torch.cat([
            adapter.initial_noise(1, resolution, resolution, generator=torch.Generator().manual_seed(seed + start + i))
            for i in range(len(chunk))
        ])
        images = generate(adapter, chunk, num_steps=num_steps, guidance_scale=guidance_scale, noise=noise,
                          predict_fn=predict_fn)
        for key, reward in rewards.items():
            scores[key].append(reward.score(images, chunk).float().cpu())
        if met is not None:
            met.add(images, chunk)
        if return_images:
            images_out.append(images.cpu())
    metrics = {}
    per_image = {key: torch.cat(values) for key, values in scores.items()}
    for key, values in per_image.items():
        metrics[key] = values.mean().item()
        metrics[f"{key}_std"] = values.std().item() if values.numel() > 1 else 0.0
    if kinds is not None:
        _add_world_kinds(metrics, per_image, [k for k in kinds for _ in range(images_per_prompt)])
    if met is not None:
        metrics.update(met.rates())
    if return_images:
        metrics["images"] = torch.cat(images_out)
        metrics["scores"] = per_image
    return metrics


def _world_kinds(prompts: list[str]) -> list[str] | None:
    """Each prompt's world kind, or None unless the world grammar parses every prompt."""
    from diffalign.world import kind_of

    try:
        return [kind_of(p) for p in prompts]
    except ValueError:
        return None


class _RequirementRates:
    """How often each requirement type of the verifier (present, count, relation,
    only_requested) is met, over every image of an evaluation."""

    def __init__(self) -> None:
        self.met: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)

    def add(self, images: torch.Tensor, prompts: list[str]) -> None:
        from diffalign.world.verifier import verify

        for requirements in verify(images, prompts).requirements:
            for name, ok in requirements:
                kind = name.split("[")[0]  # present[1] -> present
                self.met[kind] += int(ok)
                self.total[kind] += 1

    def rates(self) -> dict[str, float]:
        return {f"world_met/{kind}": self.met[kind] / self.total[kind] for kind in sorted(self.total)}


def _add_world_kinds(metrics: dict, per_image: dict, kinds: list[str]) -> None:
    """Per prompt-kind means (single / counting / two_object / relation); ``kinds`` has one
    entry per image."""
    for key, values in per_image.items():
        for kind in sorted(set(kinds)):
            mask = torch.tensor([k == kind for k in kinds])
            metrics[f"{key}/{kind}"] = values[mask].mean().item()
