"""Assertions several test modules share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def final_lora(run_dir: Path) -> dict:
    """The LoRA weights a run saved in ``final/`` (diffusers' file name)."""
    return load_file(Path(run_dir) / "final" / "pytorch_lora_weights.safetensors")


def assert_same_final_lora(run_a: Path, run_b: Path) -> None:
    """Bit-for-bit equal final LoRA weights: e.g. an uninterrupted run and a resumed one."""
    a, b = final_lora(run_a), final_lora(run_b)
    assert a and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
