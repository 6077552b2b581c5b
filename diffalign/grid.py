"""``diffalign grid``: a comparison grid - prompts as rows, checkpoints or RLG scales as columns,
the same seed in every cell - with each cell annotated with its reward values.

    diffalign grid --model world/sd3 --columns base outputs/grpo/final --prompt-set world:heldout \\
        --max-prompts 6 --rewards shapes --out grid/
    diffalign grid --model world/sd3 --adapter outputs/grpo/final --rlg-scales 0 1 2 ...

Writes ``grid.png`` and ``index.html`` (the grid as a table, one image file per cell).
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from diffalign.data.images import to_pil
from diffalign.evaluate import parse_reward_specs
from diffalign.evaluation import build_eval_rewards
from diffalign.generate import add_model_arguments, add_prompt_arguments, generate_images, prompts_from_args, sampling_from_args
from diffalign.models import load_model

LINE_HEIGHT = 12  # one line of the default bitmap font


def compose_grid(cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[str],
                 notes: list[list[str]], scale: int = 2) -> Image.Image:
    """Rows x columns of images, upscaled ``scale`` times (nearest), with labels and notes
    (each note's space-separated items on lines of their own, so several rewards fit a cell)."""
    font = ImageFont.load_default()
    w, h = cells[0][0].size
    w, h = w * scale, h * scale
    label_w, header_h = 260, 18
    lines = max((len(note.split()) for row in notes for note in row), default=0)
    text_h = 2 + LINE_HEIGHT * lines
    grid = Image.new("RGB", (label_w + w * len(column_labels), header_h + (h + text_h) * len(cells)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels):
        draw.text((label_w + j * w + 2, 3), label[: w // 6], fill="black", font=font)
    for i, row in enumerate(cells):
        top = header_h + i * (h + text_h)
        draw.text((4, top + h // 2 - 6), row_labels[i][:42], fill="black", font=font)
        for j, image in enumerate(row):
            grid.paste(image.resize((w, h), Image.NEAREST), (label_w + j * w, top))
            for k, line in enumerate(notes[i][j].split()):
                draw.text((label_w + j * w + 2, top + h + 1 + k * LINE_HEIGHT), line[: w // 6], fill="black", font=font)
    return grid


def write_html(path: Path, cell_files: list[list[str]], row_labels, column_labels, notes) -> None:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in column_labels)
    rows = []
    for i, files in enumerate(cell_files):
        cells = "".join(
            f'<td><img src="{html.escape(f)}" width="128" style="image-rendering:pixelated"><br>'
            f"<small>{html.escape(notes[i][j])}</small></td>" for j, f in enumerate(files)
        )
        rows.append(f"<tr><th>{html.escape(row_labels[i])}</th>{cells}</tr>")
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>diffalign grid</title>"
        "<style>td,th{text-align:center;padding:4px;font-family:sans-serif}</style>"
        f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>\n"
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--columns", nargs="+", default=None,
                        help="'base' and/or trained adapter folders, one column each")
    parser.add_argument("--adapter", default=None, help="with --rlg-scales: the adapter to dial")
    parser.add_argument("--rlg-scales", type=float, nargs="+", default=None)
    parser.add_argument("--rewards", nargs="*", default=[], help="reward plugins to annotate cells with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="grid")
    return parser


def run(args) -> Path:
    if (args.columns is None) == (args.rlg_scales is None):
        raise ValueError("give either --columns (checkpoints) or --rlg-scales (with --adapter)")
    if args.rlg_scales is not None and args.adapter is None:
        raise ValueError("--rlg-scales needs --adapter")
    prompts = prompts_from_args(args)
    sampling = sampling_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rlg_scales is not None:
        adapter = load_model(args.model, family=args.family, dtype=args.dtype, adapter_dir=args.adapter).to(args.device)
        columns = [(f"w={w:g}", adapter, w) for w in args.rlg_scales]
    else:
        columns = []
        for column in args.columns:
            adapter_dir = None if column == "base" else column
            model = load_model(args.model, family=args.family, dtype=args.dtype, adapter_dir=adapter_dir).to(args.device)
            columns.append((column if column == "base" else Path(column).parent.name or column, model, None))
    rewards = (build_eval_rewards(parse_reward_specs(args.rewards), columns[0][1].device, what="--rewards")
               if args.rewards else {})

    images, notes = [], []
    for _, model, scale in columns:
        batch = generate_images(model, prompts, [args.seed], rlg_scale=scale, **sampling)
        images.append(to_pil(batch))
        scores = {k: r.score(batch, prompts).tolist() for k, r in rewards.items()}
        notes.append([" ".join(f"{k}={scores[k][i]:.2f}" for k in scores) for i in range(len(prompts))])
    cells = [[images[j][i] for j in range(len(columns))] for i in range(len(prompts))]
    cell_notes = [[notes[j][i] for j in range(len(columns))] for i in range(len(prompts))]
    labels = [name for name, _, _ in columns]
    cell_files = []
    for i, row in enumerate(cells):
        cell_files.append([])
        for j, image in enumerate(row):
            name = f"cell_{i:02d}_{j:02d}.png"
            image.save(out / name)
            cell_files[-1].append(name)
    compose_grid(cells, prompts, labels, cell_notes).save(out / "grid.png")
    write_html(out / "index.html", cell_files, prompts, labels, cell_notes)
    print(f"wrote {out / 'grid.png'} and {out / 'index.html'}")
    return out / "grid.png"
