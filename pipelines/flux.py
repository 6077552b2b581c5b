"""Flux.1 (dev / schnell): flow transformer on 2x2-packed latents, CLIP pooled + T5 text.

Latents cross this adapter's interface *unpacked* (``[B, C, h, w]``) like every other family;
``_forward`` packs them with the pipeline's own helpers and unpacks the prediction, so samplers,
noise and per-sample means are family-independent.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from .base import PromptSetting
from .schedules import FlowAdapter
from .tiny_parts import tiny_clip_text_config, tiny_flow_vae, tiny_t5_encoder
from .tiny_tokenizers import clip_tokenizer, t5_tokenizer


class FluxAdapter(FlowAdapter):
    family = "flux"
    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"
    max_sequence_length = PromptSetting(512)

    @property
    def latent_channels(self) -> int:
        return self.unwrapped_denoiser.config.in_channels // 4

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = 2 * self.vae_scale_factor  # the pipeline packs 2x2 latent patches
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for flux, got {height}x{width}")
        return super().latent_shape(height, width)

    def _native_resolution(self) -> int:
        # Flux has no sample_size; the pipeline's default is 128 * vae_scale_factor
        return self.pipe.default_sample_size * self.vae_scale_factor

    @property
    def uses_negative_branch(self) -> bool:
        # guidance-distilled Flux (dev) takes the scale as an input instead of a second branch
        return not self.unwrapped_denoiser.config.guidance_embeds

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, None, device=self.device, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _forward(self, denoiser, x, t, embeds, guidance_scale):
        dtype = self.dtype
        batch, channels, h, w = x.shape
        packed = self.pipe._pack_latents(x.to(dtype), batch, channels, h, w)
        image_ids = self.pipe._prepare_latent_image_ids(batch, h // 2, w // 2, x.device, dtype)
        text = embeds["prompt_embeds"].to(dtype)
        text_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype)
        guidance = None
        if self.unwrapped_denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), device=x.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=packed,
            timestep=t.to(dtype),
            guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        f = self.vae_scale_factor
        return self.pipe._unpack_latents(out, h * f, w * f, f)

    def _set_timesteps_kwargs(self, num_steps, latent_hw):
        # exactly what FluxPipeline.__call__ passes: linear sigmas and a resolution-dependent shift
        config = self.pipe.scheduler.config
        seq_len = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        mu = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if config.get("use_flow_sigmas", False):
            return {"mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    @classmethod
    def tiny(cls, seed: int = 0, guidance_embeds: bool = True) -> "FluxAdapter":
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = clip_tokenizer(model_max_length=16)
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=guidance_embeds,
        )
        text_encoder = CLIPTextModel(tiny_clip_text_config(CLIPTextConfig, tokenizer))
        t5_tok = t5_tokenizer(model_max_length=16)
        text_encoder_2 = tiny_t5_encoder(t5_tok, d_model=32, d_kv=8)
        vae = tiny_flow_vae()
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        )
        pipe = FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
        adapter = cls(pipe)
        adapter.resolution = 32
        adapter.max_sequence_length = 16
        return adapter
