"""Stages ``eps`` and ``flow``: the world's two text-to-image models.

- ``eps`` -> ``sd/``: a ``StableDiffusionPipeline`` (``UNet2DConditionModel`` predicting
  epsilon, SD's scaled-linear betas 0.00085-0.012 with a ``DDIMScheduler``).
- ``flow`` -> ``sd3/``: a ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``, patch 2,
  rectified flow with a ``FlowMatchEulerDiscreteScheduler``). Both CLIP slots hold the world
  CLIP's text tower (frozen); the T5 slot holds a small T5 encoder with a word-level
  tokenizer, trained from scratch together with the transformer (as in SD3, the T5 is what
  gives the model word order): pass ``max_sequence_length`` = :data:`SD3_MAX_SEQUENCE_LENGTH`
  when calling the pipeline.

Why a trained text encoder: the world CLIP's frozen text tower is a bag of words for spatial
relations - a linear probe on its token states cannot tell whether an object is the left or
the right one of "A left of B" (49% on held-out prompts), and denoisers conditioned on it
alone never learned relations (held-out relation accuracy stayed at chance, ~0.2, through
18000 steps). So the epsilon model fine-tunes its copy of the CLIP text tower with the UNet,
and the flow model trains its T5 (``train_text_encoder``). Measured: that alone did not teach
the tiny denoisers relations in their CPU budget either (held-out relation accuracy ~0.2 for
both; see REPORT.md), so relations stay the weakest kind, as for SD1.5 on GenEval.

Both use the VAE from stage ``vae`` and start from the text tower of stage ``clip``. A pool of
rendered pretraining images is encoded to latents once (posterior mean and std; each step
samples from the posterior, as SD's training does); each caption's frozen embeddings are
computed once and the trained encoder runs on its token ids every step. The images carry
caption noise (:mod:`diffalign.world.caption_noise`: wrong counts, mirrored relations,
swapped colours, like web alt-text), so the base models hedge between a caption's scene and
its near misses - the imperfection alignment is meant to repair. The math is the standard one,
through the adapter: ``sample_train_timesteps`` (uniform DDPM steps / logit-normal sigmas),
``add_noise``, ``training_target`` (eps / velocity) and ``predict``; captions are dropped to ""
10% of the time for classifier-free guidance; the epsilon model uses min-SNR-5 loss weighting
(``diffusers.training_utils.compute_snr``), which ENVIRONMENT.md's prototype suggested it
would need; both keep an EMA of the weights (``EMAModel``), which is what ships.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..assets import WORLD_SAMPLING, load_world_adapter
from ..caption_noise import noisy_scene
from ..grammar import KINDS
from ..renderer import render_batch
from ..splits import split
from .common import (
    PromptSampler, Stopwatch, count_params, evaluate_t2i, log, update_report,
)
from .tokenizer import build_t5_tokenizer
from .vae import lr_lambda

if TYPE_CHECKING:
    from diffalign.pipelines import Cond

# T5 tokens per prompt: the longest grammar prompt and its "</s>" fit; few tokens keep attention cheap
SD3_MAX_SEQUENCE_LENGTH = WORLD_SAMPLING["sd3"]["max_sequence_length"]


# Alt-text-like noise: counts and left/right are what captions get wrong most; colour binding less.
CAPTION_NOISE = {"count": 0.3, "relation": 0.3, "binding": 0.15}


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
    # the text encoder trained with the denoiser (eps: the CLIP tower's copy, flow: the T5)
    train_text_encoder: bool = True
    # per-type probability that a pretraining image shows a mislabelled scene (caption_noise)
    caption_noise: dict = field(default_factory=lambda: dict(CAPTION_NOISE))


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
    # the T5 encoder (d_model is the transformer's joint_attention_dim)
    t5: dict = field(default_factory=lambda: dict(num_layers=2, num_heads=4, d_kv=32, d_ff=256))

    @classmethod
    def tiny(cls) -> "FlowConfig":
        return cls(steps=2, batch_size=2, warmup=1, pool_size=8, eval_steps=2, eval_per_prompt=1,
                   guidance_grid=(), log_every=1, max_eval_prompts=2, net=dict(num_layers=1, num_attention_heads=2, attention_head_dim=4),
                   t5=dict(num_layers=1, num_heads=2, d_kv=4, d_ff=8))


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
    text_3, tokenizer_3 = world_t5(transformer.config.joint_attention_dim, **cfg.t5)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift),
        vae=vae, text_encoder=text_proj, tokenizer=tokenizer, text_encoder_2=text_2.eval(), tokenizer_2=tokenizer,
        text_encoder_3=text_3, tokenizer_3=tokenizer_3,
    )


def world_t5(width: int, **net):
    """The world's T5 encoder (SD3's third text encoder) and its word-level tokenizer, freshly
    initialised: ``d_model`` = ``width`` (the transformer's ``joint_attention_dim``, which
    the two CLIP slots are padded to), relative position buckets spanning the whole prompt."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer(SD3_MAX_SEQUENCE_LENGTH)
    model = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, relative_attention_num_buckets=8,
        relative_attention_max_distance=SD3_MAX_SEQUENCE_LENGTH, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **net,
    ))
    return model.eval(), tokenizer


def _portable_tokenizer_class(folder: Path) -> None:
    """Record the T5 tokenizer as "PreTrainedTokenizerFast", which reads its tokenizer.json in
    every transformers version (4.x's "T5Tokenizer" would look for a sentencepiece file)."""
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
    table: Cond               # frozen prompt embeddings, one row per pretraining prompt, last row ""
    prompts: list[str]        # the table's rows ("" last)
    noise_counts: dict[str, int]  # images per caption-noise type (and "clean")

    @property
    def empty_id(self) -> int:
        return len(self.prompts) - 1


@torch.no_grad()
def build_pool(adapter, n: int, seed: int, caption_noise: dict[str, float] | None = None,
               batch: int = 256) -> LatentPool:
    from diffalign.pipelines import Cond

    prompts = split("pretrain")
    ids = {p: i for i, p in enumerate(prompts)}
    chosen = PromptSampler(prompts).sample(n, np.random.default_rng(seed))
    noise_rng = random.Random(seed * 7919 + 1)  # its own stream: the layouts stay as without noise
    scenes, kinds = zip(*(noisy_scene(prompt, caption_noise or {}, noise_rng) for prompt in chosen))
    counts = {"clean": 0, **Counter(kind or "clean" for kind in kinds)}
    render_rng = random.Random(seed)
    vae = adapter.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    for i in range(0, n, batch):
        images = render_batch(list(scenes[i:i + batch]), rng=render_rng)
        dist = vae.encode(images * 2 - 1).latent_dist
        means.append((dist.mean - shift) * scale)
        stds.append(dist.std * scale)
    embeds = adapter.encode_prompt(prompts + [""]).embeds
    return LatentPool(torch.cat(means), torch.cat(stds), torch.tensor([ids[p] for p in chosen]),
                      Cond({k: v.detach().clone() for k, v in embeds.items()}), prompts + [""], counts)


@dataclass
class TrainedText:
    """The text encoder trained with the denoiser and where its output goes: the SD pipeline's
    whole ``prompt_embeds`` (its CLIP tower), or the last ``tail`` tokens of SD3's (its T5,
    after the two frozen CLIP slots)."""

    module: torch.nn.Module
    ids: torch.Tensor  # [prompts, length] token ids, as the pipeline tokenizes them
    tail: int | None

    @classmethod
    def of(cls, adapter, prompts: list[str]) -> "TrainedText":
        pipe = adapter.pipe
        if adapter.family == "sd":
            module, tokenizer, length, tail = pipe.text_encoder, pipe.tokenizer, pipe.tokenizer.model_max_length, None
        else:
            module, tokenizer = pipe.text_encoder_3, pipe.tokenizer_3
            length = tail = adapter.max_sequence_length
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        return cls(module, ids, tail)

    def condition(self, table: Cond, rows: torch.Tensor) -> Cond:
        """The pool table's ``rows`` with the trained encoder's output in its slot."""
        frozen = table.select(rows)
        embeds = dict(frozen.embeds)
        trained = self.module(self.ids[rows])[0]
        prompt_embeds = embeds["prompt_embeds"]
        embeds["prompt_embeds"] = trained if self.tail is None else torch.cat([prompt_embeds[:, :-self.tail], trained], dim=1)
        return replace(frozen, embeds=embeds)


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
    from diffusers.training_utils import EMAModel

    cfg = cfg or EpsConfig()
    out = Path(out)
    folder = out / ("sd" if cfg.stage == "eps" else "sd3")
    clock = Stopwatch()
    torch.manual_seed(seed)
    adapter = make_adapter(build_pipeline(out, cfg))
    pool = build_pool(adapter, cfg.pool_size, seed, cfg.caption_noise)
    log(cfg.stage, f"pool of {len(pool.prompt_id)} latents encoded in {clock.minutes:.1f} min; "
                   f"images per caption-noise type: {pool.noise_counts}")

    denoiser = adapter.unwrapped_denoiser
    denoiser.requires_grad_(True).train()
    trained = [denoiser]
    text = None
    if cfg.train_text_encoder:
        text = TrainedText.of(adapter, pool.prompts)
        with torch.no_grad():  # the slot really is what the pipeline computes
            rows = torch.tensor([0, pool.empty_id])
            torch.testing.assert_close(text.condition(pool.table, rows).embeds["prompt_embeds"],
                                       pool.table.embeds["prompt_embeds"][rows])
        text.module.requires_grad_(True).train()
        trained.append(text.module)
    params = [p for module in trained for p in module.parameters()]
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
        cond = text.condition(pool.table, pid) if text else pool.table.select(pid)
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
            for module in trained:
                module.eval()
            adapter.clear_prompt_cache()  # the text encoder changed
            acc, _ = evaluate_t2i(adapter, heldout, 1, cfg.eval_steps, cfg.eval_guidance, seed + 1)
            for module in trained:
                module.train()
            ema.restore(params)
            curve.append({"step": step, "minutes": round(clock.minutes, 2), "loss": round(loss.item(), 4),
                          **{k: round(v["strict"], 3) for k, v in acc.items()}})
            log(cfg.stage, str(curve[-1]))

    ema.copy_to(params)  # the EMA weights are what ships
    for module in trained:
        module.requires_grad_(False).eval()
    adapter.pipe.save_pretrained(folder)
    for sub in ("tokenizer", "tokenizer_2"):  # CLIP's classic files too, as in clip/
        if (folder / sub).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(out / "clip" / name, folder / sub / name)
    if (folder / "tokenizer_3").is_dir():
        _portable_tokenizer_class(folder)
    train_minutes = clock.minutes
    param_counts = {adapter.denoiser_name: count_params(denoiser), "vae": count_params(adapter.vae)}
    for name in ("text_encoder", "text_encoder_3"):
        module = getattr(adapter.pipe, name, None)
        if module is not None:
            param_counts[f"{name} ({'trained' if text and module is text.module else 'frozen'})"] = count_params(module)
    entry = evaluate_folder(folder, cfg, seed)
    entry.update({
        "minutes": round(clock.minutes, 2), "train_minutes": round(train_minutes, 2), "seed": seed,
        "steps": cfg.steps, "config": asdict(cfg), "curve": curve,
        "params": param_counts, "caption_noise_images": pool.noise_counts,
    })
    update_report(out, cfg.stage, entry)
    log(cfg.stage, f"done in {entry['minutes']:.1f} min: {entry['summary']}")
    return entry


def evaluate_folder(folder: Path, cfg: T2IConfig, seed: int) -> dict:
    """The shipped folder, reloaded: held-out and align-split accuracy at the default sampling
    settings, and a guidance sweep."""
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
