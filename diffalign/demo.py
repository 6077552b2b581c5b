"""``diffalign demo``: the main job on the embedded shapes world (what ``make demo`` runs).

    diffalign demo                                  # awm_shapes.yaml, ~40 CPU minutes on one thread
    diffalign demo --set optimization.max_steps=10  # a shorter look
    diffalign demo --cfg dpo_shapes.yaml            # any world recipe

Trains the recipe (held-out evaluation before and after is part of it), then writes next to
the run: ``demo_grid/grid.png`` (held-out prompts x base / aligned, same seeds, each cell
annotated with the verifier's scores), ``reward_curve.png`` (training reward and held-out
accuracy per step), and prints the held-out verifier accuracy before -> after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.config import add_overrides_argument

# held-out prompts for the grid: every prompt kind, half with colour-shape pairs pretraining never showed
GRID_PROMPTS_PER_KIND = 2
# the strongest method measured on the world (docs/RESULTS.md): the demo follows the best recipe
DEFAULT_RECIPE = "awm_shapes.yaml"
ACCURACY_KEY = "verifier"  # the eval reward (shapes verifier, strict) the world recipes log


def grid_prompts(per_kind: int = GRID_PROMPTS_PER_KIND) -> list[str]:
    from diffalign.world import kind_of
    from diffalign.world.splits import split

    chosen: dict[str, list[str]] = {}
    for prompt in split("heldout"):
        bucket = chosen.setdefault(kind_of(prompt), [])
        if len(bucket) < per_kind:
            bucket.append(prompt)
    return [p for kind in sorted(chosen) for p in chosen[kind]]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--cfg", default=DEFAULT_RECIPE, help="a world recipe (configs/*_shapes.yaml)")
    add_overrides_argument(parser, help="override config keys, e.g. --set optimization.max_steps=30 seed=1")
    return parser


def run(args) -> dict:
    from diffalign import grid, plotting
    from diffalign.config import load_config
    from diffalign.train import train

    cfg = load_config(args.cfg, args.overrides)
    if not str(cfg.model.path or "").startswith("world/"):
        raise ValueError(f"--cfg {args.cfg}: the demo runs on the shapes world (model.path world/sd or world/sd3), "
                         f"got model.path={cfg.model.path!r}")
    result = train(cfg)
    before, after = result.start_eval.get(ACCURACY_KEY), result.end_eval.get(ACCURACY_KEY)
    if before is None or after is None:
        raise ValueError(f"--cfg {args.cfg}: the recipe must evaluate method.eval_rewards.{ACCURACY_KEY} "
                         f"(the shapes verifier, strict) on held-out prompts")

    out = Path(result.output_dir)
    grid_parser = grid.add_arguments(argparse.ArgumentParser())
    prompt_args = [arg for prompt in grid_prompts() for arg in ("--prompt", prompt)]
    grid_args = grid_parser.parse_args([
        "--model", cfg.model.path, "--columns", "base", str(out / "final"), *prompt_args,
        "--rewards", "strict=shapes:mode=strict", "fraction=shapes", "--out", str(out / "demo_grid"),
    ])
    grid_png = grid.run(grid_args)
    curve_png = plotting.plot_metrics([out], ["reward", f"eval/{ACCURACY_KEY}"], out / "reward_curve.png",
                                      labels=[cfg.run_name])
    print(f"\nheld-out verifier accuracy (every requirement met, {getattr(cfg.method.options, 'eval_prompts', 'held-out')}): "
          f"{100 * before:.1f}% -> {100 * after:.1f}%")
    met = [key for key in sorted(result.end_eval) if key.startswith("world_met/")]
    if met:  # which part of the prompts the model gets right (see diffalign.evaluation)
        print("requirements met, before -> after: " + ", ".join(
            f"{key.split('/')[1]} {100 * result.start_eval.get(key, float('nan')):.0f}% -> {100 * result.end_eval[key]:.0f}%"
            for key in met))
    print(f"adapter: {out / 'final'}\ngrid:    {grid_png}\ncurve:   {curve_png}")
    return {"before": before, "after": after, "grid": grid_png, "curve": curve_png, "output_dir": out}
