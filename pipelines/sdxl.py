"""Stable Diffusion XL (UNet with text-time conditioning, two CLIP text encoders)."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import Tensor

from .schedules import EpsilonAdapter
from .tiny_parts import tiny_clip_text_config, tiny_vae
from .tiny_tokenizers import clip_tokenizer


class SDXLAdapter(EpsilonAdapter):
    family = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    denoiser_name = "unet"
    lora_layers_kwarg = "unet_lora_layers"

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _default_negative(self, embeds):
        # SDXL's pipeline uses zeros, not the encoded empty prompt, when its config says so
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            return {k: torch.zeros_like(v[:1]) for k, v in embeds.items()}
        return self._encode([""])

    def time_ids(self, height: int, width: int, batch: int) -> Tensor:
        """SDXL's micro-conditioning for an uncropped image generated at its own size."""
        encoder_2 = self.pipe.text_encoder_2
        projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else None
        ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=self.dtype, text_encoder_projection_dim=projection_dim
        )
        return ids.to(self.device).repeat(batch, 1)

    def _forward(self, denoiser, x, t, embeds, guidance_scale):
        dtype = self.dtype
        f = self.vae_scale_factor
        time_ids = embeds.get("time_ids")
        if time_ids is None:  # datasets with crops pass their own; generation uses the image size
            time_ids = self.time_ids(x.shape[-2] * f, x.shape[-1] * f, x.shape[0])
        added = {"text_embeds": embeds["pooled_prompt_embeds"].to(dtype), "time_ids": time_ids.to(dtype)}
        return denoiser(
            x.to(dtype), t, encoder_hidden_states=embeds["prompt_embeds"].to(dtype), added_cond_kwargs=added
        ).sample

    @classmethod
    def tiny(cls, seed: int = 0) -> "SDXLAdapter":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled 32
            cross_attention_dim=64,  # two text encoders of width 32
            norm_num_groups=1,
        )
        vae = tiny_vae(sample_size=32)
        config = tiny_clip_text_config(CLIPTextConfig, tokenizer, projection_dim=32)
        text_encoder = CLIPTextModel(config)
        text_encoder_2 = CLIPTextModelWithProjection(config)
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=clip_tokenizer(model_max_length=16),
            unet=unet,
            scheduler=scheduler,
        )
        return cls(pipe)
