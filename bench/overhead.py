"""Framework overhead per method: our training step vs a bare step with the same network calls.

    python bench/overhead.py [--model world/sd3] [--methods sft dpo grpo awm branch_grpo spo]
                             [--steps 20] [--warmup 3] [--out outputs/bench/overhead.json]

Each method trains through the shared loop (``diffalign.train.train``) at the sizes of
``bench/harness.py:bench_config``. Before each timed step's update, a *bare* step runs on the
very same micro-batch (interleaved, so both see the same machine load): hand-written PyTorch
that makes exactly the network calls the method's update makes (same rows, same modules, the
diffusers module call itself, ``adapter._forward``), then backward, gradient clipping and an
AdamW step with lr 0 (the same arithmetic, weights untouched, so our run is not disturbed).
What "bare" includes per method:

- sft: text encoder + VAE encoder (no grad), noise, one denoiser forward on B images, MSE to the
  target, backward, clip, AdamW.
- diffusion_dpo: text encoder + VAE encoder on the 2B images (no grad), one shared noise and
  timestep per pair, policy forward on 2B rows, reference forward on 2B rows (LoRA disabled /
  frozen copy, no grad), the sigmoid DPO loss, backward, clip, AdamW.
- grpo, branch_grpo: one guided policy forward on the micro-batch's stored transitions (2 rows
  per transition with classifier-free guidance), a stand-in loss ``-(A * mean_d pred)``,
  backward, clip, AdamW. NOT included: recomputing the transition mean / log-prob and the
  clipped surrogate (the method's own math counts as overhead here).
- awm: noise at ``timesteps_per_sample`` times per sample, one unguided forward on all of them,
  the advantage-weighted MSE, backward, clip, AdamW.
- spo: one guided policy forward on the pairs' states (one state per pair when both
  children share it) and the same forward of the reference (no grad), a stand-in loss (MSE
  between the two), backward, clip, AdamW. NOT included: the log-probs and the SPO loss.

Reported per method: median update time of our step (from the micro-batch in hand to the
optimizer step done: loss, backward, clipping, AdamW, the loop's bookkeeping) and of the bare
step, their ratio (target <= 1.10) and the median of the per-step ratios; the data step
(offline: reading the batch; online: the rollout) separately; network evaluations (NFE: rows
through the denoiser, with CFG counting twice; ours and bare are checked to match) and CPU
seconds (process time, all threads) per step and per iteration (online: one rollout plus the
optimizer steps over it; offline: one step). The first ``--warmup`` steps and, for online
methods, the first rollout are excluded; figures are medians. Prints a table, writes JSON.
A benchmark: never run by the tests (a smoke test runs it on a tiny model).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    REPO, Recorder, add_model_and_methods, apply_overrides, bench_config, fmt, patched_trainer, process_settings,
    resolve_methods, run_training, write_results,
)

import torch  # noqa: E402

from diffalign.config import add_overrides_argument  # noqa: E402
from diffalign.pipelines.base import model_dtype  # noqa: E402
from diffalign.train import adamw  # noqa: E402

BARE_INCLUDES = {
    "sft": "text enc + VAE enc (no grad); 1 denoiser fwd on B; MSE; backward; clip; AdamW",
    "diffusion_dpo": "text enc + VAE enc on 2B (no grad); policy fwd 2B; reference fwd 2B (no grad); "
                     "DPO sigmoid loss; backward; clip; AdamW",
    "grpo": "guided policy fwd on the stored transitions (2 rows each with CFG); stand-in loss; backward; "
            "clip; AdamW (not: transition log-probs, clipped surrogate)",
    "branch_grpo": "guided policy fwd on the stored tree edges (2 rows each with CFG); stand-in loss; "
                   "backward; clip; AdamW (not: transition log-probs, clipped surrogate)",
    "awm": "noise at k times per sample; 1 unguided fwd on B*k rows; advantage-weighted MSE; backward; "
           "clip; AdamW",
    "spo": "guided policy fwd on the pair states + the same reference fwd (no grad); stand-in loss; "
           "backward; clip; AdamW (not: transition log-probs, SPO loss)",
}


# --------------------------------------------------------------------------------------------
# The bare step
# --------------------------------------------------------------------------------------------


def vae_encode(adapter, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    vae = adapter.vae
    with torch.no_grad():
        latents = vae.encode((images.to(adapter.device, model_dtype(vae)) * 2 - 1)).latent_dist.sample(generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def guided(adapter, module, x, t, cond, scale: float):
    """The denoiser with classifier-free guidance: one call on [uncond; cond]."""
    if scale == 1.0 or cond.negative is None:
        return adapter._forward(module, x, t, cond.embeds, scale)
    both = {k: torch.cat([cond.negative[k], cond.embeds[k]]) for k in cond.embeds}
    uncond, conditional = adapter._forward(module, torch.cat([x, x]), torch.cat([t, t]), both, scale).chunk(2)
    return uncond + scale * (conditional - uncond)


class BareStep:
    """The minimal step with the method's network calls (see the module docstring)."""

    def __init__(self, method: str, trainer) -> None:
        self.method = method
        self.trainer = trainer
        self.adapter = trainer.adapter
        self.params = self.adapter.trainable_parameters()
        kind = trainer.run_config.optimization.optimizer
        self.optimizer = adamw(self.params, kind=kind, lr=0.0, weight_decay=0.0)  # the loop's AdamW
        self.max_grad_norm = trainer.run_config.optimization.max_grad_norm
        self.generator = torch.Generator().manual_seed(1234)

    @property
    def module(self):
        return self.adapter.unwrapped_denoiser

    def reference(self):
        """(module, context): the frozen copy of a full fine-tune, or the LoRA disabled."""
        a = self.adapter
        if a._frozen_denoiser is not None:
            return a._frozen_denoiser, _nullcontext()
        return self.module, _lora_disabled(self.adapter)

    def __call__(self, batch) -> None:
        loss = getattr(self, self.method)(batch)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- per method ------------------------------------------------------------------------

    def sft(self, batch):
        a, g = self.adapter, self.generator
        with torch.no_grad():
            embeds = a._encode(list(batch.captions))
        x0 = vae_encode(a, batch.images, g)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        t = a.sample_train_timesteps(x0.shape[0], generator=g)
        pred = a._forward(self.module, a.add_noise(x0, noise, t), t, embeds, 1.0)
        return (pred.float() - a.training_target(x0, noise, t).float()).pow(2).mean()

    def diffusion_dpo(self, batch):
        a, g, c = self.adapter, self.generator, self.trainer.config
        b = len(batch)
        with torch.no_grad():
            embeds = {k: torch.cat([v, v]) for k, v in a._encode(list(batch.captions)).items()}
        if a.family == "sdxl":
            from diffalign.trainers.dpo import sdxl_time_ids

            embeds["time_ids"] = sdxl_time_ids(batch, a.default_resolution).to(a.device)
        x0 = vae_encode(a, torch.cat([batch.images_w, batch.images_l]), g)
        t = a.sample_train_timesteps(b, generator=g).repeat(2)
        noise = torch.randn(x0[:b].shape, generator=g).to(x0.device).repeat(2, 1, 1, 1)
        x_t, target = a.add_noise(x0, noise, t), a.training_target(x0, noise, t).float()
        dims = tuple(range(1, x0.ndim))
        mse = (a._forward(self.module, x_t, t, embeds, c.train_guidance_scale).float() - target).pow(2).mean(dims)
        module, context = self.reference()
        with torch.no_grad(), context:
            ref = (a._forward(module, x_t, t, embeds, c.train_guidance_scale).float() - target).pow(2).mean(dims)
        mse_w, mse_l = mse.chunk(2)
        ref_w, ref_l = ref.chunk(2)
        return -torch.nn.functional.logsigmoid(-c.beta_eff * ((mse_w - mse_l) - (ref_w - ref_l))).mean()

    def grpo(self, batch):
        tr = self.trainer
        cond = tr.cond.select(batch["prompt_index"])
        pred = guided(self.adapter, self.module, batch["x"], batch["t"], cond, tr.trajectory.guidance_scale)
        loss = -(batch["advantage"] * pred.float().mean(dim=tuple(range(1, pred.ndim)))).mean()
        if tr.config.kl_beta > 0:
            module, context = self.reference()
            with torch.no_grad(), context:
                ref = guided(self.adapter, module, batch["x"], batch["t"], cond, tr.trajectory.guidance_scale)
            loss = loss + tr.config.kl_beta * (pred.float() - ref.float()).pow(2).mean()
        return loss

    branch_grpo = grpo

    def awm(self, batch):
        a, g, tr = self.adapter, self.generator, self.trainer
        k = tr.config.timesteps_per_sample
        n = batch["x0"].shape[0]
        x0 = batch["x0"].repeat_interleave(k, dim=0)
        t = a.timesteps_from_uniform(((torch.arange(k) + torch.rand(n, k, generator=g)) / k).flatten())
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        cond = tr.cond.select(batch["prompt_index"]).repeat_interleave(k)
        pred = a._forward(self.module, a.add_noise(x0, noise, t), t, cond.embeds, 1.0).float()
        per_sample = (pred - a.training_target(x0, noise, t).float()).pow(2).mean(dim=(1, 2, 3)).view(-1, k).mean(1)
        loss = (batch["advantage"] * per_sample).mean()
        if tr.config.kl_beta > 0 or tr.config.ema_kl_beta > 0:
            module, context = self.reference()
            with torch.no_grad(), context:
                ref = a._forward(module, a.add_noise(x0, noise, t), t, cond.embeds, 1.0).float()
            loss = loss + (pred - ref).pow(2).mean()
        return loss

    def spo(self, batch):
        a, tr = self.adapter, self.trainer
        scale = tr.config.guidance_scale
        cond = tr.cond.select(batch["prompt_index"])
        if bool(batch["same_parent"].all()):
            x, t = batch["x_w"], batch["t"]
        else:
            x, t = torch.cat([batch["x_w"], batch["x_l"]]), torch.cat([batch["t"], batch["t"]])
            cond = type(cond).cat([cond, cond])
        pred = guided(a, self.module, x, t, cond, scale)
        module, context = self.reference()
        with torch.no_grad(), context:
            ref = guided(a, module, x, t, cond, scale)
        return (pred.float() - ref.float()).pow(2).mean()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _lora_disabled:
    def __init__(self, adapter) -> None:
        self.adapter = adapter

    def __enter__(self):
        self.adapter.set_lora_enabled(False)

    def __exit__(self, *exc):
        self.adapter.set_lora_enabled(True)
        return False


# --------------------------------------------------------------------------------------------
# Timing around the shared loop
# --------------------------------------------------------------------------------------------


def summarize(recorder: Recorder) -> dict:
    """The recorder's figures, with the side step named "bare"."""
    return {k.replace("side", "bare"): v for k, v in recorder.summary().items()}


def measure(method: str, a, workdir: Path) -> dict:
    raw = bench_config(method, a.model, workdir / method, training=a.training, lora_rank=a.lora_rank,
                       max_steps=10**6, step_aware_pm=a.step_aware_pm)
    raw = apply_overrides(raw, method, a.overrides)
    if raw["optimization"].get("gradient_accumulation_steps", 1) != 1:
        raise ValueError("optimization.gradient_accumulation_steps must be 1 here (one micro-batch per timed step)")
    recorder = Recorder(method, a.warmup, a.steps, a.iterations, side=lambda trainer: BareStep(method, trainer))
    with patched_trainer(method, recorder.subclass):
        run_training(raw)
    tr = recorder.trainer
    result = {"method": method, "model": a.model, "training": a.training,
              "batch_size": raw["optimization"]["batch_size"], "threads": torch.get_num_threads(),
              "bare_includes": BARE_INCLUDES[method], **summarize(recorder)}
    if tr is not None:
        result["family"] = tr.adapter.family
        result["trainable_params"] = sum(p.numel() for p in tr.adapter.trainable_parameters())
    result["setup_nfe"] = recorder.probe.count("setup")
    return result


def print_table(results: list[dict]) -> None:
    print(f"\n{'method':<14} {'update s':>9} {'bare s':>8} {'ratio':>6} {'paired':>6} {'w/ data':>7} "
          f"{'NFE/step':>8} {'rollout s':>9} {'NFE/iter':>8} {'CPU s/iter':>10} {'steps/iter':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<14} ERROR: {r['error']}")
            continue
        print(f"{r['method']:<14} {fmt(r['update_s'], '.4f', 9)} {fmt(r['bare_s'], '.4f')} "
              f"{fmt(r['overhead_update'], '.2f', 6)} {fmt(r['overhead_update_paired_median'], '.2f', 6)} "
              f"{fmt(r.get('overhead_with_data'), '.2f', 7)} {fmt(r['nfe_update_per_step'], '.0f')} "
              f"{fmt(r.get('rollout_s'), '.3f', 9)} {fmt(r['nfe_per_iteration'], '.0f')} "
              f"{fmt(r['cpu_s_per_iteration'], '.3f', 10)} {fmt(r.get('steps_per_iteration', 1), '.0f', 10)}")
    print("ratio = median(our update) / median(bare); paired = median of per-step ratios; "
          "w/ data = (update + data step) / bare (offline methods); target ratio <= 1.10")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_and_methods(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per method (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--iterations", type=int, default=1,
                        help="online methods: complete rollout iterations to time after the first (warm-up) one")
    parser.add_argument("--training", choices=["lora", "full"], default="lora")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds comparable across loads)")
    parser.add_argument("--step-aware-pm", default=None,
                        help="spo's preference model (default: outputs/step_aware_pm_shapes/final, else world/clip)")
    add_overrides_argument(parser, "[METHOD:]KEY=VALUE", "config overrides for every method, or one method with a "
                           "METHOD: prefix")
    parser.add_argument("--workdir", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "overhead.json")
    a = parser.parse_args(argv)
    with process_settings(a.threads):
        return run(a, parser)


def run(a, parser) -> int:
    methods = resolve_methods(parser, a.methods)
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="diffalign_overhead_"))
    results = []
    for method in methods:
        start = time.perf_counter()
        try:
            results.append(measure(method, a, workdir))
        except Exception as e:  # record and go on: one broken method should not hide the others
            traceback.print_exc()
            results.append({"method": method, "error": f"{type(e).__name__}: {e}"})
        results[-1]["bench_wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(results[-1]), flush=True)
    print_table(results)
    write_results(a.out, {"results": results}, a)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
