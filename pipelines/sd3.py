"""Stable Diffusion 3 / 3.5 (MMDiT flow transformer; CLIP-L + CLIP-G + optional T5)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from .base import PromptSetting
from .schedules import FlowAdapter
from .tiny_parts import tiny_clip_text_config, tiny_flow_vae, tiny_t5_encoder
from .tiny_tokenizers import clip_tokenizer, t5_tokenizer


class SD3Adapter(FlowAdapter):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    #: T5 tokens per prompt (the pipeline's ``max_sequence_length``; 256 is its default)
    max_sequence_length = PromptSetting(256)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts,
            None,
            None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _forward(self, denoiser, x, t, embeds, guidance_scale):
        dtype = self.dtype
        return denoiser(
            hidden_states=x.to(dtype),
            timestep=(t * self.train_scheduler.config.num_train_timesteps).to(dtype),
            encoder_hidden_states=embeds["prompt_embeds"].to(dtype),
            pooled_projections=embeds["pooled_prompt_embeds"].to(dtype),
        ).sample

    def _set_timesteps_kwargs(self, num_steps, latent_hw):
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        patch = self.unwrapped_denoiser.config.patch_size
        seq_len = (latent_hw[0] // patch) * (latent_hw[1] // patch)
        mu = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        return {"mu": mu}

    @classmethod
    def tiny(cls, seed: int = 0) -> "SD3Adapter":
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        tokenizer = clip_tokenizer(model_max_length=16)
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,  # T5 width; the two CLIPs (32 + 32) are padded to it
            pooled_projection_dim=64,
            out_channels=4,
        )
        config = tiny_clip_text_config(CLIPTextConfig, tokenizer, projection_dim=32)
        text_encoder = CLIPTextModelWithProjection(config)
        text_encoder_2 = CLIPTextModelWithProjection(config)
        t5_tok = t5_tokenizer(model_max_length=16)
        text_encoder_3 = tiny_t5_encoder(t5_tok, d_model=64, d_kv=16)
        vae = tiny_flow_vae()
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=clip_tokenizer(model_max_length=16),
            text_encoder_3=text_encoder_3,
            tokenizer_3=t5_tok,
        )
        adapter = cls(pipe)
        adapter.max_sequence_length = 16
        return adapter
