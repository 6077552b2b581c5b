"""The ``diffalign`` command.

    diffalign train    --cfg X.yaml [--set k=v] [--resume]   (= accelerate launch diffalign/train.py)
    diffalign generate --model M [--adapter DIR] --prompt P [--rlg-scale W]
    diffalign evaluate --model M [--adapter DIR] --prompt-set S --rewards R [--rlg-scales ...]
    diffalign grid     --model M --columns base DIR ... | --adapter DIR --rlg-scales ...
    diffalign plot     RUN_DIR --keys reward eval/shapes_strict
    diffalign demo     [--cfg awm_shapes.yaml]    (the main job on the shapes world: train, grid, curve)
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffalign.config import ConfigError

# subcommand -> (module with add_arguments(parser) and run(args), help)
COMMANDS = {
    "train": ("diffalign.train", "train with a YAML recipe (same as accelerate launch diffalign/train.py)"),
    "generate": ("diffalign.generate", "sample images (optionally with an adapter and RL guidance)"),
    "evaluate": ("diffalign.evaluate", "score a model/adapter against its base on a prompt set"),
    "grid": ("diffalign.grid", "image grid: prompts x checkpoints or RLG scales, annotated with rewards"),
    "plot": ("diffalign.plotting", "plot a run's metrics (reward curves) to a PNG"),
    "demo": ("diffalign.demo", "the main job on the shapes world: align, then grid, curve and held-out accuracy"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align text-to-image diffusion models with human preferences.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        importlib.import_module(COMMANDS[args.command][0]).run(args)
    except (ConfigError, OSError, ValueError) as e:  # bad input: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
