"""Peak memory (RSS) per method, LoRA vs full fine-tuning, each run in a fresh process.

    python bench/memory.py [--model world/sd3] [--methods sft dpo grpo awm branch_grpo spo]
                           [--trainings lora full] [--steps 3] [--out outputs/bench/memory.json]

Every (method, training) pair runs ``--steps`` optimizer steps of the shared training loop at the
sizes of ``bench/harness.py:bench_config`` in its own subprocess, so the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark; Linux reports KiB)
belongs to that run alone. Reported: the peak after importing every library a run loads (torch,
diffusers, transformers, accelerate, peft, datasets, open_clip, diffalign; no model built yet),
the peak at the end, their difference (model, reference copy, optimizer state, activations,
rollout buffers and - for diffusion_dpo - generating its small synthetic pair set), and the
number of trainable parameters. Full fine-tuning keeps a frozen copy of the denoiser as the
reference (every method, whether or not it uses one). On tiny models the difference is mostly
allocator and library working memory, not the model. Prints a table, writes JSON. A benchmark:
never run by the tests (a smoke test runs it on a tiny model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    REPO, add_model_and_methods, apply_overrides, bench_config, fmt, peak_rss_mb, resolve_methods, write_results,
)

from diffalign.config import add_overrides_argument  # noqa: E402


def run_case(method: str, training: str, a) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from harness import patched_trainer, run_training

    torch.set_num_threads(a.threads)
    import_libraries()
    baseline = peak_rss_mb()
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="diffalign_memory_")) / f"{method}_{training}"
    raw = bench_config(method, a.model, workdir, training=training, lora_rank=a.lora_rank, max_steps=a.steps,
                       step_aware_pm=a.step_aware_pm)
    raw = apply_overrides(raw, method, a.overrides)
    seen = {}

    def capture(base):
        class Measured(base):
            def __init__(self, run_config, adapter, accelerator, rewards=None):
                super().__init__(run_config, adapter, accelerator, rewards)
                seen["trainable"] = sum(p.numel() for p in adapter.trainable_parameters())

        return Measured

    with patched_trainer(method, capture):
        run_training(raw)
    peak = peak_rss_mb()
    return {"method": method, "training": training, "model": a.model, "steps": a.steps,
            "batch_size": raw["optimization"]["batch_size"], "baseline_peak_rss_mb": baseline,
            "peak_rss_mb": peak, "run_rss_mb": peak - baseline, "trainable_params": seen.get("trainable")}


def import_libraries() -> None:
    """Import the code a run loads lazily (so the baseline is "all code loaded, no model")."""
    import importlib

    for name in ("diffusers", "transformers", "accelerate", "peft", "datasets", "open_clip",
                 "diffusers.optimization", "diffusers.training_utils", "diffalign.train", "diffalign.rewards",
                 "diffalign.pipelines.sd", "diffalign.pipelines.sd3", "diffalign.pipelines.sdxl",
                 "diffalign.pipelines.flux"):
        importlib.import_module(name)
    from diffalign.trainers import trainer_class

    trainer_class("sft")  # imports every trainer


def child_command(method: str, training: str, a) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", f"{method}:{training}", "--model", a.model,
           "--steps", str(a.steps), "--lora-rank", str(a.lora_rank), "--threads", str(a.threads)]
    if a.step_aware_pm:
        cmd += ["--step-aware-pm", a.step_aware_pm]
    if a.workdir:
        cmd += ["--workdir", str(a.workdir)]
    for item in a.overrides:
        cmd += ["--set", item]
    return cmd


def print_table(results: list[dict]) -> None:
    print(f"\n{'method':<14} {'training':<8} {'peak RSS MB':>11} {'imports MB':>10} {'run MB':>8} {'trainable':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<14} {r['training']:<8} ERROR: {r['error'][-200:]}")
            continue
        print(f"{r['method']:<14} {r['training']:<8} {fmt(r['peak_rss_mb'], '.0f', 11)} "
              f"{fmt(r['baseline_peak_rss_mb'], '.0f', 10)} {fmt(r['run_rss_mb'], '.0f')} {r['trainable_params']:>11,}")
    print("peak RSS: ru_maxrss of the run's own process; imports: the peak after importing every library a run "
          "loads, before any model; run = peak - imports")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_and_methods(parser)
    parser.add_argument("--trainings", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-aware-pm", default=None,
                        help="spo's preference model (default: outputs/step_aware_pm_shapes/final, else world/clip)")
    add_overrides_argument(parser, "[METHOD:]KEY=VALUE", "config overrides for every method, or one method with a "
                           "METHOD: prefix")
    parser.add_argument("--workdir", type=Path, default=None, help="run folders (default: temporary folders)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "memory.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # method:training, run in a subprocess
    a = parser.parse_args(argv)
    if a.case:
        method, training = a.case.split(":")
        print("RESULT " + json.dumps(run_case(method, training, a)), flush=True)
        return 0
    methods = resolve_methods(parser, a.methods)
    results = []
    for method in methods:
        for training in a.trainings:
            proc = subprocess.run(child_command(method, training, a), capture_output=True, text=True, cwd=REPO)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                results.append({"method": method, "training": training, "error": proc.stderr[-3000:]})
                print(f"{method}:{training} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            else:
                results.append(json.loads(line[-1][len("RESULT "):]))
                print(json.dumps(results[-1]), flush=True)
    print_table(results)
    write_results(a.out, {"results": results}, a)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
