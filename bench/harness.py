"""Shared pieces of the image benchmarks (``bench/overhead.py``, ``memory.py``,
``dpo_vs_diffusers.py``, ``alignment.py``); not a benchmark itself.

- :func:`bench_config`: a small run config per method for a model name (``world/sd3``,
  ``tiny:sd`` ...), built in code so every method runs on any model at the same sizes.
- :class:`NetworkProbe`: counts denoiser evaluations (rows of every network call: a batch of n
  with classifier-free guidance is 2n, as ``Trajectory.nfe`` counts) by phase, with forward
  pre-hooks on the trained denoiser and on the frozen reference copy of a full fine-tune.
- :func:`patched_trainer`: run the shared training loop (``diffalign.train.train``) with a
  subclass of a method's trainer swapped in (to time or count around its two hooks,
  ``next_microbatch`` and ``evaluate``), without touching the library.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: the methods the image benchmarks cover (config names)
IMAGE_METHODS = ("sft", "diffusion_dpo", "grpo", "awm", "branch_grpo", "spo")
ONLINE = ("grpo", "awm", "branch_grpo", "spo")


class StopRun(Exception):
    """Raised from a patched trainer to end a benchmark run early (no final eval or save)."""


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def add_model_and_methods(parser) -> None:
    """``--model`` and ``--methods``, the same in every per-method benchmark."""
    parser.add_argument("--model", default="world/sd3",
                        help="world/sd3, world/sd, a diffusers folder, or tiny:<family>")
    parser.add_argument("--methods", nargs="+", default=list(IMAGE_METHODS),
                        help=f"from {', '.join(IMAGE_METHODS)} ('dpo' = diffusion_dpo)")


def resolve_methods(parser, names: list[str]) -> list[str]:
    """``--methods`` values -> config names (``dpo`` = ``diffusion_dpo``); unknown ones end the run."""
    methods = [{"dpo": "diffusion_dpo"}.get(m, m) for m in names]
    unknown = [m for m in methods if m not in IMAGE_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(IMAGE_METHODS)}")
    return methods


def write_results(out: Path, payload: dict, args) -> None:
    """``payload`` plus the command-line arguments as ``out`` (JSON), creating its folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**payload, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    print(f"wrote {out}")


def is_tiny(model: str) -> bool:
    return model.startswith("tiny:")


def model_section(model: str, training: str = "lora", lora_rank: int = 16) -> dict:
    """``tiny:<family>`` -> the family's tiny random model; anything else -> ``model.path``."""
    section: dict[str, Any] = {"training": training, "lora": {"rank": lora_rank}}
    if is_tiny(model):
        section.update(family=model.split(":", 1)[1], tiny=True)
    else:
        section["path"] = model
    return section


def default_step_aware_pm() -> str:
    """The world's trained step-aware preference model if it exists, else the plain world CLIP
    (identity time modulation: a valid, untrained step-aware model - fine for cost numbers)."""
    trained = REPO / "outputs" / "step_aware_pm_shapes" / "final"
    return str(trained) if trained.is_dir() else "world/clip"


def bench_config(method: str, model: str, out_dir: Path, *, training: str = "lora", lora_rank: int = 16,
                 seed: int = 0, max_steps: int = 100, pairs_dir: Path | None = None,
                 step_aware_pm: str | None = None) -> dict:
    """A raw run config (a YAML-like mapping) for ``method`` at benchmark sizes.

    Sizes (per optimizer step, gradient accumulation 1):
    sft 8 images; diffusion_dpo 8 pairs; grpo 2 prompts x 4 samples x 10 SDE steps per rollout,
    8 transitions per step; awm 2 x 4 samples x 10 ODE steps, 4 samples x 6 times per step;
    branch_grpo 1 tree x 10 steps split at 0, 3, 6 (8 leaves), 8 transitions per step; spo
    2 chains x 10 steps, branching from step 4 with 4 candidates, 4 pairs per step. Rollouts use
    guidance 4.5 (the world's sampling), training steps the method's own guidance.
    """
    tiny = is_tiny(model)
    reward = {"jpeg_incompressibility": 1.0} if tiny else {"shapes": 1.0}
    online = {"prompts": "world:align", "num_steps": 10, "guidance_scale": 4.5}
    methods: dict[str, dict] = {
        "sft": {"method": {"name": "sft"}, "data": {"source": "world", "split": "pretrain"}, "batch": 8},
        "diffusion_dpo": {
            "method": {"name": "diffusion_dpo", "beta": 5000.0},
            # cheap synthetic pairs from the model itself (content is irrelevant to cost)
            "data": {"source": "synthetic", "path": str(pairs_dir or out_dir / "pairs"),
                     "synthetic": {"prompts": "world:align", "max_prompts": 16, "images_per_prompt": 2,
                                   "num_steps": 2, "guidance_scale": 1.0, "seed": seed}},
            # a continuous score ranks them: the verifier ties every pair of 2-step images
            "rewards": {"jpeg_incompressibility": 1.0}, "batch": 8},
        "grpo": {"method": {"name": "grpo", **online, "prompts_per_rollout": 2, "group_size": 4},
                 "rewards": reward, "batch": 8},
        "awm": {"method": {"name": "awm", **online, "prompts_per_rollout": 2, "group_size": 4,
                           "timesteps_per_sample": 6},
                "rewards": reward, "batch": 4},
        "branch_grpo": {"method": {"name": "branch_grpo", **online, "sampler": "auto", "prompts_per_rollout": 1,
                                   "split_steps": [0, 3, 6], "branching": 2},
                        "rewards": reward, "batch": 8},
        "spo": {"method": {"name": "spo", **online, "prompts_per_rollout": 2, "divert_start": 4,
                           "num_candidates": 4, "threshold": 0.0},
                "rewards": {"step_aware": {"path": "tiny" if tiny else (step_aware_pm or default_step_aware_pm())}},
                "batch": 4},
    }
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(methods)}")
    spec = methods[method]
    raw = {
        "run_name": f"{method}_{training}_s{seed}",
        "seed": seed,
        "model": model_section(model, training, lora_rank),
        "method": dict(spec["method"]),
        "optimization": {"lr": 1e-4, "weight_decay": 0.0, "batch_size": spec["batch"], "max_steps": max_steps,
                         "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "lr_scheduler": "constant"},
        "logging": {"every": 10, "tensorboard": False, "progress_bar": False},
        "output": {"dir": str(out_dir), "checkpoint_every": 0, "save_final": False},
    }
    if "data" in spec:
        raw["data"] = spec["data"]
    if "rewards" in spec:
        raw["rewards"] = spec["rewards"]
    return raw


def apply_overrides(raw: dict, method: str, overrides: list[str]) -> dict:
    """``KEY=VALUE`` for every method, ``METHOD:KEY=VALUE`` for one (values parsed as YAML)."""
    from diffalign.config import apply_override

    for item in overrides:
        target, sep, rest = item.partition(":")
        if sep and "=" not in target:
            if target == method:
                apply_override(raw, rest)
        else:
            apply_override(raw, item)
    return raw


# --------------------------------------------------------------------------------------------
# Counting network evaluations and swapping trainers
# --------------------------------------------------------------------------------------------


class NetworkProbe:
    """Rows through the denoiser (and a full fine-tune's frozen reference), per phase."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.rows: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._handles: list = []

    def attach(self, adapter) -> None:
        modules = [adapter.unwrapped_denoiser]
        if getattr(adapter, "_frozen_denoiser", None) is not None:
            modules.append(adapter._frozen_denoiser)
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))

    def _hook(self, module, args, kwargs):
        x = args[0] if args else next((kwargs[k] for k in ("sample", "hidden_states") if k in kwargs), None)
        if x is not None:
            self.rows[self.phase] = self.rows.get(self.phase, 0) + int(x.shape[0])
            self.calls[self.phase] = self.calls.get(self.phase, 0) + 1

    def count(self, phase: str) -> int:
        return self.rows.get(phase, 0)

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def patched_trainer(method: str, make_subclass):
    """Within the block, ``trainer_class(method)`` returns ``make_subclass(original)``."""
    from diffalign.trainers import TRAINERS, trainer_class

    original = trainer_class(method)
    TRAINERS[method] = make_subclass(original)
    try:
        yield TRAINERS[method]
    finally:
        TRAINERS[method] = original


def run_training(raw: dict):
    """``diffalign.train.train`` on a raw config; a :class:`StopRun` ends it quietly."""
    from diffalign.config import parse_config
    from diffalign.train import train

    try:
        return train(parse_config(raw))
    except StopRun:
        return None


# --------------------------------------------------------------------------------------------
# Timing the shared loop step by step
# --------------------------------------------------------------------------------------------


class Recorder:
    """Times each micro-step of the shared loop from inside ``next_microbatch``.

    Use ``patched_trainer(method, recorder.subclass)`` around ``train``. A call to
    ``next_microbatch`` closes the previous micro-step's update interval (loss, backward,
    clipping, optimizer, the loop's bookkeeping), times the data step (a rollout when the buffer
    is empty), runs the optional *side* step (``side(trainer)`` builds a callable taking the
    batch: a bare or a competing implementation, timed on the same batch, interleaved so both
    see the same machine load; it runs before our step on even steps and after it on odd ones, so
    neither always follows the data step), then opens the next interval. Gradient accumulation
    must be 1 (one micro-step = one optimizer step). The run ends (:class:`StopRun`) after ``warmup +
    steps`` steps and, for online methods, once ``iterations`` rollouts after the first are
    used up.
    """

    def __init__(self, method: str, warmup: int, steps: int, iterations: int = 1, side=None) -> None:
        self.method, self.warmup, self.steps, self.iterations = method, warmup, steps, iterations
        self.make_side = side
        self.online = method in ONLINE
        self.probe = NetworkProbe()
        self.records: list[dict] = []
        self.rollouts: list[dict] = []
        self.pending: dict | None = None
        self.pending_batch = None
        self.trainer = None
        self.side = None

    def subclass(self, base):
        recorder = self

        class Timed(base):
            def __init__(self, run_config, adapter, accelerator, rewards=None):
                recorder.probe.attach(adapter)
                with recorder.probe.in_phase("setup"):
                    super().__init__(run_config, adapter, accelerator, rewards)
                recorder.trainer = self
                recorder.probe.phase = "idle"

            def next_microbatch(self):
                return recorder.fetch(self, super().next_microbatch)

            def evaluate(self):
                with recorder.probe.in_phase("eval"):
                    return super().evaluate()

        Timed.__name__ = Timed.__qualname__ = f"Timed{base.__name__}"
        return Timed

    def fetch(self, trainer, fetch):
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        probe = self.probe
        if self.pending is not None:
            rec = self.pending
            rec["update_s"] = now_wall - rec.pop("_wall")
            rec["update_cpu_s"] = now_cpu - rec.pop("_cpu")
            rec["update_nfe"] = probe.count("update") - rec.pop("_nfe")
            if self.side_due(rec["index"]) and not self.side_goes_first(rec["index"]):
                self.time_side(rec, self.pending_batch, first=False)
            self.records.append(rec)
            self.pending = self.pending_batch = None
        timed = len(self.records) - self.warmup
        if timed >= self.steps:
            if not self.online:
                raise StopRun
            # every rollout so far is used up when the buffer is empty; the first is warm-up
            if trainer.at_boundary() and len(self.rollouts) - 1 >= self.iterations:
                raise StopRun
        rollouts_before = getattr(trainer, "rollouts", 0)
        n0 = probe.count("data")
        clock = Clock().start()
        with probe.in_phase("data"):
            batch = fetch()
        wall, cpu = clock.lap()
        rec = {"index": len(self.records), "data_s": wall, "data_cpu_s": cpu, "data_nfe": probe.count("data") - n0}
        if self.online:
            rec["rollout_id"] = trainer.rollouts
            rec["rolled_out"] = trainer.rollouts != rollouts_before
            if rec["rolled_out"]:
                self.rollouts.append({"id": trainer.rollouts, "wall_s": wall, "cpu_s": cpu, "nfe": rec["data_nfe"],
                                      "micro_batches": len(trainer._buffer) + 1})
        if self.side_due(rec["index"]):
            if self.side is None:
                self.side = self.make_side(trainer)
            if self.side_goes_first(rec["index"]):
                self.time_side(rec, batch, first=True)
        probe.phase = "update"
        rec["_wall"], rec["_cpu"], rec["_nfe"] = time.perf_counter(), time.process_time(), probe.count("update")
        self.pending, self.pending_batch = rec, batch
        return batch

    def side_due(self, index: int) -> bool:
        return self.make_side is not None and index >= self.warmup

    @staticmethod
    def side_goes_first(index: int) -> bool:
        """The side step runs before ours on even steps, after it on odd ones: neither always
        follows the data step."""
        return index % 2 == 0

    def time_side(self, rec: dict, batch, first: bool) -> None:
        probe = self.probe
        n0 = probe.count("side")
        clock = Clock().start()
        with probe.in_phase("side"):
            self.side(batch)
        rec["side_s"], rec["side_cpu_s"] = clock.lap()
        rec["side_nfe"] = probe.count("side") - n0
        rec["side_first"] = first

    # ---- summary ---------------------------------------------------------------------------

    def summary(self) -> dict:
        timed = self.records[self.warmup:]
        update = median(r["update_s"] for r in timed)
        side = median(r["side_s"] for r in timed if "side_s" in r)
        out = {
            "steps_timed": len(timed),
            "update_s": update,
            "side_s": side,
            "overhead_update": update / side if update and side else None,
            "overhead_update_paired_median": median(r["update_s"] / r["side_s"] for r in timed if r.get("side_s")),
            "update_cpu_s": median(r["update_cpu_s"] for r in timed),
            "side_cpu_s": median(r["side_cpu_s"] for r in timed if "side_cpu_s" in r),
            "nfe_update_per_step": median(r["update_nfe"] for r in timed),
            "nfe_side_per_step": median(r["side_nfe"] for r in timed if "side_nfe" in r),
            "nfe_mismatched_steps": sum(1 for r in timed if "side_nfe" in r and r["side_nfe"] != r["update_nfe"]),
            "steps_side_first": sum(1 for r in timed if r.get("side_first")),
        }
        if not self.online:
            step = median(r["update_s"] + r["data_s"] for r in timed)
            out.update({
                "data_s": median(r["data_s"] for r in timed),
                "overhead_with_data": step / side if step and side else None,
                "iteration": "one optimizer step",
                "nfe_per_iteration": median(r["update_nfe"] + r["data_nfe"] for r in timed),
                "cpu_s_per_iteration": median(r["update_cpu_s"] + r["data_cpu_s"] for r in timed),
                "wall_s_per_iteration": step,
            })
            return out
        # online: iterations = rollouts after the first, each with the optimizer steps over it
        later = self.rollouts[1:] or self.rollouts
        iterations = []
        for event in later:
            steps = [r for r in self.records if r["rollout_id"] == event["id"]]
            if len(steps) < event["micro_batches"]:
                continue  # not used up when the run stopped
            iterations.append({
                "wall_s": event["wall_s"] + sum(r["update_s"] for r in steps),
                "cpu_s": event["cpu_s"] + sum(r["update_cpu_s"] for r in steps),
                "nfe": event["nfe"] + sum(r["update_nfe"] for r in steps),
                "update_nfe": sum(r["update_nfe"] for r in steps),
            })
        out.update({
            "rollouts_timed": len(later),
            "rollout_s": median(e["wall_s"] for e in later),
            "rollout_cpu_s": median(e["cpu_s"] for e in later),
            "rollout_nfe": median(e["nfe"] for e in later),
            "steps_per_iteration": median(e["micro_batches"] for e in later),
            "iteration": "one rollout + the optimizer steps over it",
            "iterations_timed": len(iterations),
            "nfe_per_iteration": median(i["nfe"] for i in iterations),
            "update_nfe_per_iteration": median(i["update_nfe"] for i in iterations),
            "cpu_s_per_iteration": median(i["cpu_s"] for i in iterations),
            "wall_s_per_iteration": median(i["wall_s"] for i in iterations),
        })
        return out


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def process_settings(threads: int, cwd: Path | None = None):
    """Torch threads (and the working directory) for a benchmark, restored afterwards, so that
    calling a benchmark's ``main`` in-process (tests, notebooks) leaves the process as it was."""
    import os

    import torch

    previous_threads, previous_cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(threads)
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        os.chdir(previous_cwd)


class Clock:
    """Wall and process-CPU seconds since ``start()``."""

    def start(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def fmt(value, spec: str = ".3f", width: int = 8) -> str:
    if value is None:
        return "-".rjust(width)
    return format(value, spec).rjust(width)
