"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction UNet, one CLIP text encoder)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from .schedules import EpsilonAdapter
from .tiny_parts import tiny_clip_text_config, tiny_vae
from .tiny_tokenizers import clip_tokenizer


class SDAdapter(EpsilonAdapter):
    family = "sd"
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    lora_layers_kwarg = "unet_lora_layers"

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": embeds}

    def _forward(self, denoiser, x, t, embeds, guidance_scale):
        dtype = self.dtype
        return denoiser(x.to(dtype), t, encoder_hidden_states=embeds["prompt_embeds"].to(dtype)).sample

    @classmethod
    def from_pretrained(cls, model, torch_dtype=None, variant=None, **kwargs):
        # alignment never needs the safety checker; skipping it saves memory and a download
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
        return super().from_pretrained(model, torch_dtype=torch_dtype, variant=variant, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, prediction_type: str = "epsilon") -> "SDAdapter":
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = clip_tokenizer(model_max_length=16)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_clip_text_config(CLIPTextConfig, tokenizer))
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return cls(pipe)
