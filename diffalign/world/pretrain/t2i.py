"""Stages ``eps`` and ``flow``: the world's two text-to-image models.

- ``eps`` -> ``sd/``: a ``StableDiffusionPipeline`` (``UNet2DConditionModel`` predicting
  epsilon, SD's scaled-linear betas 0.00085-0.012 with a ``DDIMScheduler``).
- ``flow`` -> ``sd3/``: a ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``, patch 2,
  rectified flow with a ``FlowMatchEulerDiscreteScheduler``). Both CLIP slots hold the world
  CLIP's text tower; the T5 slot holds a stand-in that outputs zeros (see :func:`null_t5`),
  and the model is trained with ``max_sequence_length`` = :data:`SD3_MAX_SEQUENCE_LENGTH` of
  those zero tokens: pass ``max_sequence_length=1`` when calling the pipeline.

Both use the VAE from stage ``vae`` and the frozen text tower from stage ``clip``. A pool of
rendered pretraining images is encoded to latents once (posterior mean and std; each step
samples from the posterior, as SD's training does) and every pretraining prompt (plus the
empty one) to embeddings, so a training step only runs the denoiser. The math is the standard
one, through the adapter: ``sample_train_timesteps`` (uniform DDPM steps / logit-normal
sigmas), ``add_noise``, ``training_target`` (eps / velocity) and ``predict``; captions are
dropped to "" 10% of the time for classifier-free guidance; the epsilon model uses min-SNR-5
loss weighting (``diffusers.training_utils.compute_snr``), which ENVIRONMENT.md's prototype
suggested it would need; both keep an EMA of the weights (``EMAModel``), which is what ships.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..assets import WORLD_SAMPLING, load_world_adapter
from ..grammar import KINDS
from ..renderer import render_batch
from ..splits import split
from .common import (
    PromptSampler, Stopwatch, count_params, evaluate_t2i, log, update_report,
)
from .vae import lr_lambda

# zero "T5" tokens per prompt (there is no T5 in the world); few tokens keep attention cheap
SD3_MAX_SEQUENCE_LENGTH = WORLD_SAMPLING["sd3"]["max_sequence_length"]


@dataclass
class T2IConfig:
    stage: str = "eps"
    # Measured (REPORT.json curves): with min-SNR weighting and EMA in the VAE's latent space
    # the epsilon model learns about as fast as flow matching did in ENVIRONMENT.md's pixel
    # prototype (held-out strict ~0.3 after 3000 steps, ~0.45 after 5000). The step counts
    # keep the base models in the target band (held-out strict roughly 0.2-0.6).
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 500
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0   # epsilon only; None = plain MSE
    pool_size: int = 64000              # rendered pretraining images encoded once
    eval_steps: int = WORLD_SAMPLING["sd"]["num_steps"]
    eval_guidance: float = WORLD_SAMPLING["sd"]["guidance_scale"]
    eval_per_prompt: int = 4            # held-out images per prompt in the final evaluation
    guidance_grid: tuple[float, ...] = (1.0, 3.0, 4.5, 7.5)  # documented at 2 images per prompt
    log_every: int = 1000
    max_eval_prompts: int | None = None  # cap on prompts per evaluation split (tests)
    net: dict = field(default_factory=dict)  # denoiser shape (see build_unet / build_transformer)


@dataclass
class EpsConfig(T2IConfig):
    stage: str = "eps"
    net: dict = field(default_factory=lambda: dict(
        block_out_channels=(64, 64, 64), layers_per_block=1, attention_head_dim=4, norm_num_groups=16))

    @classmethod
    def tiny(cls) -> "EpsConfig":
        return cls(steps=2, batch_size=2, warmup=1, pool_size=8, eval_steps=2, eval_per_prompt=1,
                   guidance_grid=(), log_every=1, max_eval_prompts=2,
                   net=dict(block_out_channels=(8, 8, 8), layers_per_block=1, attention_head_dim=2, norm_num_groups=4))


@dataclass
class FlowConfig(T2IConfig):
    stage: str = "flow"
    # The MMDiT learns far slower than the epsilon UNet: 6000 steps at lr 5e-4 reached held-out
    # strict only 0.12. Measured for the shipped recipe (1 thread, seed 0, 18000 steps, ~70
    # CPU-min): lr 5e-4 with diffusers' default init -> 0.44; adaLN-Zero init (see
    # build_transformer) with lr 1e-3 -> 0.50, which ships.
    steps: int = 18000
    lr: float = 1e-3
    min_snr_gamma: float | None = None
    shift: float = 2.0
    eval_steps: int = WORLD_SAMPLING["sd3"]["num_steps"]
    eval_guidance: float = WORLD_SAMPLING["sd3"]["guidance_scale"]
    net: dict = field(default_factory=lambda: dict(num_layers=4, num_attention_heads=4, attention_head_dim=32))

    @classmethod
    def tiny(cls) -> "FlowConfig":
        return cls(steps=2, batch_size=2, warmup=1, pool_size=8, eval_steps=2, eval_per_prompt=1,
                   guidance_grid=(), log_every=1, max_eval_prompts=2, net=dict(num_layers=1, num_attention_heads=2, attention_head_dim=4))


# --------------------------------------------------------------------------------------------
# Building the pipelines from the stage outputs
# --------------------------------------------------------------------------------------------


def load_text_towers(clip_dir: Path):
    """The world CLIP's text tower as ``CLIPTextModel`` and ``CLIPTextModelWithProjection``."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    if len(tokenizer) != clip.config.text_config.vocab_size:
        raise ValueError(f"tokenizer in {clip_dir} has {len(tokenizer)} tokens, the model "
                         f"{clip.config.text_config.vocab_size}")
    text_state = clip.text_model.state_dict()
    plain = CLIPTextModel(clip.config.text_config)
    plain.load_state_dict(text_state)  # strict: every weight must land
    projected = CLIPTextModelWithProjection(clip.config.text_config)
    projected.load_state_dict({**{f"text_model.{k}": v for k, v in text_state.items()},
                               **{f"text_projection.{k}": v for k, v in clip.text_projection.state_dict().items()}})
    return plain.eval(), projected.eval(), tokenizer


def build_unet(text_hidden: int, **net):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        # attention only at 8x8 and 4x4: self-attention at 16x16 was 4-40x slower on CPU
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_hidden, **net,
    )


def build_transformer(text_hidden: int, projection_dim: int, **net):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4,
        # the two CLIP slots are concatenated along features: 2 x text width, 2 x projection
        joint_attention_dim=2 * text_hidden, pooled_projection_dim=2 * projection_dim,
        caption_projection_dim=net["num_attention_heads"] * net["attention_head_dim"],
        # the sin-cos position table is a saved buffer: size it to the 8x8 patch grid, not
        # SD3's 96x96 (which alone would be 4.7 MB here)
        pos_embed_max_size=8, **net,
    )
    # adaLN-Zero (DiT, Peebles & Xie 2023): every block starts as the identity and the output
    # as zero; diffusers leaves these layers randomly initialised, which trained slower here
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear")) or name in ("norm_out.linear", "proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return model


def build_pipeline(out: Path, cfg: T2IConfig):
    """A freshly initialised pipeline around the trained VAE and the frozen world CLIP text tower."""
    from diffusers import (
        AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
        StableDiffusionPipeline,
    )

    text, text_proj, tokenizer = load_text_towers(out / "clip")
    hidden = text.config.hidden_size
    if cfg.stage == "eps":
        vae = AutoencoderKL.from_pretrained(out / "sd" / "vae", local_files_only=True)
        unet = build_unet(hidden, **cfg.net)
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", prediction_type="epsilon",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    vae = AutoencoderKL.from_pretrained(out / "sd3" / "vae", local_files_only=True)
    transformer = build_transformer(hidden, text_proj.config.projection_dim, **cfg.net)
    text_2 = type(text_proj)(text_proj.config)
    text_2.load_state_dict(text_proj.state_dict())
    text_3, tokenizer_3 = null_t5(transformer.config.joint_attention_dim)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift),
        vae=vae, text_encoder=text_proj, tokenizer=tokenizer, text_encoder_2=text_2.eval(), tokenizer_2=tokenizer,
        text_encoder_3=text_3, tokenizer_3=tokenizer_3,
    )


def null_t5(width: int):
    """A "null T5": an encoder whose output is exactly zero and a tokenizer that maps any text
    to the end token alone.

    The world has no T5. ``StableDiffusion3Pipeline`` runs without one when given
    ``text_encoder_3=None`` (it then feeds zeros), but a saved folder with a null T5 entry does
    not load with plain ``from_pretrained(dir)`` (diffusers does not treat that slot as
    optional). So the folder holds this stand-in, which yields the same all-zero T5 tokens as
    ``text_encoder_3=None`` for any prompt: one tiny layer with every weight zero (its final
    RMS-norm weight of 0 zeroes the output). The tokenizer deletes all text, so the pipeline's
    truncation check never fires and never warns.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)], unk_id=2))
    tok.normalizer = normalizers.Replace(Regex(r"[\s\S]+"), "")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=SD3_MAX_SEQUENCE_LENGTH)
    model = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=4, d_ff=4, num_layers=1, num_heads=1,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    ))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.eval(), tokenizer


def _portable_tokenizer_class(folder: Path) -> None:
    """transformers 5 records the null tokenizer's class as "TokenizersBackend", a name older
    versions lack; "PreTrainedTokenizerFast" is the same class in 5 and exists in 4.x."""
    for path, key in ((folder / "model_index.json", None), (folder / "tokenizer_3" / "tokenizer_config.json", "tokenizer_class")):
        data = json.loads(path.read_text())
        if key is None:
            data["tokenizer_3"] = ["transformers", "PreTrainedTokenizerFast"]
        else:
            data[key] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_adapter(pipe):
    from diffalign.pipelines import SD3Adapter, SDAdapter

    if type(pipe).__name__ == "StableDiffusionPipeline":
        return SDAdapter(pipe)
    adapter = SD3Adapter(pipe)
    adapter.max_sequence_length = SD3_MAX_SEQUENCE_LENGTH
    return adapter


# --------------------------------------------------------------------------------------------
# Pre-encoded training data
# --------------------------------------------------------------------------------------------


@dataclass
class LatentPool:
    mean: torch.Tensor        # [N, 4, 16, 16] scaled posterior means
    std: torch.Tensor         # [N, 4, 16, 16] scaled posterior stds
    prompt_id: torch.Tensor   # [N] index into the embedding table
    table: dict[str, torch.Tensor]  # prompt embeddings, one row per pretraining prompt, last row ""

    @property
    def empty_id(self) -> int:
        return next(iter(self.table.values())).shape[0] - 1


@torch.no_grad()
def build_pool(adapter, n: int, seed: int, batch: int = 256) -> LatentPool:
    prompts = split("pretrain")
    ids = {p: i for i, p in enumerate(prompts)}
    chosen = PromptSampler(prompts).sample(n, np.random.default_rng(seed))
    render_rng = random.Random(seed)
    vae = adapter.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    for i in range(0, n, batch):
        images = render_batch(chosen[i:i + batch], rng=render_rng)
        dist = vae.encode(images * 2 - 1).latent_dist
        means.append((dist.mean - shift) * scale)
        stds.append(dist.std * scale)
    embeds = adapter.encode_prompt(prompts + [""]).embeds
    return LatentPool(torch.cat(means), torch.cat(stds), torch.tensor([ids[p] for p in chosen]),
                      {k: v.detach().clone() for k, v in embeds.items()})


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def loss_weights(adapter, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """min-SNR-gamma weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR."""
    if gamma is None:
        return torch.ones(t.shape[0])
    from diffusers.training_utils import compute_snr

    snr = compute_snr(adapter.train_scheduler, t)
    return torch.clamp(snr, max=gamma) / snr


def train_t2i(out: str | Path, seed: int = 0, cfg: T2IConfig | None = None) -> dict:
    from diffalign.pipelines import Cond
    from diffusers.training_utils import EMAModel

    cfg = cfg or EpsConfig()
    out = Path(out)
    folder = out / ("sd" if cfg.stage == "eps" else "sd3")
    clock = Stopwatch()
    torch.manual_seed(seed)
    adapter = make_adapter(build_pipeline(out, cfg))
    pool = build_pool(adapter, cfg.pool_size, seed)
    log(cfg.stage, f"pool of {len(pool.prompt_id)} latents encoded in {clock.minutes:.1f} min")

    denoiser = adapter.unwrapped_denoiser
    denoiser.requires_grad_(True).train()
    params = [p for p in denoiser.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps, floor=0.1))
    ema = EMAModel(params, decay=cfg.ema_decay)
    g = torch.Generator().manual_seed(seed)
    heldout, curve = split("heldout")[:cfg.max_eval_prompts], []
    n = len(pool.prompt_id)
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(n, (cfg.batch_size,), generator=g)
        x0 = pool.mean[idx] + pool.std[idx] * torch.randn(pool.mean[idx].shape, generator=g)
        pid = pool.prompt_id[idx].clone()
        pid[torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout] = pool.empty_id
        cond = Cond({k: v[pid] for k, v in pool.table.items()})
        noise = torch.randn(x0.shape, generator=g)
        t = adapter.sample_train_timesteps(cfg.batch_size, generator=g)
        pred = adapter.predict(adapter.add_noise(x0, noise, t), t, cond, 1.0)
        per_sample = (pred.float() - adapter.training_target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        loss = (loss_weights(adapter, t, cfg.min_snr_gamma) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        if step % cfg.log_every == 0 or step == cfg.steps:
            ema.store(params)
            ema.copy_to(params)
            denoiser.eval()
            acc, _ = evaluate_t2i(adapter, heldout, 1, cfg.eval_steps, cfg.eval_guidance, seed + 1)
            denoiser.train()
            ema.restore(params)
            curve.append({"step": step, "minutes": round(clock.minutes, 2), "loss": round(loss.item(), 4),
                          **{k: round(v["strict"], 3) for k, v in acc.items()}})
            log(cfg.stage, str(curve[-1]))

    ema.copy_to(params)  # the EMA weights are what ships
    denoiser.requires_grad_(False).eval()
    adapter.pipe.save_pretrained(folder)
    for sub in ("tokenizer", "tokenizer_2"):  # CLIP's classic files too, as in clip/
        if (folder / sub).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(out / "clip" / name, folder / sub / name)
    if (folder / "tokenizer_3").is_dir():
        _portable_tokenizer_class(folder)
    train_minutes = clock.minutes
    entry = evaluate_folder(folder, cfg, seed)
    entry.update({
        "minutes": round(clock.minutes, 2), "train_minutes": round(train_minutes, 2), "seed": seed,
        "steps": cfg.steps, "config": asdict(cfg), "curve": curve,
        "params": {adapter.denoiser_name: count_params(denoiser), "vae": count_params(adapter.vae),
                   "text_encoder (frozen)": count_params(adapter.pipe.text_encoder)},
    })
    update_report(out, cfg.stage, entry)
    log(cfg.stage, f"done in {entry['minutes']:.1f} min: {entry['summary']}")
    return entry


def evaluate_folder(folder: Path, cfg: T2IConfig, seed: int) -> dict:
    """The shipped folder, reloaded: held-out and align-split accuracy at the default sampling
    settings, and a guidance sweep (SD3 also with the pipeline's default 256 zero T5 tokens)."""
    adapter = load_world_adapter(folder)
    heldout, align = split("heldout")[:cfg.max_eval_prompts], split("align")[:cfg.max_eval_prompts]
    metrics = {}
    metrics["heldout"], _ = evaluate_t2i(adapter, heldout, cfg.eval_per_prompt, cfg.eval_steps,
                                         cfg.eval_guidance, seed + 10)
    metrics["align"], _ = evaluate_t2i(adapter, align, max(1, cfg.eval_per_prompt // 2), cfg.eval_steps,
                                       cfg.eval_guidance, seed + 11)
    sweep = {}
    for w in cfg.guidance_grid:
        acc, _ = evaluate_t2i(adapter, heldout, 2, cfg.eval_steps, w, seed + 12)
        sweep[str(w)] = {k: round(v["strict"], 4) for k, v in acc.items()}
    metrics["heldout_guidance_sweep"] = sweep
    if adapter.family == "sd3" and cfg.guidance_grid:
        adapter.max_sequence_length = 256  # what StableDiffusion3Pipeline.__call__ uses by default
        acc, _ = evaluate_t2i(adapter, heldout, 2, cfg.eval_steps, cfg.eval_guidance, seed + 12)
        metrics["heldout_with_256_zero_t5_tokens"] = {k: round(v["strict"], 4) for k, v in acc.items()}
    h = metrics["heldout"]
    summary = {
        "sampling": f"{cfg.eval_steps} steps, guidance {cfg.eval_guidance}, 64 px, "
                    f"{cfg.eval_per_prompt} images per held-out prompt",
        "heldout strict (all)": round(h["all"]["strict"], 4),
        "heldout strict by kind": {k: round(h[k]["strict"], 3) for k in KINDS if k in h},
        "heldout strict, prompts with / without a held-out pair": [
            round(h[k]["strict"], 3) if k in h else None for k in ("heldout_pair", "seen_pairs")],
        "align strict (all)": round(metrics["align"]["all"]["strict"], 4),
    }
    return {"metrics": metrics, "summary": summary,
            "tables": {f"heldout, {cfg.eval_steps} steps, guidance {cfg.eval_guidance}": h,
                       f"align, {cfg.eval_steps} steps, guidance {cfg.eval_guidance}": metrics["align"]}}
