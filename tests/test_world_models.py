"""The shipped world models load offline and generate; every recipe stage runs (tiny networks)."""

import json
from pathlib import Path

import pytest
import torch

from diffalign.world import render_batch
from diffalign.world.assets import WORLD_MODELS, WORLD_SAMPLING, load_world_adapter, resolve_model_path

PROMPTS = ["a red circle", "two cyan squares", "a magenta triangle left of a yellow circle"]


# ---- names and folders ----------------------------------------------------------------------


SHIPPED = ["sd", "sd3", "clip", "preference"]


def test_resolve_model_path_maps_world_names_only():
    for name in SHIPPED:
        assert resolve_model_path(f"world/{name}") == WORLD_MODELS[name]
    assert resolve_model_path("org/some-model") == "org/some-model"
    assert resolve_model_path(Path("/x/y")) == Path("/x/y")
    with pytest.raises(ValueError, match="world/sd3"):
        resolve_model_path("world/nope")


def test_missing_folder_names_the_recreating_command(monkeypatch, tmp_path):
    import diffalign.world.assets as assets

    monkeypatch.setitem(assets.WORLD_MODELS, "sd3", str(tmp_path / "sd3"))
    with pytest.raises(FileNotFoundError, match=r"sd3.*python -m diffalign\.world\.pretrain .*--stage flow"):
        resolve_model_path("world/sd3")


# ---- the shipped text-to-image models ---------------------------------------------------------


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_shipped_pipeline_matches_adapter(name):
    """Plain diffusers loading and the diffalign adapter give the same 64x64 image."""
    from diffusers import DiffusionPipeline

    from diffalign.rollout import generate

    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(f"world/{name}"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    adapter = load_world_adapter(f"world/{name}")
    noise = torch.randn(1, *adapter.latent_shape(64, 64), generator=torch.Generator().manual_seed(0))
    extra = {"max_sequence_length": WORLD_SAMPLING["sd3"]["max_sequence_length"]} if name == "sd3" else {}
    with torch.no_grad():
        expected = pipe(PROMPTS[2], num_inference_steps=3, guidance_scale=4.5, latents=noise,
                        output_type="pt", **extra).images
    got = generate(adapter, [PROMPTS[2]], num_steps=3, guidance_scale=4.5, noise=noise)
    assert got.shape == expected.shape == (1, 3, 64, 64)
    assert torch.isfinite(got).all() and got.min() >= 0 and got.max() <= 1
    torch.testing.assert_close(got, expected.float(), atol=2e-3, rtol=0)


def test_shipped_sd_is_epsilon_ddim_and_sd3_has_a_word_level_t5():
    from diffusers import DDIMScheduler, StableDiffusion3Pipeline
    from transformers import CLIPModel

    sd = load_world_adapter("world/sd")
    assert isinstance(sd.pipe.scheduler, DDIMScheduler) and sd.parameterization == "epsilon"
    cfg = sd.pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)
    pipe = StableDiffusion3Pipeline.from_pretrained(resolve_model_path("world/sd3"), local_files_only=True)
    length = WORLD_SAMPLING["sd3"]["max_sequence_length"]
    swapped = ["a red circle left of a cyan square", "a cyan square left of a red circle"]
    ids = pipe.tokenizer_3(swapped, padding="max_length", max_length=length, return_tensors="pt").input_ids
    assert (ids != pipe.tokenizer_3.pad_token_id).sum(1).tolist() == [9, 9]  # one token per word + "</s>"
    with torch.no_grad():
        states = pipe.text_encoder_3(ids)[0]
    # the T5 sees word order: the same words in another order give other states
    assert (states[0] - states[1]).abs().max() > 1e-2
    # both CLIP slots hold the world CLIP's text tower, untouched
    clip = CLIPModel.from_pretrained(WORLD_MODELS["clip"], local_files_only=True).text_model.state_dict()
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        assert all(torch.equal(clip[k], v) for k, v in encoder.text_model.state_dict().items())


def test_load_adapter_plain_generates_64px():
    from diffalign.pipelines import load_adapter
    from diffalign.rollout import generate

    for name in ("sd", "sd3"):
        adapter = load_adapter(WORLD_MODELS[name])
        assert adapter.default_resolution == 64
        images = generate(adapter, PROMPTS[:2], num_steps=2, guidance_scale=4.5)
        assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


# ---- CLIP, tokenizer, preference --------------------------------------------------------------


def test_tokenizer_round_trips_and_is_shared():
    from transformers import AutoTokenizer

    from diffalign.world.grammar import all_prompts
    from diffalign.world.pretrain.tokenizer import check_tokenizer

    summary = check_tokenizer(WORLD_MODELS["clip"])
    assert summary["vocab_size"] > 2 * 256 + 2 and summary["longest_prompt_tokens"] <= summary["model_max_length"]
    ref = AutoTokenizer.from_pretrained(WORLD_MODELS["clip"])(list(all_prompts()))["input_ids"]
    for sub in ("sd/tokenizer", "sd3/tokenizer", "sd3/tokenizer_2"):
        folder = str(Path(WORLD_MODELS["sd"]).parent / sub)
        assert AutoTokenizer.from_pretrained(folder)(list(all_prompts()))["input_ids"] == ref


@pytest.mark.parametrize("name", ["clip", "preference"])
def test_clip_models_load_with_processor_and_score(name):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(WORLD_MODELS[name], local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(WORLD_MODELS[name], local_files_only=True)
    images = render_batch(PROMPTS, rng=0)
    pil = [(x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for x in images]
    inputs = processor(text=PROMPTS, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    # both match each rendered scene to its own caption (the preference model is fine-tuned from the CLIP)
    assert torch.equal(logits.argmax(1), torch.arange(3))


def test_shipped_preference_reward_ranks_matching_captions_higher():
    """On held-out prompts the world_preference reward scores every rendered scene's own caption
    above the mean of the other captions' scores (measured: 20 of 20; argmax right for 12)."""
    from rewards.registry import build_reward
    from diffalign.world.splits import split

    prompts = split("heldout")[::6][:20]
    images = render_batch(prompts, rng=0)
    reward = build_reward("world_preference")
    scores = torch.stack([reward.score(images, [p] * len(prompts)) for p in prompts], dim=1)  # [image, caption]
    assert (scores.diag() > scores.mean(dim=1)).float().mean() >= 0.9


# ---- the recipe -------------------------------------------------------------------------------


def test_every_stage_runs_tiny(tiny_world_dir):
    from diffusers import DiffusionPipeline
    from transformers import CLIPModel

    from diffalign.world.pretrain import STAGES

    tmp_path = tiny_world_dir
    report = json.loads((tmp_path / "REPORT.json").read_text())
    for stage in STAGES:
        assert report["stages"][stage]["steps"] == 2 and report["stages"][stage]["params"]
    report = json.loads((tmp_path / "REPORT.json").read_text())
    assert set(report["stages"]) == set(STAGES) and (tmp_path / "REPORT.md").is_file()
    for name in ("sd", "sd3"):
        pipe = DiffusionPipeline.from_pretrained(tmp_path / name, local_files_only=True)
        assert pipe.vae.config.scaling_factor > 0
    for name in ("clip", "preference"):
        CLIPModel.from_pretrained(tmp_path / name, local_files_only=True)


def test_world_transformer_starts_as_adaln_zero():
    """The flow recipe's MMDiT starts with identity blocks and a zero output (adaLN-Zero), so
    its first prediction is exactly zero whatever the input and conditioning."""
    from diffalign.world.pretrain.t2i import build_transformer

    model = build_transformer(16, 8, num_layers=2, num_attention_heads=2, attention_head_dim=4)
    out = model(hidden_states=torch.randn(2, 4, 16, 16), encoder_hidden_states=torch.randn(2, 3, 32),
                pooled_projections=torch.randn(2, 16), timestep=torch.tensor([10.0, 900.0])).sample
    assert out.shape == (2, 4, 16, 16) and torch.count_nonzero(out) == 0
    gates = [m.weight for n, m in model.named_modules() if n.endswith("norm1.linear")]
    assert gates and all(torch.count_nonzero(w) == 0 for w in gates)
