"""Adapters: generation matches diffusers, LoRA trains and round-trips through diffusers."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from diffalign.pipelines import build_tiny, family_of, load_adapter
from diffalign.pipelines.base import model_dtype
from diffalign.rollout import generate, rollout
from diffalign.trainers.sft import matching_loss

from conftest import FAMILIES

PROMPTS = ["a red circle", "two blue squares"]


def _noise(adapter, n=2, seed=0):
    return adapter.initial_noise(n, generator=torch.Generator().manual_seed(seed))


def _pipeline_latents(adapter, pipe, noise, steps=3, guidance=3.0):
    """Run the plain diffusers pipeline from the same initial noise (DDIM for eps models)."""
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                  height=adapter.default_resolution, width=adapter.default_resolution)
    if adapter.family in ("sd3", "flux"):
        kwargs["max_sequence_length"] = adapter.max_sequence_length
    latents = noise
    if adapter.family == "flux":
        latents = pipe._pack_latents(noise, *noise.shape)
    out = pipe(prompt=PROMPTS, latents=latents, **kwargs).images
    if adapter.family == "flux":
        out = pipe._unpack_latents(out, adapter.default_resolution, adapter.default_resolution, adapter.vae_scale_factor)
    return out


def _plain_pipeline(adapter):
    pipe = type(adapter.pipe)(**adapter.pipe.components)
    if adapter.parameterization != "flow":
        pipe.scheduler = DDIMScheduler.from_config(adapter.pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_matches_diffusers_pipeline(family):
    adapter = build_tiny(family)
    noise = _noise(adapter)
    ours = rollout(adapter, adapter.encode_prompt(PROMPTS), num_steps=3, guidance_scale=3.0, step_kinds="ode", noise=noise)
    reference = _pipeline_latents(adapter, _plain_pipeline(adapter), noise)
    torch.testing.assert_close(ours.final_latents, reference.float(), atol=1e-5, rtol=1e-5)
    images = generate(adapter, PROMPTS, num_steps=3, guidance_scale=3.0)
    assert images.shape == (2, 3, adapter.default_resolution, adapter.default_resolution)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_step_changes_every_trainable_parameter(family):
    adapter = build_tiny(family)
    adapter.add_lora(rank=4)
    params = adapter.trainable_parameters()
    assert params and all("lora" in n for n, p in adapter.unwrapped_denoiser.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    images = generate(adapter, PROMPTS, num_steps=2)
    x0 = adapter.encode_images(images, generator=generator)
    loss = matching_loss(adapter, x0, PROMPTS, generator).mean()
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    assert all(changed), f"{changed.count(False)} of {len(changed)} LoRA tensors did not change"


def _perturb_lora(adapter, seed=1):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_into_plain_diffusers_pipeline(family, tmp_path):
    adapter = build_tiny(family)
    adapter.pipe.save_pretrained(tmp_path / "base")
    noise = _noise(adapter)
    cond = adapter.encode_prompt(PROMPTS)
    base_out = rollout(adapter, cond, num_steps=3, guidance_scale=3.0, step_kinds="ode", noise=noise).final_latents

    adapter.add_lora(rank=4, alpha=8)
    _perturb_lora(adapter)
    tuned_out = rollout(adapter, cond, num_steps=3, guidance_scale=3.0, step_kinds="ode", noise=noise).final_latents
    assert not torch.allclose(tuned_out, base_out, atol=1e-3)
    with adapter.reference():
        ref_out = rollout(adapter, cond, num_steps=3, guidance_scale=3.0, step_kinds="ode", noise=noise).final_latents
    torch.testing.assert_close(ref_out, base_out, atol=0, rtol=0)  # LoRA disabled = exactly the base

    adapter.save_trained(tmp_path / "lora")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    if adapter.parameterization != "flow":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_pipeline_latents(adapter, pipe, noise).float(), tuned_out, atol=1e-4, rtol=1e-4)

    # and back into a fresh adapter through our own loader
    fresh = load_adapter(tmp_path / "base")
    if hasattr(adapter, "max_sequence_length"):
        fresh.max_sequence_length = adapter.max_sequence_length
    fresh.resolution = adapter.resolution
    fresh.load_trained(tmp_path / "lora")
    again = rollout(fresh, fresh.encode_prompt(PROMPTS), num_steps=3, guidance_scale=3.0, step_kinds="ode", noise=noise)
    torch.testing.assert_close(again.final_latents, tuned_out, atol=1e-5, rtol=1e-5)


def test_full_finetune_reference_is_the_frozen_base(tmp_path):
    adapter = build_tiny("sd")
    noise, cond = _noise(adapter), adapter.encode_prompt(PROMPTS)
    t = torch.tensor([500, 500])
    base = adapter.predict(noise, t, cond, 1.0)
    adapter.enable_full_finetune()
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.mul_(1.05)
    assert not torch.allclose(adapter.predict(noise, t, cond, 1.0), base)
    with adapter.reference():
        torch.testing.assert_close(adapter.predict(noise, t, cond, 1.0), base, atol=0, rtol=0)
    adapter.save_trained(tmp_path / "full")
    fresh = build_tiny("sd")
    fresh.load_trained(tmp_path / "full")
    torch.testing.assert_close(fresh.predict(noise, t, cond, 1.0), adapter.predict(noise, t, cond, 1.0))


def test_v_prediction_sd_targets_and_sampling():
    adapter = build_tiny("sd", prediction_type="v_prediction")
    assert adapter.parameterization == "v_prediction"
    x0 = torch.randn(2, 4, 16, 16)
    noise = torch.randn(2, 4, 16, 16)
    t = torch.tensor([100, 900])
    a = adapter.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(adapter.training_target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    noise0 = _noise(adapter)
    ours = rollout(adapter, adapter.encode_prompt(PROMPTS), num_steps=3, guidance_scale=3.0, step_kinds="ode", noise=noise0)
    torch.testing.assert_close(ours.final_latents, _pipeline_latents(adapter, _plain_pipeline(adapter), noise0).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_family_detection_and_errors(family, tmp_path):
    adapter = build_tiny(family)
    adapter.save_pretrained(tmp_path / "model")
    assert family_of(tmp_path / "model") == family
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        family_of(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "missing", family=family)
    with pytest.raises(ValueError, match="unknown model family 'sd4'"):
        load_adapter(tmp_path / "model", family="sd4")


def test_flow_forward_process_and_target():
    adapter = build_tiny("sd3")
    x0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    x_t = adapter.add_noise(x0, noise, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(adapter.training_target(x0, noise, sigma), noise - x0)
    t = adapter.sample_train_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 1 and 0.3 < t.mean() < 0.9


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_changing_t5_length_drops_the_cached_negative_prompt(family):
    adapter = build_tiny(family, seed=0)
    first = adapter.encode_prompt(["a red circle"])
    adapter.max_sequence_length = adapter.max_sequence_length + 3
    second = adapter.encode_prompt(["a red circle"])
    for key in second.embeds:
        if second.embeds[key].dim() == 3:  # token sequences: both branches got the new length
            assert second.embeds[key].shape[1] == first.embeds[key].shape[1] + 3
            if second.negative is not None:  # flux has no negative branch (distilled guidance)
                assert second.negative[key].shape == second.embeds[key].shape


def test_model_dtype_follows_casts_and_layerwise_casting():
    """The cached compute dtype is diffusers' ``.dtype``, also after the model changes dtype."""
    adapter = build_tiny("sd", seed=0)
    unet = adapter.unwrapped_denoiser
    assert adapter.dtype == model_dtype(unet) == unet.dtype == torch.float32
    adapter.pipe.to(torch.bfloat16)  # behind the adapter's back
    assert adapter.dtype == model_dtype(adapter.vae) == torch.bfloat16
    adapter.to(dtype=torch.float32)
    assert adapter.dtype == unet.dtype == torch.float32
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert adapter.dtype == unet.dtype == torch.bfloat16  # the compute dtype, not the storage dtype


@pytest.mark.parametrize("with_long_prompt", [False, True])
def test_sd_prompt_encoding_equals_the_pipelines(with_long_prompt):
    """SD encodes prompts as diffusers' training scripts do (a batch that may hold a truncated
    prompt through the pipeline, for its warning): exactly the pipeline's tensors."""
    adapter = build_tiny("sd", seed=0)
    prompts = ["a red circle", "two blue squares above a star", ""]
    if with_long_prompt:
        prompts.append("a red circle left of a blue square above a green triangle next to a yellow star " * 2)
    ours = adapter.encode_prompt(prompts).embeds["prompt_embeds"]
    with torch.no_grad():
        theirs, _ = adapter.pipe.encode_prompt(prompts, adapter.device, 1, False)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)


def _add_second_adapter(unet, **options):
    """A second peft adapter, "second", on layers the first has not (the resnet convs)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["conv1"], **options), "second")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # the second adapter, on purpose
def test_reference_disables_every_lora_layer_like_diffusers():
    """``reference()`` toggles the LoRA layers as diffusers' disable/enable_adapters do, and still
    finds layers an adapter loaded later adds (its cached layer list follows the adapters)."""
    adapter = build_tiny("sd", seed=0)
    adapter.add_lora(rank=4)
    _perturb_lora(adapter)
    unet = adapter.unwrapped_denoiser
    x = adapter.initial_noise(2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    cond = adapter.encode_prompt(PROMPTS[:2])
    with torch.no_grad():
        with adapter.reference():
            base = adapter.predict(x, t, cond)
        unet.disable_adapters()
        base_diffusers = adapter.predict(x, t, cond)
        unet.enable_adapters()
        tuned = adapter.predict(x, t, cond)
    assert torch.equal(base, base_diffusers) and not torch.allclose(base, tuned)
    assert all(p.requires_grad for p in adapter.trainable_parameters())  # trainable again after the reference

    # a second adapter on other layers (resnet convs), made the active one
    _add_second_adapter(unet, init_lora_weights=False)
    unet.set_adapter("second")
    with torch.no_grad():
        second = adapter.predict(x, t, cond)
        with adapter.reference():
            base_again = adapter.predict(x, t, cond)
    assert not torch.allclose(second, base) and torch.equal(base_again, base)


def test_train_mode_reaches_every_module_also_when_the_walk_is_skipped():
    """``adapter.train`` skips repeated walks, but never leaves a module in the wrong mode: not
    after new LoRA layers appear (created in training mode), not after the module is switched
    directly."""
    adapter = build_tiny("sd", seed=0)
    unet = adapter.unwrapped_denoiser

    def modes():
        return {m.training for m in unet.modules()}

    adapter.add_lora(rank=4, dropout=0.1)
    adapter.train(False)
    assert modes() == {False}
    adapter.train(True)
    adapter.train(True)
    assert modes() == {True}
    unet.eval()  # behind the adapter's back
    adapter.train(True)
    assert modes() == {True}
    adapter.train(False)
    with pytest.warns(UserWarning, match="peft_config"):
        _add_second_adapter(unet, lora_dropout=0.1)
    assert modes() == {True, False}  # peft made the new layers in training mode
    adapter.train(False)
    assert modes() == {False}
