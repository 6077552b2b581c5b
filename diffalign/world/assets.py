"""The shapes world's shipped models: where they are, how to load them, how to sample them.

    from diffalign.world.assets import WORLD_MODELS, WORLD_SAMPLING, load_world_adapter, resolve_model_path

    adapter = load_world_adapter("world/sd3")          # diffalign.pipelines adapter, ready to sample
    resolve_model_path("world/clip")                   # -> .../diffalign/world/models/clip
    resolve_model_path("runwayml/stable-diffusion-v1-5")  # anything else: returned unchanged

The folders are plain diffusers / transformers folders (``DiffusionPipeline.from_pretrained``,
``CLIPModel.from_pretrained``, ``CLIPProcessor.from_pretrained`` all work offline). They were
written by ``python -m diffalign.world.pretrain`` (see ``models/REPORT.md`` for the recipe and
every measured number).

- ``sd``: StableDiffusionPipeline, epsilon-prediction UNet on 16x16x4 latents, DDIM; its text
  encoder is the world CLIP's text tower, fine-tuned with the UNet.
- ``sd3``: StableDiffusion3Pipeline, flow-matching MMDiT; both CLIP slots hold the world CLIP
  text tower (frozen) and the T5 slot a small T5 trained with the transformer, with a
  word-level tokenizer. Call the pipeline with ``max_sequence_length=12``, the T5 length it
  was trained with (its default, 256, pads with tokens the model never saw).
  ``load_world_adapter`` sets this on the adapter for you.
- ``clip``: the world CLIP (contrastive with hard negatives); its text tower is the text
  encoder both pipelines start from, and it is the world's CLIP reward.
- ``preference``: a PickScore-style CLIP fine-tuned on simulated annotator choices (the
  learned proxy reward).
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"

WORLD_MODELS: dict[str, str] = {
    "sd": str(MODELS_DIR / "sd"),
    "sd3": str(MODELS_DIR / "sd3"),
    "clip": str(MODELS_DIR / "clip"),
    "preference": str(MODELS_DIR / "preference"),
}

# Recommended sampling per text-to-image model (the settings REPORT.md's held-out numbers use).
WORLD_SAMPLING: dict[str, dict] = {
    "sd": {"num_steps": 20, "guidance_scale": 4.5, "resolution": 64},
    "sd3": {"num_steps": 20, "guidance_scale": 4.5, "resolution": 64, "max_sequence_length": 12},
}

# The file whose presence marks a complete folder, and the recipe stage that writes it.
_MARKER = {"sd": "model_index.json", "sd3": "model_index.json", "clip": "config.json", "preference": "config.json"}
_STAGE = {"sd": "eps", "sd3": "flow", "clip": "clip", "preference": "preference"}
_PREFIX = "world/"


def resolve_model_path(path_or_name: str | os.PathLike) -> str | os.PathLike:
    """``world/sd``, ``world/sd3``, ``world/clip``, ``world/preference`` -> the shipped folder
    (``FileNotFoundError`` saying how to re-create it if it is missing); anything else is
    returned unchanged."""
    if not isinstance(path_or_name, str) or not path_or_name.startswith(_PREFIX):
        return path_or_name
    name = path_or_name[len(_PREFIX):].strip("/")
    if name not in WORLD_MODELS:
        raise ValueError(f"unknown world model {path_or_name!r}; choose one of "
                         f"{sorted(_PREFIX + n for n in WORLD_MODELS)}")
    folder = Path(WORLD_MODELS[name])
    if not (folder / _MARKER[name]).is_file():
        raise FileNotFoundError(
            f"the world model folder {folder} is missing or incomplete (no {_MARKER[name]}). "
            f"Re-create it with: python -m diffalign.world.pretrain --out {MODELS_DIR} --stage {_STAGE[name]} "
            f"(its inputs first: stages vae and clip for sd/sd3, all of them for preference; "
            f"or --stage all)")
    return str(folder)


def load_world_adapter(name: str = "world/sd", **kwargs):
    """A ``diffalign.pipelines`` adapter for ``world/sd`` or ``world/sd3`` (or a folder), with
    the settings the model was trained with (SD3: its T5 length)."""
    from diffalign.pipelines import load_adapter

    adapter = load_adapter(resolve_model_path(name), **kwargs)
    if adapter.family == "sd3":
        adapter.max_sequence_length = WORLD_SAMPLING["sd3"]["max_sequence_length"]
    return adapter


__all__ = ["MODELS_DIR", "WORLD_MODELS", "WORLD_SAMPLING", "load_world_adapter", "resolve_model_path"]
