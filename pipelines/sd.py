"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction UNet, one CLIP text encoder)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from .base import model_dtype
from .schedules import EpsilonAdapter
from .tiny_parts import tiny_clip_text_config, tiny_vae
from .tiny_tokenizers import clip_tokenizer


class SDAdapter(EpsilonAdapter):
    family = "sd"
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    lora_layers_kwarg = "unet_lora_layers"

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's ``encode_prompt`` embedding, computed as diffusers' training scripts do.

        ``encode_prompt`` also tokenizes every prompt a second time, untruncated, to warn about
        truncation, and rewrites textual-inversion tokens: 1.5 ms per call on the world's model
        (0.4% of a Diffusion-DPO step). Only a batch with a prompt that fills the whole token
        window (it may have been cut) goes through it, for its warning. Same tensors either way
        (a test checks).
        """
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        filled = tokens.get("attention_mask")
        if filled is None or bool(filled[:, -1].any()):
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
            return {"prompt_embeds": embeds}
        use_mask = getattr(text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(self.device) if use_mask else None
        embeds = text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return {"prompt_embeds": embeds.to(dtype=model_dtype(text_encoder), device=self.device)}

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
