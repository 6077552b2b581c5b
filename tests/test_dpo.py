"""Diffusion-DPO, SmPO and InPO trainers on tiny models (offline, a few seconds each)."""

import math
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F

from diffalign.config import parse_config
from diffalign.data.preferences import PairBatch
from diffalign.objectives import diffusion_logratio, preference_loss
from diffalign.pipelines import Cond, build_tiny
from diffalign.randomness import LATENT, NOISE, TIMESTEP
from diffalign.run_log import read_metrics
from diffalign.train import train
from diffalign.trainers import trainer_class
from diffalign.trainers.smpo import smoothed_label

from conftest import FAMILIES
from helpers import assert_same_final_lora

METHODS = ["diffusion_dpo", "smpo", "inpo"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _raw_config(tmp_path, family, method, data_path, **options):
    return {
        "run_name": f"{method}_{family}",
        "model": {"family": family, "tiny": True, "lora": {"rank": 4}},
        "method": {"name": method, **options},
        "data": {"source": "parquet", "path": str(data_path)},
        "optimization": {"lr": 1e-2, "max_steps": 2, "batch_size": 2},
        "logging": {"tensorboard": False, "progress_bar": False},
        "output": {"dir": str(tmp_path)},
    }


def _trainer(cfg, adapter):
    accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    return trainer_class(cfg.method.name)(cfg, adapter, accelerator)


def _official_loss(mse, mse_ref, beta):
    """Diffusion-DPO's own code: model_diff / ref_diff and -logsigmoid(-0.5 beta (...))."""
    model_w, model_l = mse.chunk(2)
    ref_w, ref_l = mse_ref.chunk(2)
    model_diff, ref_diff = model_w - model_l, ref_w - ref_l
    return -F.logsigmoid(-0.5 * beta * (model_diff - ref_diff)).mean()


def test_loss_equals_official_formula_on_random_tensors():
    generator = torch.Generator().manual_seed(0)
    mse = torch.rand(16, generator=generator)
    mse_ref = mse + 1e-4 * torch.randn(16, generator=generator)
    logratio_w, logratio_l = diffusion_logratio(mse, mse_ref).chunk(2)
    ours = preference_loss(logratio_w, logratio_l, beta=5000 / 2).mean()  # official convention
    torch.testing.assert_close(ours, _official_loss(mse, mse_ref, 5000))
    # the diffusers convention drops the 0.5: its beta 2500 is the official 5000
    diffusers = -F.logsigmoid(-2500 * ((mse[:8] - mse[8:]) - (mse_ref[:8] - mse_ref[8:]))).mean()
    torch.testing.assert_close(preference_loss(logratio_w, logratio_l, beta=2500).mean(), diffusers)
    for kind in ("hinge", "ipo"):  # the diffusers example's ipo branch crashes; ours is finite
        assert torch.isfinite(preference_loss(logratio_w, logratio_l, beta=2500, kind=kind)).all()


def test_tiny_batch_is_ln2_at_init_then_matches_official_formula(tmp_path, pair_parquet):
    cfg = parse_config(_raw_config(tmp_path, "sd", "diffusion_dpo", pair_parquet, beta=5000))
    adapter = build_tiny("sd")
    adapter.add_lora(rank=4)
    trainer = _trainer(cfg, adapter)
    batch = trainer.next_microbatch()

    loss, metrics = trainer.compute_loss(batch)  # LoRA B = 0: policy == reference
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"].item() == 0 and metrics["rewards/accuracies"].item() == 0

    with torch.no_grad():  # move the policy away from the reference
        for name, p in adapter.unwrapped_denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loss, _ = trainer.compute_loss(batch)
    # recompute with the official formula from the same randomness (latents, t, shared noise),
    # which is keyed by each pair's global stream position
    x0 = adapter.encode_images(torch.cat([batch.images_w, batch.images_l]),
                               generator=trainer.pair_generators(batch.keys, LATENT, per_image=True))
    t = torch.cat([adapter.sample_train_timesteps(1, generator=g)
                   for g in trainer.pair_generators(batch.keys, TIMESTEP)]).repeat(2)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g)
                         for g in trainer.pair_generators(batch.keys, NOISE)]).repeat(2, 1, 1, 1)
    x_t = adapter.add_noise(x0, noise, t)
    cond = adapter.encode_prompt(batch.captions * 2)
    with torch.no_grad():
        mse = (adapter.predict(x_t, t, cond) - noise).pow(2).mean(dim=(1, 2, 3))
        with adapter.reference():
            mse_ref = (adapter.predict(x_t, t, cond) - noise).pow(2).mean(dim=(1, 2, 3))
    expected = _official_loss(mse, mse_ref, 5000)
    assert abs(expected.item() - math.log(2)) > 1e-4  # a real test: not at the ln 2 fixed point
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_one_timestep_and_one_noise_per_pair(tmp_path, pair_parquet, family):
    cfg = parse_config(_raw_config(tmp_path, family, "diffusion_dpo", pair_parquet))
    adapter = build_tiny(family)
    trainer = _trainer(cfg, adapter)
    z = torch.randn(2, *adapter.latent_shape(32, 32))
    t = adapter.sample_train_timesteps(2).repeat(2)
    x_t, target = trainer.noisy_inputs(torch.cat([z, z]), None, t)  # the same image as w and l
    torch.testing.assert_close(x_t[:2], x_t[2:])
    torch.testing.assert_close(target[:2], target[2:])
    if family == "sd3":  # flow models regress the velocity noise - x0
        noise = (x_t - (1 - t.view(-1, 1, 1, 1)) * torch.cat([z, z])) / t.view(-1, 1, 1, 1)
        torch.testing.assert_close(target, noise - torch.cat([z, z]), rtol=1e-4, atol=1e-4)


def test_smpo_label_range():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 1000, generator=generator) * 7 + 18  # PickScore-like raw values
    score_w, score_l = scores.max(dim=0).values, scores.min(dim=0).values  # the reward's winner first
    p = smoothed_label(score_w, score_l, float(scores.min()), float(scores.max()))
    assert bool(((p >= 0.5) & (p <= 1 / (1 + math.exp(-1)) + 1e-6)).all())
    assert smoothed_label(torch.tensor([25.0]), torch.tensor([18.0]), 18.0, 25.0).item() == pytest.approx(0.7311, abs=1e-4)
    assert smoothed_label(torch.tensor([20.0]), torch.tensor([20.0]), 18.0, 25.0).item() == 0.5


@pytest.mark.parametrize("method", ["smpo", "inpo"])
def test_inversion_reaches_exactly_t(tmp_path, pair_parquet, method):
    cfg = parse_config(_raw_config(tmp_path, "sd", method, pair_parquet, inversion_steps=4, renoise=True)
                       if method == "smpo" else _raw_config(tmp_path, "sd", method, pair_parquet, inversion_steps=4))
    adapter = build_tiny("sd")
    adapter.add_lora(rank=4)
    trainer = _trainer(cfg, adapter)
    seen = []
    predict = adapter.predict
    adapter.predict = lambda x, t, cond, g=1.0: (seen.append(torch.as_tensor(t).clone()), predict(x, t, cond, g))[1]
    t = torch.tensor([537, 999, 3, 537])  # off any coarse grid, any batch size
    z = torch.randn(4, *adapter.latent_shape(32, 32))
    cond = adapter.encode_prompt(["a red square"] * 4)
    trainer.noisy_inputs(z, cond, t)
    levels = torch.stack([s.expand(4) for s in seen])  # every model call's per-sample time
    assert bool((levels <= t).all()) and bool((levels >= 0).all())  # never above t, never negative
    if method == "smpo":  # ReNoise evaluates the model at the tentative next point: the last is t itself
        assert torch.equal(levels[-1], t)
    else:  # InPO's last inverse step starts at the grid level just below t
        assert torch.equal(levels[-1], (t * 3 / 4).round().long())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_trainer_step_changes_lora_and_reloads(tmp_path, pair_parquet, family, method):
    cfg = parse_config(_raw_config(tmp_path, family, method, pair_parquet, inversion_steps=2)
                       if method != "diffusion_dpo" else _raw_config(tmp_path, family, method, pair_parquet))
    adapter = build_tiny(family)
    adapter.add_lora(rank=4)
    trainer = _trainer(cfg, adapter)
    params = adapter.trainable_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # only gradients move weights
    for step in range(2):  # LoRA A gets a gradient once B is non-zero, i.e. from the second step on
        loss, metrics = trainer.compute_loss(trainer.next_microbatch())
        assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
        if step == 0:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))  # every LoRA tensor moved
    if method == "smpo":
        assert 0 <= metrics["label/weight_mean"].item() <= 10 * (2 / (1 + math.exp(-1)) - 1) + 1e-5

    adapter.save_trained(tmp_path / "lora")
    reloaded = build_tiny(family)
    reloaded.load_trained(tmp_path / "lora")
    for key, value in adapter.trained_state_dict().items():
        torch.testing.assert_close(reloaded.trained_state_dict()[key], value)


def test_sdxl_gets_per_image_crop_conditioning(tmp_path, pair_parquet):
    from diffalign.trainers.dpo import sdxl_time_ids

    batch = PairBatch(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), ["x"],
                      crops_w=[(512, 768, 0, 64)], crops_l=[(600, 600, 10, 0)])
    assert sdxl_time_ids(batch, 512).tolist() == [[512, 768, 0, 64, 512, 512], [600, 600, 10, 0, 512, 512]]


def test_full_loop_resumes_exactly_and_logs_preference_metrics(tmp_path, pair_parquet):
    def cfg(name, steps, every=0):
        raw = _raw_config(tmp_path, "sd", "inpo", pair_parquet, inversion_steps=2, beta=50.0)
        raw["run_name"], raw["optimization"]["max_steps"] = name, steps
        raw["output"]["checkpoint_every"] = every
        return parse_config(raw)

    straight = train(cfg("straight", 4))
    train(cfg("split", 2, every=2))
    resumed = train(cfg("split", 4), resume=True)
    assert_same_final_lora(straight.output_dir, resumed.output_dir)
    rows = read_metrics(straight.output_dir / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/accuracies", "rewards/margins", "logits/abs_mean", "mse/drift", "grad_norm", "data/pairs_seen"):
        assert key in rows[-1]
    assert rows[-1]["data/pairs_seen"] == 8.0 and rows[-1]["data/ties"] == 0.0


def test_config_errors(tmp_path, pair_parquet):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="method.label_smoothing: only applies to loss_type sigmoid"):
        parse_config(_raw_config(tmp_path, "sd", "diffusion_dpo", pair_parquet, loss_type="ipo", label_smoothing=0.1))
    with pytest.raises(ConfigError, match="method.score_min: give both"):
        parse_config(_raw_config(tmp_path, "sd", "smpo", pair_parquet, score_min=0.0))
    with pytest.raises(ValueError, match="train_guidance_scale"):
        _trainer(parse_config(_raw_config(tmp_path, "sd", "diffusion_dpo", pair_parquet, train_guidance_scale=3.5)),
                 build_tiny("sd"))
    raw = _raw_config(tmp_path, "sd", "smpo", pair_parquet)
    with pytest.raises(ConfigError, match="data.synthetic: is only read"):
        parse_config({**raw, "data": {**raw["data"], "synthetic": {"images_per_prompt": 4}}})
    raw["data"] = {"source": "synthetic", "path": str(tmp_path), "synthetic": {"images_per_prompt": 1}}
    with pytest.raises(ConfigError, match="data.synthetic.images_per_prompt: must be >= 2"):
        parse_config(raw)


def test_synthetic_source_generates_once_then_reuses(tmp_path):
    from diffalign.data.synthetic import INFO_FILE, build_multi_reward

    def make(images_per_prompt):
        raw = _raw_config(tmp_path, "sd", "diffusion_dpo", tmp_path)
        raw["rewards"] = {"jpeg_incompressibility": 1.0}
        raw["data"] = {"source": "synthetic", "path": str(tmp_path / "pairs"),
                       "synthetic": {"max_prompts": 3, "images_per_prompt": images_per_prompt, "num_steps": 2}}
        cfg = parse_config(raw)
        accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                      wait_for_everyone=lambda: None)
        rewards = build_multi_reward({"jpeg_incompressibility": {"weight": 1.0}})
        return trainer_class("diffusion_dpo")(cfg, build_tiny("sd"), accelerator, rewards)

    first = make(2)
    written = (tmp_path / "pairs" / INFO_FILE).stat().st_mtime_ns
    assert 1 <= len(first.data) <= 3
    again = make(2)  # same settings: the cached pairs are reused, not regenerated
    assert (tmp_path / "pairs" / INFO_FILE).stat().st_mtime_ns == written and len(again.data) == len(first.data)
    with pytest.raises(ValueError, match="made with other settings"):
        make(3)


def test_smpo_scores_unscored_pairs_with_its_reward(tmp_path, pair_parquet):
    from diffalign.data.synthetic import build_multi_reward

    table = datasets.Dataset.from_parquet(str(pair_parquet)).remove_columns(["score_0", "score_1"])
    path = tmp_path / "unscored.parquet"
    table.to_parquet(str(path))
    cfg = parse_config({**_raw_config(tmp_path, "sd", "smpo", path), "rewards": {"jpeg_incompressibility": 1.0}})
    accelerator = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    rewards = build_multi_reward({"jpeg_incompressibility": {"weight": 1.0}})
    trainer = trainer_class("smpo")(cfg, build_tiny("sd"), accelerator, rewards)
    batch = trainer.next_microbatch()
    assert bool((batch.scores_w > batch.scores_l).all())  # the reward's winner comes first
    low, high = trainer.score_range
    assert low < high and batch.scores_w.max() <= high and batch.scores_l.min() >= low
