"""SPO: the step-wise resampler, the multi-step variant, and the trainer on tiny SD1.5 / SDXL / SD3.

The SPO loss itself (hand-computed values, the hard clamp's zero gradient outside [0.9, 1.1],
no overflow) is pinned in tests/test_objectives.py::test_spo_loss_values_and_hard_clamp.
"""

import functools
import math

import pytest
import torch

from diffalign.config import ConfigError, parse_config
from diffalign.pipelines import build_tiny
from diffalign.rollout import SamplerConfig
from diffalign.run_log import read_metrics
from diffalign.train import train
from diffalign.trainers.spo import next_state_choice, select_pairs, spo_rollout

from helpers import assert_same_final_lora, final_lora


pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_scorer(images, prompts, timesteps=None, scale=10.0):
    """A deterministic stand-in for the step-aware model: the mean red value (varies per candidate)."""
    return images[:, 0].mean(dim=(1, 2)) * scale


# ---------------------------------------------------------------------- pure pieces


def test_select_pairs_applies_the_threshold_to_the_softmax_gap():
    scores = torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.05, 1.0], [3.0, 3.0, 3.0]])
    win, lose, keep, gap = select_pairs(scores, threshold=0.3)
    assert win.tolist() == [1, 1, 0] and lose.tolist() == [2, 0, 0]
    # softmax([2, 0.5]) = [0.8176, 0.1824] -> 0.6351; softmax([1.05, 1]) -> tanh(0.025) = 0.0250
    torch.testing.assert_close(gap, torch.tensor([math.tanh(0.75), math.tanh(0.025), 0.0]))
    assert keep.tolist() == [True, False, False]
    assert select_pairs(scores, threshold=0.01)[2].tolist() == [True, True, False]  # ties never pair


def test_next_state_is_uniform_and_ignores_scores():
    choice = next_state_choice(40000, 4, torch.Generator().manual_seed(0))
    freq = torch.bincount(choice, minlength=4).float() / 40000
    assert (freq - 0.25).abs().max() < 0.01


# ---------------------------------------------------------------------- the resampling rollout


def _rollout(adapter, n_chains=24, k=4, threshold=0.0, extra_steps=0, num_steps=4, divert_start=1, seed=0,
             scale=10.0):
    prompts = ["a red circle", "two blue squares"]
    cond = adapter.encode_prompt(prompts)
    return spo_rollout(
        adapter, cond, prompts, functools.partial(_fake_scorer, scale=scale), num_steps=num_steps, guidance_scale=3.0, sampler=SamplerConfig(),
        divert_start=divert_start, num_candidates=k, threshold=threshold, extra_steps=extra_steps,
        prompt_index=torch.arange(2).repeat_interleave(n_chains // 2), generator=torch.Generator().manual_seed(seed),
        record=True,
    )


def test_pairs_share_their_parent_state_and_the_chain_continues_from_a_random_candidate():
    adapter = build_tiny("sd")
    k = 4
    out = _rollout(adapter, k=k)
    rec, pairs = out.record, out.pairs
    assert sorted(rec["candidates"]) == [1, 2, 3]  # the first divert_start steps are plain
    assert bool(pairs["same_parent"].all())
    winner_chosen = draws = 0
    for step, candidates in rec["candidates"].items():
        chain_before, chain_after = rec["chain"][step], rec["chain"][step + 1]
        scores, choice = rec["scores"][step], rec["choice"][step]
        rows = torch.arange(len(choice))
        torch.testing.assert_close(chain_after, candidates[rows, choice], rtol=0, atol=0)  # next state = a candidate
        at = pairs["step"] == step
        chains = torch.nonzero(at).squeeze(1)
        # every pair: both transitions leave the chain's state at this step; w / l are the best / worst candidate
        for row, pair in zip(rows, chains):
            torch.testing.assert_close(pairs["x_w"][pair], chain_before[row], rtol=0, atol=0)
            torch.testing.assert_close(pairs["x_l"][pair], chain_before[row], rtol=0, atol=0)
            torch.testing.assert_close(pairs["next_w"][pair], candidates[row, scores[row].argmax()], rtol=0, atol=0)
            torch.testing.assert_close(pairs["next_l"][pair], candidates[row, scores[row].argmin()], rtol=0, atol=0)
        winner_chosen += int((choice == scores.argmax(dim=1)).sum())
        draws += len(choice)
    # the next state is not the winner: it is the winner about 1/k of the time (72 draws, expected 18)
    assert 6 <= winner_chosen <= 32
    assert out.stats["pairs"] == draws  # threshold 0: every chain gives a pair at every branching step


def test_threshold_filters_pairs_in_the_rollout():
    adapter = build_tiny("sd")
    out = _rollout(adapter, k=3, threshold=0.1, scale=1000.0)  # tiny decoders give nearly flat images
    expected = sum(int(select_pairs(s, 0.1)[2].sum()) for s in out.record["scores"].values())
    assert 0 < expected < 3 * 24 and out.pairs["step"].shape[0] == expected
    gap = torch.sigmoid(out.pairs["score_w"] - out.pairs["score_l"]) * 2 - 1  # softmax gap of the stored scores
    assert bool((gap > 0.1).all())


def test_multi_step_variant_pairs_every_transition_of_the_sub_trajectories():
    adapter = build_tiny("sd")
    out = _rollout(adapter, n_chains=4, k=2, extra_steps=2, num_steps=5, divert_start=1)
    pairs = out.pairs
    # branching steps 1..4; sub-trajectories of length min(3, 5 - step): 3 + 3 + 2 + 1 per chain
    assert pairs["step"].shape[0] == 4 * (3 + 3 + 2 + 1)
    first = pairs["same_parent"]
    assert int(first.sum()) == 4 * 4  # only the branching transition itself leaves a shared state
    # a later transition of the winning sub-trajectory starts where the previous one ended
    for i in torch.nonzero(~first).squeeze(1).tolist():
        before = [j for j in range(len(first)) if pairs["step"][j] == pairs["step"][i] - 1
                  and torch.equal(pairs["next_w"][j], pairs["x_w"][i]) and torch.equal(pairs["next_l"][j], pairs["x_l"][i])]
        assert len(before) == 1


# ---------------------------------------------------------------------- the trainer


def _config(tmp_path, family, name, **method):
    return parse_config({
        "run_name": name,
        "model": {"family": family, "tiny": True, "lora": {"rank": 4}},
        "method": {"name": "spo", "num_steps": 4, "divert_start": 1, "num_candidates": 3, "threshold": 0.0,
                   "prompts_per_rollout": 2, **method},
        "rewards": {"step_aware": {"path": "/models/not-needed-with-tiny"}},  # tiny stand-in
        "optimization": {"lr": 1e-2, "max_steps": 2, "batch_size": 6},  # 2 chains x 3 branching steps = one batch
        "logging": {"tensorboard": False, "progress_bar": False},
        "output": {"dir": str(tmp_path)},
    })


@pytest.mark.parametrize("family, extra", [("sd", {}), ("sdxl", {"num_candidates": 2, "extra_steps": 2})])
def test_spo_trains_on_policy_and_changes_the_lora(family, extra, tmp_path):
    result = train(_config(tmp_path, family, f"spo_{family}", **extra))
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    first = rows[0]
    assert math.isfinite(first["loss"]) and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert first["log_ratio_old_abs_max"] < 1e-5  # the rollout's own log-probs: on-policy
    assert first["pairs"] > 0 and first["nfe_per_rollout"] > 0
    lora = final_lora(result.output_dir)
    lora_b = [v for k, v in lora.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)


def test_spo_resumes_exactly(tmp_path):
    def cfg(name, steps):
        c = _config(tmp_path, "sd", name)
        c.optimization.max_steps = steps
        c.optimization.batch_size = 3  # two micro-batches per rollout: checkpoints wait for the boundary
        c.output.checkpoint_every = 2 if name == "split" else 0
        return c

    straight = train(cfg("straight", 4))
    train(cfg("split", 2))
    resumed = train(cfg("split", 4), resume=True)
    assert_same_final_lora(straight.output_dir, resumed.output_dir)


def test_spo_runs_flow_models_through_the_flow_sde(tmp_path):
    result = train(_config(tmp_path, "sd3", "spo_sd3", eval_prompts="world:heldout", eval_max_prompts=2,
                           eval_rewards={"verifier": {"name": "shapes"}}))
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    assert {"eval/verifier", "eval/train_step_aware"} <= set(rows[0])
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_spo_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="method.divert_start"):
        _config(tmp_path, "sd", "x", divert_start=4)
    with pytest.raises(ConfigError, match="method.num_candidates"):
        _config(tmp_path, "sd", "x", num_candidates=1)
    cfg = _config(tmp_path, "sd", "x")
    cfg.rewards = parse_config({"model": {"family": "sd", "tiny": True}, "method": {"name": "spo"},
                                "rewards": {"jpeg_compressibility": 1.0}}).rewards
    with pytest.raises(ValueError, match="step-aware preference model"):
        train(cfg)
