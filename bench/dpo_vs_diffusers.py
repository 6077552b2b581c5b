"""Our Diffusion-DPO step vs a straightforward diffusers-style step: speed, and the same loss.

    python bench/dpo_vs_diffusers.py [--model world/sd] [--steps 20] [--batch 8]
                                     [--out outputs/bench/dpo_vs_diffusers.json]

The diffusers-style step is the training step of diffusers'
``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (LoRA on the UNet),
written out here: pixels in [-1, 1] with winners and losers concatenated, VAE ``latent_dist
.sample() * scaling_factor``, one noise and one timestep per pair shared by its two images,
``noise_scheduler.add_noise``, the tokenized captions through the text encoder, the UNet on the
policy and - with ``disable_adapters()`` under ``no_grad`` - on the reference, per-image MSE
to the target, ``loss = -logsigmoid(beta_dpo * (ref_diff - model_diff))`` (the diffusers
convention: no 0.5, so its ``beta_dpo`` is our ``beta / 2`` with ``beta_convention: official``,
METHODS.md section 3), backward, ``clip_grad_norm_``, AdamW, a constant lr scheduler, and the
script's per-step logging (``.item()`` of loss, raw losses, implicit accuracy).

Speed: our step runs through the shared loop (``diffalign.train.train``, method diffusion_dpo);
next to each of our timed steps the diffusers-style step runs on the same batch of pairs with its
own copy of the UNet+LoRA (identical initial weights) and its own optimizer, interleaved so
both see the same machine load (before ours on even steps, after it on odd ones). Both are
timed from the batch of pairs in memory to the optimizer step done (ours: ``compute_loss``,
backward, clipping, AdamW, the loop's bookkeeping; the diffusers-style step includes its
tokenization); our data step (reading pairs from the table) is reported separately. Reported:
median s/step and it/s of both, and their ratio (target: ours not slower, ratio <= 1).

Agreement: after the timed steps, both losses are computed on the same inputs - our trained
LoRA, one fresh batch, and our step's own latents, shared noise and timesteps (recorded from
its ``adapter.add_noise`` call and fed to the diffusers-style loss) - and the absolute loss
difference and the largest gradient difference over the LoRA parameters are printed.
SD-family (UNet) models only. Prints a table, writes JSON. A benchmark: never run by the tests
(a smoke test runs it on ``tiny:sd``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    REPO, Recorder, bench_config, fmt, median, patched_trainer, process_settings, run_training, write_results,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class DiffusersStyleDPO:
    """The diffusers example's DPO step on its own UNet (+LoRA) copy; shares the frozen VAE,
    tokenizer and text encoder of our adapter."""

    def __init__(self, adapter, unet, beta_dpo: float, lr: float, weight_decay: float, max_grad_norm: float | None,
                 seed: int = 0) -> None:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        self.vae = adapter.vae
        self.text_encoder = adapter.pipe.text_encoder
        self.tokenizer = adapter.pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(adapter.pipe.scheduler.config)
        self.unet = unet
        self.beta_dpo = beta_dpo
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        self.max_grad_norm = max_grad_norm
        self.generator = torch.Generator().manual_seed(seed)
        self.logs: dict = {}
        unet.train()  # the example does it once per epoch (an epoch of Pick-a-Pic is many steps)

    def draw_inputs(self, images_w, images_l, generator: torch.Generator):
        """The example's latents, shared noise and timesteps for a batch of pairs."""
        vae = self.vae
        device = next(self.unet.parameters()).device
        feed_pixel_values = torch.cat([images_w, images_l]).to(device) * 2 - 1
        latents = vae.encode(feed_pixel_values).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device).chunk(2)[0].repeat(2, 1, 1, 1)
        bsz = latents.shape[0] // 2
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,),
                                  generator=generator).to(device).repeat(2)
        return latents, noise, timesteps

    def loss(self, latents, noise, timesteps, captions):
        """The example's loss from its inputs (``latents`` winners first, then losers)."""
        unet = self.unet
        device = latents.device
        noisy_model_input = self.noise_scheduler.add_noise(latents, noise, timesteps)
        input_ids = self.tokenizer(list(captions), max_length=self.tokenizer.model_max_length, padding="max_length",
                                   truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            encoder_hidden_states = self.text_encoder(input_ids)[0].repeat(2, 1, 1)
        model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states).sample
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
        model_losses_w, model_losses_l = model_losses.chunk(2)
        raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
        model_diff = model_losses_w - model_losses_l
        unet.disable_adapters()
        with torch.no_grad():
            ref_preds = unet(noisy_model_input, timesteps, encoder_hidden_states).sample.detach()
            ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
            ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
            ref_losses_w, ref_losses_l = ref_loss.chunk(2)
            ref_diff = ref_losses_w - ref_losses_l
            raw_ref_loss = ref_loss.mean()
        unet.enable_adapters()
        logits = ref_diff - model_diff
        loss = -1 * F.logsigmoid(self.beta_dpo * logits).mean()
        implicit_acc = (logits > 0).sum().float() / logits.size(0)
        implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
        return loss, {"raw_model_loss": raw_model_loss, "ref_loss": raw_ref_loss, "implicit_acc": implicit_acc}

    def __call__(self, batch) -> None:
        """One optimizer step on a batch of pairs (as the example's loop body)."""
        latents, noise, timesteps = self.draw_inputs(batch.images_w, batch.images_l, self.generator)
        loss, extra = self.loss(latents, noise, timesteps, batch.captions)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.logs = {"loss": loss.detach().item(), **{k: v.detach().item() for k, v in extra.items()},
                     "lr": self.lr_scheduler.get_last_lr()[0]}


def agreement(trainer, diffusers_step: DiffusersStyleDPO) -> dict:
    """Both losses and gradients on one fresh batch, the same weights and the same inputs: our
    step's own latents, noise and timesteps (recorded from its ``adapter.add_noise`` call) are
    fed to the diffusers-style loss."""
    adapter = trainer.adapter
    unet = adapter.unwrapped_denoiser
    params = [p for p in unet.parameters() if p.requires_grad]
    batch = type(trainer).__mro__[1].next_microbatch(trainer)  # the trainer's own (not the timing wrapper's)
    adapter.train(True)
    seen = {}

    def recording_add_noise(x0, noise, t):
        seen.update(x0=x0.detach().clone(), noise=noise.detach().clone(), t=t.detach().clone())
        return type(adapter).add_noise(adapter, x0, noise, t)

    for p in params:
        p.grad = None
    adapter.add_noise = recording_add_noise  # an instance attribute shadows the method for this call
    try:
        ours, metrics = trainer.compute_loss(batch)
    finally:
        del adapter.add_noise
    ours.backward()
    grads_ours = [p.grad.detach().clone() for p in params]

    for p in params:
        p.grad = None
    reference = copy.copy(diffusers_step)
    reference.unet = unet  # the same (trained) weights as ours
    theirs, _ = reference.loss(seen["x0"], seen["noise"], seen["t"].long(), batch.captions)
    theirs.backward()
    grads_theirs = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads_ours, grads_theirs))
    grad_scale = max(a.abs().max().item() for a in grads_ours)
    return {"loss_ours": ours.item(), "loss_diffusers": theirs.item(),
            "loss_abs_diff": abs(ours.item() - theirs.item()),
            "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale,
            "logits_abs_mean_ours": float(metrics["logits/abs_mean"]), "pairs": len(batch)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="world/sd", help="an SD-family (UNet) model: world/sd, a folder, or tiny:sd")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--lora-rank", type=int, default=8, help="the diffusers example's default rank")
    parser.add_argument("--beta", type=float, default=5000.0,
                        help="official convention (diffusers' beta_dpo = beta / 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="run folder (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "dpo_vs_diffusers.json")
    a = parser.parse_args(argv)
    with process_settings(a.threads):
        return run(a)


def run(a) -> int:
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="diffalign_dpo_vs_diffusers_"))

    raw = bench_config("diffusion_dpo", a.model, workdir, lora_rank=a.lora_rank, max_steps=10**6)
    raw["method"].update(beta=a.beta, beta_convention="official")
    raw["optimization"]["batch_size"] = a.batch
    opt = raw["optimization"]

    def make_diffusers(trainer):
        adapter = trainer.adapter
        if adapter.family != "sd":
            raise SystemExit(f"--model: the diffusers DPO example trains SD-family UNets; "
                             f"{a.model} is {adapter.family}")
        unet = copy.deepcopy(adapter.unwrapped_denoiser)
        unet._forward_pre_hooks.clear()  # the copied NFE counter; count the copy's calls with ours instead
        unet._forward_pre_hooks_with_kwargs.clear()
        unet.register_forward_pre_hook(recorder.probe._hook, with_kwargs=True)
        return DiffusersStyleDPO(adapter, unet, beta_dpo=a.beta / 2, lr=opt["lr"], weight_decay=opt["weight_decay"],
                                 max_grad_norm=opt["max_grad_norm"])

    # its UNet copy must be taken before our first update: at the first fetch
    holder = {}

    def side_factory(trainer):
        return holder["step"]

    class Early(Recorder):
        def fetch(self, trainer, fetch):
            if "step" not in holder:
                holder["step"] = make_diffusers(trainer)
            return super().fetch(trainer, fetch)

    recorder = Early("diffusion_dpo", a.warmup, a.steps, side=side_factory)
    with patched_trainer("diffusion_dpo", recorder.subclass):
        run_training(raw)
    trainer = recorder.trainer
    summary = recorder.summary()
    timed = recorder.records[a.warmup:]
    check = agreement(trainer, holder["step"])

    ours_s, theirs_s = summary["update_s"], summary["side_s"]
    result = {
        "model": a.model, "pairs_per_step": a.batch, "lora_rank": a.lora_rank, "beta_official": a.beta,
        "beta_dpo_diffusers": a.beta / 2, "threads": torch.get_num_threads(), "steps_timed": len(timed),
        "ours_s_per_step": ours_s, "diffusers_s_per_step": theirs_s,
        "ours_it_per_s": 1 / ours_s, "diffusers_it_per_s": 1 / theirs_s,
        "ratio_ours_over_diffusers": ours_s / theirs_s,
        "ratio_paired_median": median(r["update_s"] / r["side_s"] for r in timed),
        "ours_data_s_per_step": summary["data_s"],
        "ours_cpu_s_per_step": summary["update_cpu_s"], "diffusers_cpu_s_per_step": summary["side_cpu_s"],
        "nfe_per_step_ours": summary["nfe_update_per_step"], "nfe_per_step_diffusers": summary["nfe_side_per_step"],
        "steps_side_first": summary["steps_side_first"],
        "diffusers_last_logs": holder["step"].logs,
        **check,
    }
    print(json.dumps(result))
    print(f"\n{'':<18} {'s/step':>8} {'it/s':>8} {'CPU s/step':>10} {'NFE/step':>8}")
    print(f"{'ours (train loop)':<18} {fmt(ours_s, '.4f')} {fmt(1 / ours_s, '.2f')} "
          f"{fmt(summary['update_cpu_s'], '.4f', 10)} {fmt(summary['nfe_update_per_step'], '.0f')}")
    print(f"{'diffusers-style':<18} {fmt(theirs_s, '.4f')} {fmt(1 / theirs_s, '.2f')} "
          f"{fmt(summary['side_cpu_s'], '.4f', 10)} {fmt(summary['nfe_side_per_step'], '.0f')}")
    print(f"ratio ours/diffusers: {result['ratio_ours_over_diffusers']:.3f} (paired median "
          f"{result['ratio_paired_median']:.3f}; target <= 1); our data step {summary['data_s']:.4f} s")
    print(f"same inputs: loss ours {check['loss_ours']:.8f} diffusers {check['loss_diffusers']:.8f} "
          f"|diff| {check['loss_abs_diff']:.3g}; max |grad diff| {check['grad_max_abs_diff']:.3g} "
          f"(max |grad| {check['grad_max_abs']:.3g})")
    write_results(a.out, {"result": result}, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
