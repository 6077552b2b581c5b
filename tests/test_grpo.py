"""GRPO / DDPO / GRPO-Guard trainer on tiny models."""

import pytest
import torch

from diffalign.config import parse_config
from diffalign.run_log import read_metrics
from diffalign.train import train

from conftest import FAMILIES
from helpers import assert_same_final_lora, final_lora


def _config(tmp_path, family, run_name, **method):
    return parse_config({
        "run_name": run_name,
        "model": {"family": family, "tiny": True, "lora": {"rank": 4}},
        "method": {"name": "grpo", "prompts": "world:align", "prompts_per_rollout": 2, "group_size": 3,
                   "num_steps": 3, "guidance_scale": 3.0, **method},
        "rewards": {"jpeg_incompressibility": 1.0},  # varies between samples of random tiny models
        "optimization": {"lr": 3e-3, "max_steps": 2, "batch_size": 18},  # 2 prompts x 3 x 3 steps = one batch
        "logging": {"tensorboard": False, "progress_bar": False},
        "output": {"dir": str(tmp_path)},
    })


@pytest.mark.parametrize("family", FAMILIES)
def test_first_update_is_on_policy_and_lora_changes(family, tmp_path):
    result = train(_config(tmp_path, family, "onpolicy"))
    first = read_metrics(result.output_dir / "metrics.jsonl")[0]
    assert first["step"] == 1
    # one mini-batch per rollout, no accumulation: every ratio of the first update is exactly 1
    assert abs(first["ratio_min"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5
    assert first["clip_frac"] == 0.0 and torch.isfinite(torch.tensor(first["loss"]))
    lora = final_lora(result.output_dir)
    lora_b = [v for k, v in lora.items() if "lora_B" in k]
    # peft's "gaussian" init starts every lora_B at zero: after training none may be zero
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)


def test_fast_window_trains_only_window_steps(tmp_path):
    result = train(_config(tmp_path, "flux", "fast", num_steps=6, sde_window_size=2, sde_window_max_start=3))
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    steps = {int(k.split("/")[1]) for r in rows for k in r if k.startswith("ratio_by_step/")}
    assert steps and max(steps) <= 4 and len([k for k in rows[0] if k.startswith("ratio_by_step/")]) == 2


def test_ratio_norm_step_reweight_kl_and_random_timesteps_run(tmp_path):
    cfg = _config(tmp_path, "sd3", "guard", ratio_norm=True, step_reweight=True, kl_beta=0.04,
                  timestep_fraction=0.5, timestep_selection="random", inner_epochs=2)
    cfg.optimization.max_steps = 4
    result = train(cfg)
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-8)  # LoRA B = 0 at the start: policy == reference
    assert rows[-1]["kl"] > 0


def test_ddpo_with_per_prompt_tracker_resumes_exactly(tmp_path):
    def cfg(name, steps, **extra):
        c = _config(tmp_path, "sd", name, per_prompt_tracker=True, tracker_min_count=2, **extra)
        c.optimization.max_steps = steps
        c.optimization.batch_size = 9  # two mini-batches per rollout: checkpoints wait for the boundary
        c.output.checkpoint_every = 2 if name == "split" else 0
        return c

    straight = train(cfg("straight", 4))
    train(cfg("split", 2))
    resumed = train(cfg("split", 4), resume=True)
    assert_same_final_lora(straight.output_dir, resumed.output_dir)


def test_grpo_config_errors(tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="method.group_size: must be > 1"):
        _config(tmp_path, "sd3", "x", group_size=1)
    with pytest.raises(ValueError, match="RatioNorm is defined for flow models"):
        train(_config(tmp_path, "sd", "x", ratio_norm=True))


def test_each_transition_carries_the_advantage_of_the_image_its_chain_produced():
    """Images, chains, training edges and advantages line up: the edges of chain i carry the group
    advantage of image i's own reward (recomputed here from the rollout's images), and one
    gradient step on the surrogate raises the advantage-weighted log-likelihood of the actions."""
    from accelerate import Accelerator

    from diffalign.objectives import group_advantages
    from diffalign.rollout import recompute_transition
    from diffalign.train import build_adapter, build_rewards
    from diffalign.trainers.grpo import GRPOTrainer

    cfg = _config("/tmp/unused", "sd", "alignment")
    adapter = build_adapter(cfg)
    adapter.add_lora(rank=4, alpha=None, target_modules=cfg.model.lora.target_modules, dropout=0.0)
    rewards = build_rewards(cfg)
    trainer = GRPOTrainer(cfg, adapter, Accelerator(cpu=True), rewards)
    with torch.no_grad():
        edges = trainer.collect()
    traj = trainer.trajectory
    raw = rewards.score(traj.images, ["p"] * traj.num_leaves).scores["jpeg_incompressibility"]
    expected = group_advantages(raw, traj.leaf_prompt_index, scale="group", clip=5.0)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(edges["advantage"], expected[edges["node"]])
    # the recorded next latents are the chains' own (the last level holds the decoded images' latents)
    last = edges["step"] == traj.num_steps - 1
    torch.testing.assert_close(edges["x_next"][last], traj.final_latents[edges["node"][last]])

    # descent on -A * ratio raises sum_i A_i logp_i (to first order, for a small step)
    params = adapter.trainable_parameters()

    def weighted_logp():
        pred = adapter.predict(edges["x"], edges["t"], trainer.cond.select(edges["prompt_index"]), traj.guidance_scale)
        logp, _ = recompute_transition(adapter, traj.levels, edges, pred, trainer.sampler)
        return (edges["advantage"] * logp).sum()

    loss, _ = trainer.compute_loss(edges)
    grads = torch.autograd.grad(loss, params)
    before = weighted_logp().item()
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 1e-3 * g
        after = weighted_logp().item()
    assert after > before
