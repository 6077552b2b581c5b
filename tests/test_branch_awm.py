"""BranchGRPO (trees, fusion, depth-wise advantages, pruning) and AWM on tiny models."""

import pytest
import torch

from diffalign.config import parse_config
from diffalign.objectives import advantage_weighted_matching_loss
from diffalign.pipelines import build_tiny
from diffalign.rollout import rollout
from diffalign.run_log import read_metrics
from diffalign.train import train
from diffalign.trainers.branch_grpo import _zscore_by_group, depth_wise_advantages, fused_node_values

from helpers import assert_same_final_lora, final_lora


def _config(tmp_path, family, run_name, method, **options):
    return parse_config({
        "run_name": run_name,
        "model": {"family": family, "tiny": True, "lora": {"rank": 4}},
        "method": {"name": method, "prompts": "world:align", "prompts_per_rollout": 2, "num_steps": 4,
                   "guidance_scale": 3.0, **options},
        "rewards": {"jpeg_incompressibility": 1.0},
        "optimization": {"lr": 3e-3, "max_steps": 2, "batch_size": 8},
        "logging": {"tensorboard": False, "progress_bar": False},
        "output": {"dir": str(tmp_path), "checkpoint_every": 0},
    })


def _hand_tree():
    """One prompt, 3 steps, splits at steps 0 and 1: 2 nodes at level 1, 4 at levels 2 and 3."""
    adapter = build_tiny("sd3")
    return rollout(adapter, adapter.encode_prompt(["p"]), num_steps=3, branching={0: 2, 1: 2},
                   generator=torch.Generator().manual_seed(0))


def test_depth_wise_advantages_on_a_hand_built_tree():
    tree = _hand_tree()
    assert tree.nodes_per_level() == [1, 2, 4, 4]
    rewards = torch.tensor([1.0, 3.0, 5.0, 9.0])  # leaves 0,1 under level-1 node 0; 2,3 under node 1
    values = fused_node_values(tree, rewards)
    torch.testing.assert_close(values[1], torch.tensor([2.0, 7.0]))
    torch.testing.assert_close(values[0], torch.tensor([4.5]))
    adv = depth_wise_advantages(tree, rewards)
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 1.0]))  # z-score of (2, 7) within the tree
    z = (rewards - rewards.mean()) / rewards.std(unbiased=False)
    torch.testing.assert_close(adv[1], z)
    torch.testing.assert_close(adv[2], z)
    # a depth whose values are all equal gives 0, not NaN
    flat = depth_wise_advantages(tree, torch.ones(4))
    assert all(torch.equal(a, torch.zeros_like(a)) for a in flat)


def test_logprob_softmax_fusion_weights_children_by_edge_probability():
    tree = _hand_tree()
    rewards = torch.tensor([1.0, 3.0, 5.0, 9.0])
    values = fused_node_values(tree, rewards, "logprob_softmax", alpha=1.0)
    w = torch.softmax(tree.logp_old[1][:2], dim=0)  # the two children of level-1 node 0
    torch.testing.assert_close(values[1][0], (w * rewards[:2]).sum())
    # alpha = 0 is the plain mean
    torch.testing.assert_close(fused_node_values(tree, rewards, "logprob_softmax", alpha=0.0)[1], torch.tensor([2.0, 7.0]))


def test_zscore_by_group():
    v = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0])
    g = torch.tensor([7, 7, 3, 3, 9])
    torch.testing.assert_close(_zscore_by_group(v, g), torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0]))


def test_branch_grpo_trains_with_pruning_and_counts_nfe(tmp_path):
    cfg = _config(tmp_path, "flux", "branch", "branch_grpo", split_steps=[0, 2], branching=2,
                  depth_pruning=[1], width_pruning="top_fraction", width_keep_fraction=0.5)
    result = train(cfg)
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    # 2 trees x (1 + 2 + 2 + 4) evaluations (Flux: guidance is an input, one pass per node)
    assert rows[0]["nfe_per_rollout"] == 2 * (1 + 2 + 2 + 4)
    # trained: steps 0 (2 edges), 2 (4 edges); step 1 pruned; step 3 after the last split keeps half
    assert rows[0]["trained_edges"] == 2 * (2 + 4 + 2)
    steps = {int(k.split("/")[1]) for r in rows for k in r if k.startswith("ratio_by_step/")}
    assert 1 not in steps
    lora = final_lora(result.output_dir)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_branch_grpo_mix_trains_only_stochastic_edges_on_an_epsilon_model(tmp_path):
    cfg = _config(tmp_path, "sd", "mix", "branch_grpo", split_steps=[1], branching=2, mix_window=1,
                  sampler="ddim")
    result = train(cfg)
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    steps = {int(k.split("/")[1]) for r in rows for k in r if k.startswith("ratio_by_step/")}
    assert 1 in steps and len(steps) <= 2


def test_branch_grpo_mix_window_can_be_held_to_the_first_steps(tmp_path):
    # a 2-step window that must start at step 0: the SDE runs at steps 0 and 1 in every rollout
    # (unheld, four rollouts of 6 steps would almost surely put it elsewhere at least once)
    cfg = _config(tmp_path, "sd3", "mix_early", "branch_grpo", split_steps=[0], branching=2, mix_window=2,
                  sde_window_max_start=0, num_steps=6)
    cfg.optimization.max_steps = 4
    result = train(cfg)
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    steps = {int(k.split("/")[1]) for r in rows for k in r if k.startswith("ratio_by_step/")}
    assert steps == {0, 1}


def test_awm_gradient_is_advantage_times_matching_gradient():
    param = torch.randn(5, requires_grad=True)

    def losses():  # three per-sample matching losses
        return (param[None, :] * torch.arange(1.0, 4.0)[:, None]).pow(2).mean(dim=1)

    advantages = torch.tensor([0.5, -1.0, 2.0])
    (grad,) = torch.autograd.grad(advantage_weighted_matching_loss(losses(), advantages), param)
    per_sample = losses()
    expected = sum(a * torch.autograd.grad(per_sample[i], param, retain_graph=True)[0] for i, a in enumerate(advantages)) / 3
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_awm_trains_and_resumes(family, tmp_path):
    def cfg(name, steps):
        c = _config(tmp_path, family, name, "awm", group_size=3, timesteps_per_sample=2, kl_beta=0.01,
                    ema_kl_beta=0.01)
        c.optimization.max_steps = steps
        c.optimization.batch_size = 3  # two micro-batches per rollout
        c.output.checkpoint_every = 2 if name == "split" else 0
        return c

    straight = train(cfg("straight", 4))
    rows = read_metrics(straight.output_dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[0]["nfe_per_rollout"] == 6 * 4 * 2
    train(cfg("split", 2))
    resumed = train(cfg("split", 4), resume=True)
    assert_same_final_lora(straight.output_dir, resumed.output_dir)


@pytest.mark.parametrize("guided", [False, True])
def test_awm_matching_loss_uses_the_prediction_the_sampler_uses(guided, tmp_path):
    """``guided_loss`` regresses the guided prediction (what the rollout sampled with) on the
    fresh-noise target; without it, the plain conditional prediction (the reference's setting)."""
    from accelerate import Accelerator

    from diffalign.randomness import MATCHING, keyed_generator
    from diffalign.train import build_adapter, build_rewards
    from diffalign.trainers.awm import AWMTrainer

    cfg = _config(tmp_path, "sd", "guided", "awm", group_size=2, timesteps_per_sample=2, guided_loss=guided)
    adapter = build_adapter(cfg)
    adapter.add_lora(rank=4, alpha=None, target_modules=cfg.model.lora.target_modules, dropout=0.0)
    trainer = AWMTrainer(cfg, adapter, Accelerator(cpu=True), build_rewards(cfg))
    with torch.no_grad():
        samples = trainer.collect()
    batch = trainer.make_batches(samples)[0]
    _, metrics = trainer.compute_loss(batch)

    # the same times and noises, from the sample's own keyed generator
    k, losses = 2, []
    for i in range(batch["x0"].shape[0]):
        g = keyed_generator(cfg.seed, MATCHING, trainer.rollouts, int(batch["pass"][i]), int(batch["key"][i]))
        u = (torch.arange(k) + torch.rand(k, generator=g)) / k
        t = adapter.timesteps_from_uniform(u)
        noise = torch.randn((k, *batch["x0"].shape[1:]), generator=g)
        x0 = batch["x0"][i : i + 1].expand(k, -1, -1, -1)
        cond = trainer.cond.select(batch["prompt_index"][i : i + 1]).repeat_interleave(k)
        with torch.no_grad():
            pred = adapter.predict(adapter.add_noise(x0, noise, t), t, cond, 3.0 if guided else 1.0)
        losses.append((pred - adapter.training_target(x0, noise, t)).pow(2).mean())
    torch.testing.assert_close(metrics["matching_loss"], torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)
