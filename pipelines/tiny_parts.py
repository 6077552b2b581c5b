"""Tiny random components shared by the families' ``tiny()`` builders (diffusers' fast-test sizes).

Construction order matters: the builders seed torch once and then create their modules in a
fixed order, so the same seed always gives the same weights.
"""

from __future__ import annotations


def tiny_clip_text_config(config_cls, tokenizer, hidden_size: int = 32, **overrides):
    """diffusers' fast-test CLIP text encoder size, with ids matching our offline tokenizer."""
    kwargs = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_t5_encoder(tokenizer, d_model: int, d_kv: int):
    """A 2-layer T5 encoder (SD3's third and Flux's second text encoder) for ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_ff=37,
            d_kv=d_kv,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def tiny_vae(**overrides):
    """A 2-block ``AutoencoderKL`` with 4 latent channels (SD / SDXL layout unless overridden)."""
    from diffusers import AutoencoderKL

    kwargs = dict(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


def tiny_flow_vae():
    """The SD3 / Flux VAE layout: no quant convs, a latent shift and scale."""
    return tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
