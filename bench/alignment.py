"""Held-out reward and verifier accuracy against network evaluations and CPU time, every method.

    python bench/alignment.py [--recipes dpo_shapes.yaml grpo_shapes.yaml ...] [--seeds 0 1 2]
                              [--steps N] [--eval-every K] [--set KEY=VALUE ...]
                              [--out outputs/bench/alignment.json] [--plot outputs/bench/alignment.png] [--log-x]
    python bench/alignment.py --merge part1.json part2.json [--out ...]   # runs split over processes

Runs each recipe (default: every ``configs/*_shapes.yaml`` that trains a text-to-image model,
i.e. all but ``step_aware_pm_shapes.yaml``) once per seed through the shared training loop,
with ``--steps`` optimizer steps (default: the recipe's own ``max_steps``) and a held-out
evaluation every ``--eval-every`` steps (plus the loop's own at the start and the end). The runs
start in the repository root (the recipes' data paths are relative to it).

What the runs' ``metrics.jsonl`` does not hold, this script measures around the loop (no
library change): cumulative network evaluations (NFE: rows through the denoiser and, for a
full fine-tune, its frozen reference copy; with classifier-free guidance a sample counts
twice; rollouts, updates and reference passes all count) and cumulative CPU seconds (process
time, all threads) and wall seconds, each up to every held-out evaluation, with the evaluations'
own cost left out. Cost before the first step (building the data: e.g. generating and ranking
Diffusion-DPO's synthetic pairs when they are not cached yet) is reported per run as
``setup_nfe`` / ``setup_cpu_s`` and is not on the x axes. The same numbers are added to the
logged training rows as ``bench/nfe`` and ``bench/cpu_s`` (for the online methods' training
``reward``).

Held-out reward: the first of ``--reward-keys`` a run logs (default ``eval/shapes``, then
``eval/train_shapes``: the fraction of a prompt's requirements the verifier finds met);
accuracy: ``--accuracy-key`` (default ``eval/verifier``: all requirements met). Per recipe the
seeds are aggregated per evaluation (mean, sample std, min, max). Writes JSON and one PNG (a
2x2 grid: reward and accuracy against NFE and against CPU seconds, every method, mean with a
+-1 std band over seeds) and prints a table. A benchmark: never run by the tests (a smoke test
runs it on a tiny recipe).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, NetworkProbe, fmt, patched_trainer, process_settings  # noqa: E402

import torch  # noqa: E402

from diffalign.config import add_overrides_argument  # noqa: E402


def default_recipes() -> list[Path]:
    from diffalign.config import load_config

    out = []
    for path in sorted((REPO / "configs").glob("*_shapes.yaml")):
        if load_config(path).method.name != "step_aware_pm":
            out.append(path)
    return out


class CostMeter:
    """Cumulative training NFE / CPU / wall seconds, snapshotted at every held-out evaluation."""

    def __init__(self) -> None:
        self.probe = NetworkProbe()
        self.snapshots: list[dict] = []
        self.setup: dict = {}
        self.cpu0 = self.wall0 = 0.0
        self.eval_cpu = self.eval_wall = 0.0

    def now(self) -> dict:
        return {"nfe": self.probe.count("train"),
                "cpu_s": time.process_time() - self.cpu0 - self.eval_cpu,
                "wall_s": time.perf_counter() - self.wall0 - self.eval_wall}

    def subclass(self, base):
        meter = self

        class Costed(base):
            def __init__(self, run_config, adapter, accelerator, rewards=None):
                meter.probe.attach(adapter)
                cpu, wall = time.process_time(), time.perf_counter()
                with meter.probe.in_phase("setup"):
                    super().__init__(run_config, adapter, accelerator, rewards)
                meter.setup = {"setup_nfe": meter.probe.count("setup"), "setup_cpu_s": time.process_time() - cpu,
                               "setup_wall_s": time.perf_counter() - wall}
                meter.cpu0, meter.wall0 = time.process_time(), time.perf_counter()
                meter.probe.phase = "train"

            def evaluate(self):
                meter.snapshots.append(meter.now())
                cpu, wall = time.process_time(), time.perf_counter()
                try:
                    with meter.probe.in_phase("eval"):
                        return super().evaluate()
                finally:
                    meter.eval_cpu += time.process_time() - cpu
                    meter.eval_wall += time.perf_counter() - wall

            def pop_data_metrics(self):
                metrics = super().pop_data_metrics()
                cost = meter.now()
                metrics.update({"bench/nfe": float(cost["nfe"]), "bench/cpu_s": cost["cpu_s"]})
                return metrics

        Costed.__name__ = Costed.__qualname__ = f"Costed{base.__name__}"
        return Costed


def run_one(recipe: Path, seed: int, a) -> dict:
    from diffalign.config import load_config
    from diffalign.run_log import read_metrics
    from diffalign.train import train

    name = recipe.stem
    overrides = [f"seed={seed}", f"run_name={name}_s{seed}", f"output.dir={a.workdir}",
                 "logging.progress_bar=false", "logging.tensorboard=false", "output.checkpoint_every=0",
                 "output.save_final=false"]
    if a.steps is not None:
        overrides.append(f"optimization.max_steps={a.steps}")
    mine = []  # KEY=VALUE for every recipe, RECIPE:KEY=VALUE (the file's stem) for one
    for item in a.overrides:
        target, sep, rest = item.partition(":")
        if sep and "=" not in target:
            if target == name:
                mine.append(rest)
        else:
            mine.append(item)
    steps = load_config(recipe, overrides + mine).optimization.max_steps
    eval_every = a.eval_every if a.eval_every is not None else max(1, steps // 5)
    cfg = load_config(recipe, overrides + [f"logging.eval_every={eval_every}", *mine])
    metrics_path = cfg.output_dir / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()  # a previous run's rows would be appended to
    meter = CostMeter()
    method = cfg.method.name
    with patched_trainer(method, meter.subclass):
        result = train(cfg)
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if len(evals) != len(meter.snapshots):
        raise RuntimeError(f"{len(evals)} evaluation rows but {len(meter.snapshots)} evaluations seen")
    if not evals:
        raise RuntimeError(f"{recipe.name}: no held-out evaluation (set method.eval_prompts and eval_rewards)")
    reward_key = next((k for k in a.reward_keys if k in evals[-1]), None)
    points = []
    for row, cost in zip(evals, meter.snapshots):
        points.append({"step": row["step"], **cost,
                       "reward": row.get(reward_key) if reward_key else None,
                       "accuracy": row.get(a.accuracy_key),
                       "eval": {k: v for k, v in row.items() if k.startswith("eval/")}})
    train_rows = [{"step": r["step"], "nfe": r["bench/nfe"], "cpu_s": r["bench/cpu_s"], "reward": r["reward"]}
                  for r in rows if "reward" in r and "bench/nfe" in r]
    model = f"tiny:{cfg.model.family}" if cfg.model.tiny else cfg.model.path
    return {"recipe": recipe.name, "method": method, "model": model,
            "seed": seed, "steps": result.step, "eval_every": cfg.logging.eval_every, "reward_key": reward_key,
            "accuracy_key": a.accuracy_key, **meter.setup, "eval_cpu_s": meter.eval_cpu, "eval_wall_s": meter.eval_wall,
            "eval_nfe": meter.probe.count("eval"), "points": points, "train_reward": train_rows,
            "threads": torch.get_num_threads()}


def _stats(values: list) -> dict:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def aggregate(runs: list[dict]) -> list[dict]:
    """Per recipe: the seeds' curves, point by point (the i-th evaluation of every seed)."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        group = [r for r in runs if r["recipe"] == recipe and "points" in r]
        if not group:
            continue
        n = min(len(r["points"]) for r in group)
        curve = []
        for i in range(n):
            pts = [r["points"][i] for r in group]
            curve.append({"step": pts[0]["step"], **{k: _stats([p[k] for p in pts])
                                                      for k in ("nfe", "cpu_s", "wall_s", "reward", "accuracy")}})
        out.append({"recipe": recipe, "method": group[0]["method"], "seeds": [r["seed"] for r in group],
                    "reward_key": group[0]["reward_key"], "accuracy_key": group[0]["accuracy_key"], "curve": curve})
    return out


def plot(summary: list[dict], path: Path, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), squeeze=False)
    panels = [("reward", "nfe"), ("reward", "cpu_s"), ("accuracy", "nfe"), ("accuracy", "cpu_s")]
    xlabels = {"nfe": "cumulative network evaluations (NFE)", "cpu_s": "cumulative CPU seconds"}
    for s in summary:
        n = len(s["seeds"])
        label = f"{s['recipe'].removesuffix('.yaml')} ({n} seed{'s' * (n != 1)})"
        for ax, (y, x) in zip(axes.flat, panels):
            pts = [p for p in s["curve"] if p[y]["mean"] is not None]
            if not pts:
                continue
            xs = [p[x]["mean"] for p in pts]
            mean = [p[y]["mean"] for p in pts]
            std = [p[y]["std"] for p in pts]
            (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=label)
            ax.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    keys = {y: " / ".join(dict.fromkeys(str(s[f"{y}_key"]) for s in summary)) or y for y in ("reward", "accuracy")}
    for ax, (y, x) in zip(axes.flat, panels):
        if log_x:  # methods whose budgets differ by orders of magnitude; symlog keeps the x = 0 start
            positive = [p[x]["mean"] for s in summary for p in s["curve"][1:] if (p[x]["mean"] or 0) > 0]
            ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
        else:  # 100000 and 120000 would run into each other
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 4))
        ax.set_xlabel(xlabels[x] + (" (log)" if log_x else ""))
        ax.set_ylabel(f"held-out {y} ({keys[y]})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("held-out reward / verifier accuracy vs cost (mean +- 1 std over seeds; evaluation cost excluded)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title above the y labels
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(runs: list[dict], summary: list[dict]) -> None:
    for r in runs:
        if "error" in r:
            print(f"{r['recipe']} seed {r['seed']}: ERROR {r['error']}")
    print(f"\n{'recipe':<24} {'seeds':>5} {'steps':>6} {'NFE':>10} {'CPU s':>9} {'reward start':>12} "
          f"{'reward end':>16} {'acc start':>9} {'acc end':>16}")
    for s in summary:
        first, last = s["curve"][0], s["curve"][-1]
        print(f"{s['recipe'].removesuffix('.yaml'):<24} {len(s['seeds']):>5} {last['step']:>6} "
              f"{fmt(last['nfe']['mean'], '.0f', 10)} {fmt(last['cpu_s']['mean'], '.1f', 9)} "
              f"{fmt(first['reward']['mean'], '.3f', 12)} "
              f"{fmt(last['reward']['mean'], '.3f', 8)} +-{fmt(last['reward']['std'], '.3f', 5)} "
              f"{fmt(first['accuracy']['mean'], '.3f', 9)} "
              f"{fmt(last['accuracy']['mean'], '.3f', 8)} +-{fmt(last['accuracy']['std'], '.3f', 5)}")
    print("NFE / CPU s: cumulative training cost at the last evaluation (evaluation and data setup excluded); "
          "+- sample std over seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", type=Path, default=None,
                        help="recipe files or names in configs/ (default: configs/*_shapes.yaml but step_aware_pm)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: steps // 5)")
    add_overrides_argument(parser, "[RECIPE:]KEY=VALUE", "config overrides for every run, or for one recipe with "
                           "its file stem as prefix (dpo_shapes:optimization.lr=1e-5)")
    parser.add_argument("--reward-keys", nargs="+", default=["eval/shapes", "eval/train_shapes"])
    parser.add_argument("--accuracy-key", default="eval/verifier")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds comparable across loads)")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "alignment_runs")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "alignment.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--log-x", action="store_true", help="logarithmic cost axes (budgets of different sizes)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="train nothing: combine the runs of these earlier outputs into one table, JSON and plot")
    a = parser.parse_args(argv)
    if a.merge:
        return report(a, merged_runs(a.merge))
    from diffalign.config import resolve_config_path

    recipes = [resolve_config_path(r).resolve() for r in a.recipes] if a.recipes else default_recipes()
    a.workdir, a.out = a.workdir.resolve(), a.out.resolve()
    a.plot = a.plot.resolve() if a.plot else None
    # the recipes' data paths (e.g. outputs/pairs/...) are relative to the repository root
    with process_settings(a.threads, cwd=REPO):
        return run(a, recipes)


def run(a, recipes: list[Path]) -> int:
    runs = []
    for recipe in recipes:
        for seed in a.seeds:
            start = time.perf_counter()
            try:
                runs.append(run_one(Path(recipe), seed, a))
            except Exception as e:  # record and go on (e.g. spo without its step-aware model)
                traceback.print_exc()
                runs.append({"recipe": Path(recipe).name, "seed": seed, "error": f"{type(e).__name__}: {e}"})
            runs[-1]["bench_wall_s"] = round(time.perf_counter() - start, 1)
            last = runs[-1].get("points", [{}])[-1]
            print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("points", "train_reward")}
                             | {"last_point": {k: v for k, v in last.items() if k != "eval"}}), flush=True)
    return report(a, runs)


def merged_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        try:
            runs += json.loads(path.read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--merge {path}: not an output of bench/alignment.py ({type(e).__name__}: {e})")
    return runs


def report(a, runs: list[dict]) -> int:
    summary = aggregate(runs)
    print_table(runs, summary)
    plot_path = a.plot or a.out.with_suffix(".png")
    plot(summary, plot_path, log_x=a.log_x)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "runs": runs, "plot": str(plot_path),
                                 "args": {k: str(v) for k, v in vars(a).items()}}, indent=2) + "\n")
    print(f"wrote {a.out} and {plot_path}")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
