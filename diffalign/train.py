"""The one training loop every method shares.

    accelerate launch diffalign/train.py --cfg spo_sdxl.yaml [--set key=value ...] [--resume]

Reads top to bottom: build the model and the method's trainer from the config, prepare with
accelerate, then repeat {micro-batch -> loss -> backward} with gradient accumulation, clipping,
an optional EMA, logging, evaluation and atomic checkpoints. Outputs go to
``<output.dir>/<run_name>/``: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/`` and ``final/`` (the trained LoRA, loadable with ``pipe.load_lora_weights``).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (`accelerate launch diffalign/train.py`): the script's own folder must not
    # shadow top-level modules, and the repository root must be importable.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from diffalign.checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint, save_checkpoint, saved_config
from diffalign.config import ConfigError, RunConfig, add_overrides_argument, config_to_dict, load_config
from diffalign.run_log import RunLog

@dataclass
class TrainResult:
    output_dir: Path
    step: int
    final_metrics: dict[str, Any]
    start_eval: dict[str, float]
    end_eval: dict[str, float]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def build_adapter(cfg: RunConfig):
    """The model from ``cfg.model``: a local folder / hub id, a world model, or a tiny one."""
    m = cfg.model
    if m.family == "causal_lm":  # text: diffalign.llm's adapter (the same training-loop interface)
        from diffalign.llm import build_llm_adapter

        try:
            return build_llm_adapter(m, seed=cfg.seed)
        except (OSError, ValueError) as e:  # missing folder, corrupt weights: name the key
            raise ConfigError(f"model.path: {e}") from None
    from diffalign.models import load_model

    if m.tiny:  # a smoke test: the tiny model keeps its own size and precision
        adapter = load_model(f"tiny:{m.family}", seed=cfg.seed)
    else:
        try:
            adapter = load_model(m.path, family=m.family, dtype=m.dtype, variant=m.variant)
        except (OSError, ValueError) as e:  # missing folder, not a pipeline, corrupt weights: name the key
            raise ConfigError(f"model.path: {e}") from None
        if m.resolution is not None:
            adapter.resolution = m.resolution
    if m.max_sequence_length is not None:
        adapter.max_sequence_length = m.max_sequence_length
    if m.gradient_checkpointing:
        adapter.unwrapped_denoiser.enable_gradient_checkpointing()
    return adapter


def build_rewards(cfg: RunConfig):
    """The configured reward plugins (``None`` when the method needs none).

    With ``model.tiny: true`` (a smoke test of a real-model recipe), rewards that need weight
    files get tiny random weights in their official layout (``diffalign.rewards.tiny``).
    """
    if not cfg.rewards:
        return None
    from diffalign.rewards import MultiReward

    models = {key: (make_reward(spec.name or key, spec.kwargs, cfg.model.tiny, f"rewards.{key}"), spec.weight)
              for key, spec in cfg.rewards.items()}
    return MultiReward(models)


def make_reward(name: str, options: dict, tiny: bool, key: str):
    """One reward plugin (a tiny stand-in when ``tiny`` and the plugin needs weights)."""
    from diffalign.rewards import build_reward
    from diffalign.rewards.tiny import TINY_REWARDS, build_tiny_reward

    try:
        if tiny and name in TINY_REWARDS:
            print(f"model.tiny: {key} ({name}) uses tiny random weights (smoke test)", file=sys.stderr)
            return build_tiny_reward(name)
        return build_reward(name, **options)
    except (TypeError, ValueError, OSError) as e:  # unknown plugin or option, missing or corrupt weights
        raise ConfigError(f"{key}: {e}") from None


def adamw(params: list[torch.nn.Parameter], kind: str = "adamw", **options) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` as ``optimization.optimizer`` names it: ``adamw`` multi-tensor
    (foreach) also on the CPU, ``adamw_fused`` its fused kernel.

    torch picks the foreach implementation by default only for CUDA tensors; on the CPU it is
    bit-identical to the per-tensor loop and faster for a LoRA's many small tensors (about 1 ms
    of a 0.3 s step on the world's models, ``bench/dpo_vs_diffusers.py``). The fused kernel is
    faster still (another 2 ms there) but rounds differently in the last bit.
    """
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **options)
    on_cpu = all(p.device.type == "cpu" for p in params)
    return torch.optim.AdamW(params, foreach=True if on_cpu else None, **options)


def reduce_metrics(accelerator, metrics: dict[str, Any]) -> dict[str, float]:
    """Mean of every numeric metric over processes (one all-reduce for the whole dict)."""
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))]
    if not keys:
        return {}
    values = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


def check_rank_sync(accelerator, params, step: int) -> None:
    """Raise if the processes' trainable weights differ (per-tensor sums, compared exactly)."""
    if accelerator.num_processes == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in params])
    gathered = accelerator.gather(sums[None])
    if not bool((gathered == gathered[0]).all()):
        worst = (gathered - gathered[0]).abs().max().item()
        raise RuntimeError(f"step {step}: processes hold different weights (max per-tensor sum difference {worst:.3g})")


class MetricAverager:
    """Averages micro-batch metrics over one optimizer step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean().item()
            if isinstance(value, (int, float)):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


def _check_resume_compatible(checkpoint: Path, cfg_dict: dict) -> None:
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {checkpoint}: not a complete checkpoint ({STATE_FILE} missing)")
    old = saved_config(checkpoint)
    for section in ("model", "method"):
        if old.get(section) != cfg_dict.get(section):
            raise ConfigError(
                f"--resume {checkpoint}: its '{section}' section differs from this run's config; "
                f"resume with the same config or start a new run_name"
            )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: RunConfig, resume: str | bool | None = None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from diffalign.trainers import trainer_class

    opt = cfg.optimization
    out_dir = cfg.output_dir
    cfg_dict = config_to_dict(cfg)
    mixed_precision = opt.mixed_precision
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        print("optimization.mixed_precision: fp16 needs a GPU; running in full precision on this CPU", file=sys.stderr)
        mixed_precision = "no"
    # accelerate keeps its settings in process-wide singletons; clear them so train() can be
    # called again in one process (sweeps, notebooks, tests) with other precision/accumulation
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=opt.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        # without a GPU, a multi-process launch must use gloo on the CPU (accelerate's multi-GPU
        # launcher does not pass its use_cpu setting on to the processes)
        cpu=not torch.cuda.is_available(),
    )
    set_seed(cfg.seed, device_specific=True)
    main = accelerator.is_main_process

    # ---- model, method, optimizer ---------------------------------------------------------
    trainer_cls = trainer_class(cfg.method.name)
    # A method whose trained network is not the configured model (step_aware_pm trains a reward
    # model next to a frozen diffusion model) builds its own adapter with the same method names.
    adapter = getattr(trainer_cls, "build_adapter", build_adapter)(cfg).to(accelerator.device)
    if cfg.model.training == "lora":
        lora = cfg.model.lora
        adapter.add_lora(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, dropout=lora.dropout)
    else:
        adapter.enable_full_finetune()
    rewards = build_rewards(cfg)
    if rewards is not None:
        rewards.to(accelerator.device)
    trainer = trainer_cls(cfg, adapter, accelerator, rewards)

    params = adapter.trainable_parameters()
    optimizer = adamw(
        params, kind=opt.optimizer, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2),
        weight_decay=opt.weight_decay, eps=opt.adam_eps,
    )
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = get_scheduler(
        opt.lr_scheduler,
        optimizer,
        num_warmup_steps=opt.warmup_steps * accelerator.num_processes,
        num_training_steps=opt.max_steps * accelerator.num_processes,
    )
    denoiser, optimizer, lr_scheduler = accelerator.prepare(adapter.unwrapped_denoiser, optimizer, lr_scheduler)
    adapter.denoiser = denoiser
    ema = EMAModel(params, decay=opt.ema.decay, update_after_step=opt.ema.update_after_step) if opt.ema.enabled else None

    # ---- resume -------------------------------------------------------------------------------
    ckpt_root = out_dir / "checkpoints"
    step, micro_step, nonfinite_in_row, nonfinite_total = 0, 0, 0, 0
    if resume:
        checkpoint = latest_checkpoint(ckpt_root) if resume is True else Path(resume)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {ckpt_root}")
        _check_resume_compatible(checkpoint, cfg_dict)
        counters = load_checkpoint(
            checkpoint, accelerator=accelerator, adapter=adapter, optimizer=optimizer,
            lr_scheduler=lr_scheduler, trainer=trainer, ema=ema,
        )
        step, micro_step, nonfinite_total = counters["step"], counters["micro_step"], counters["nonfinite_total"]
        if main:
            print(f"resumed from {checkpoint} at step {step}")

    log = RunLog(out_dir, tensorboard=cfg.logging.tensorboard, enabled=main)
    if resume:
        log.truncate_after(step)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))

    def evaluate() -> dict[str, float]:
        adapter.train(False)
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        try:
            metrics = trainer.evaluate()
        finally:
            if ema is not None:
                ema.restore(params)
        metrics = reduce_metrics(accelerator, metrics)
        if metrics:
            log.log(step, {f"eval/{k}": v for k, v in metrics.items()})
        return metrics

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_root, step, accelerator=accelerator, adapter=adapter, optimizer=optimizer,
            lr_scheduler=lr_scheduler, trainer=trainer, ema=ema, config=cfg_dict,
            counters={"micro_step": micro_step, "nonfinite_total": nonfinite_total},
            keep_last=cfg.output.keep_last,
        )

    start_eval = evaluate() if step == 0 else {}
    progress = tqdm(
        total=opt.max_steps, initial=step, desc=cfg.run_name, disable=not (main and cfg.logging.progress_bar),
        dynamic_ncols=True,
    )
    averager = MetricAverager()
    last_logged: dict[str, Any] = {}
    grad_norm = torch.tensor(0.0)
    checkpoint_due = False

    # ---- training ----------------------------------------------------------------------------
    while step < opt.max_steps:
        adapter.train(True)
        batch = trainer.next_microbatch()
        with accelerator.accumulate(denoiser):
            loss, metrics = trainer.compute_loss(batch)
            # Always backward, even a NaN loss: its NaN gradients reach every process through the
            # gradient all-reduce, so all processes skip the same step (no rank falls out of sync).
            accelerator.backward(loss)
            averager.add(metrics)
            finite = True
            if accelerator.sync_gradients:
                if opt.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(params, opt.max_grad_norm)
                else:
                    grads = [p.grad.norm() for p in params if p.grad is not None]
                    grad_norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
                # DeepSpeed reports its engine's norm as a Python float, or None when it has none
                finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
                grad_norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm)
                if finite:
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        micro_step += 1
        if not accelerator.sync_gradients:
            continue

        # ---- one optimizer step done ------------------------------------------------------------
        if not finite:
            nonfinite_in_row += 1
            nonfinite_total += 1
            if nonfinite_in_row >= opt.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{nonfinite_in_row} optimizer steps in a row had a NaN/Inf loss or gradient "
                    f"(optimization.max_nonfinite_steps={opt.max_nonfinite_steps}); last loss {loss.item()}. "
                    "Lower optimization.lr or check the data and rewards."
                )
            continue
        nonfinite_in_row = 0
        step += 1
        if ema is not None:
            ema.step(params)
        if cfg.logging.check_rank_sync:
            check_rank_sync(accelerator, params, step)
        progress.update(1)

        if step % cfg.logging.every == 0 or step == opt.max_steps:
            metrics = averager.pop()
            metrics.update(trainer.pop_data_metrics())
            metrics["lr"] = lr_scheduler.get_last_lr()[0]
            metrics["grad_norm"] = float(grad_norm)
            metrics["nonfinite_steps"] = nonfinite_total
            last_logged = log.log(step, reduce_metrics(accelerator, metrics))
            progress.set_postfix({k: f"{v:.4g}" for k, v in last_logged.items() if k in ("loss", "reward", "grad_norm")})
        if cfg.logging.eval_every and step % cfg.logging.eval_every == 0 and step < opt.max_steps:
            evaluate()
        checkpoint_due = checkpoint_due or (cfg.output.checkpoint_every and step % cfg.output.checkpoint_every == 0)
        if checkpoint_due and trainer.at_boundary():
            checkpoint()
            checkpoint_due = False

    progress.close()
    end_eval = evaluate()
    if cfg.output.save_final:
        if ema is not None:
            ema.copy_to(params)  # the final adapter is the averaged one
        if main:
            adapter.save_trained(out_dir / "final")
    accelerator.wait_for_everyone()
    log.close()
    accelerator.end_training()
    return TrainResult(out_dir, step, last_logged, start_eval, end_eval)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--cfg", required=True, help="YAML recipe: a path, or a name in configs/ (e.g. spo_sdxl.yaml)")
    add_overrides_argument(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from the newest complete checkpoint of this run (or the given folder)")
    return parser


def run(args: argparse.Namespace) -> TrainResult:
    cfg = load_config(args.cfg, args.overrides)
    return train(cfg, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="diffalign train", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ConfigError, OSError, ValueError) as e:  # bad input: a message, not a traceback (as `diffalign train`)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
